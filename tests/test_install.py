"""The installed package, used from outside the repository root.

Inside the root, Python finds the source folders first and hides install problems; from a temporary
directory only what `pip install -e .` (or a wheel) installed is importable. The installed import
names must be ours alone: Hugging Face's `kernels` distribution (a dependency of transformers)
installs a top-level `kernels`, and PyPI has a `bench`; ours are `wan_triton.kernels` and bench/
(clone-only scripts, not installed).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'python -m pip install -e ".[test]" first, with the python that runs pytest (README, Contributing)'

_PATCHED_GENERATION = """
import importlib.util, json, sys
import wan_triton
from wan_triton import kernels
from wan.pipeline import WanT2V

hf = importlib.util.find_spec("kernels")  # Hugging Face's package, when transformers brought it
pipe = WanT2V.from_config("tiny", device=sys.argv[1])
wan_triton.patch(strict=True)             # strict: any fallback to the reference raises
video = pipe.generate("a red ball", size=(128, 128), frame_num=5, sampling_steps=1, seed=0, progress=False)
stats = wan_triton.kernel_stats()
wan_triton.unpatch()
print(json.dumps(dict(kernels_file=kernels.__file__, wan_triton_file=wan_triton.__file__,
                      hf_kernels=hf.origin if hf else None, shape=list(video.shape),
                      launches={op: s["launches"] for op, s in stats.items()})))
"""


def _env(interpret: bool = True) -> dict:
    """The environment of a child from outside the root; `interpret`: TRITON_INTERPRET=1 (the kernels on
    CPU tensors), else no interpreter (compiled kernels, where the child works on a GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "TRITON_INTERPRET")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _script(name: str) -> str | None:
    """The console script `name` installed for this interpreter (its scripts folder), else on PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    return str(here) if here.is_file() else shutil.which(name)


def _outside(tmp_path: Path) -> Path:
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return tmp_path


def test_patch_launches_kernels_from_outside_the_root(tmp_path):
    """The installed package's kernels launch in a patched generation: compiled on a GPU, interpreted on CPU
    tensors elsewhere (a GPU machine's interpreter may be Triton 3.6's, broken under NumPy 2.4)."""
    pytest.importorskip("triton")
    import torch

    cuda = torch.cuda.is_available()
    r = subprocess.run([sys.executable, "-c", _PATCHED_GENERATION, "cuda" if cuda else "cpu"], cwd=_outside(tmp_path),
                       env=_env(interpret=not cuda), capture_output=True, text=True, timeout=600)
    hint = f"wan_triton must be installed for this test ({INSTALL})\n" if "No module named" in r.stderr else ""
    assert r.returncode == 0, hint + r.stderr[-3000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    pkg = Path(out["wan_triton_file"]).parent
    assert Path(out["kernels_file"]).parent == pkg / "kernels"
    if out["hf_kernels"]:  # both installed side by side: each its own
        assert Path(out["hf_kernels"]).parent != pkg / "kernels"
    assert out["shape"] == [3, 5, 128, 128]
    for op in ("rms_norm", "rms_norm_rope", "modulate", "gated_residual"):
        assert out["launches"][op] > 0, out["launches"]


def test_wan_generate_writes_video_from_outside_the_root(tmp_path):
    """As a user runs it: on a GPU machine the default device is the GPU and the kernels compile (no
    interpreter: under it, kernels on CUDA tensors run through the host, ~25 s for one step on an
    H100), elsewhere the CPU under the interpreter."""
    pytest.importorskip("triton")
    import torch

    exe = _script("wan-generate")
    assert exe, f"the console script wan-generate is not installed for {sys.executable}: {INSTALL}"
    cuda = torch.cuda.is_available()
    r = subprocess.run([exe, "--frame_num", "5", "--sample_steps", "1", "--save_file", "out.mp4"],
                       cwd=_outside(tmp_path), env=_env(interpret=not cuda), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # patched, not the reference left in place
    assert ("(CUDA, strict)" if cuda else "Triton interpreter on CPU") in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_installed_names_are_ours():
    """The installed distribution's top-level import names: `wan` and `wan_triton`, nothing else."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("wan-triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"wan-triton is not installed for {sys.executable}: {INSTALL}")
    assert sorted((dist.read_text("top_level.txt") or "").split()) == ["wan", "wan_triton"]
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"wan-generate": "wan_triton.console:generate", "wan-benchmark": "wan_triton.console:benchmark"}


def test_the_wheel_holds_the_demo_model(tmp_path):
    """`pip install .` from a clone installs wan/demo_model (setup.py package_data), the default of
    wan-generate: a wheel built from the repository's files (tracked, or new and not ignored: what a
    clone has once they are committed) holds every file of the folder, byte for byte in size. ~10 s."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    shipped = src / "wan" / "demo_model"
    want = {f"wan/demo_model/{p.relative_to(shipped).as_posix()}": p.stat().st_size
            for p in shipped.rglob("*") if p.is_file()}
    assert want, "wan/demo_model is not among the repository's files (commit it)"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "out"), str(src)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("*.whl")
    held = {i.filename: i.file_size for i in zipfile.ZipFile(wheel).infolist()}
    assert {k: held.get(k) for k in want} == want
