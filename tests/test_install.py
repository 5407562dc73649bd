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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PATCHED_GENERATION = """
import importlib.util, json, sys
import wan_triton
from wan_triton import kernels
from wan.pipeline import WanT2V

hf = importlib.util.find_spec("kernels")  # Hugging Face's package, when transformers brought it
pipe = WanT2V.from_config("tiny", device="cpu")
wan_triton.patch(strict=True)             # strict: any fallback to the reference raises
video = pipe.generate("a red ball", size=(128, 128), frame_num=5, sampling_steps=1, seed=0, progress=False)
stats = wan_triton.kernel_stats()
wan_triton.unpatch()
print(json.dumps(dict(kernels_file=kernels.__file__, wan_triton_file=wan_triton.__file__,
                      hf_kernels=hf.origin if hf else None, shape=list(video.shape),
                      launches={op: s["launches"] for op, s in stats.items()})))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["TRITON_INTERPRET"] = "1"  # the kernels run on CPU tensors under the interpreter
    return env


def _outside(tmp_path: Path) -> Path:
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return tmp_path


def test_patch_launches_kernels_from_outside_the_root(tmp_path):
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _PATCHED_GENERATION], cwd=_outside(tmp_path), env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, ("wan_triton must be installed (pip install -e .) for this test:\n"
                               + r.stderr[-3000:])
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
    pytest.importorskip("triton")
    exe = shutil.which("wan-generate")
    assert exe, "the console script wan-generate is not on PATH: pip install -e ."
    r = subprocess.run([exe, "--frame_num", "5", "--sample_steps", "1", "--save_file", "out.mp4"],
                       cwd=_outside(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Triton interpreter on CPU" in r.stderr  # patched, not the reference left in place
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_installed_names_are_ours():
    """The installed distribution's top-level import names: `wan` and `wan_triton`, nothing else."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("wan-triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("wan-triton is not installed: pip install -e .")
    assert sorted((dist.read_text("top_level.txt") or "").split()) == ["wan", "wan_triton"]
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"wan-generate": "wan_triton.generate:main", "wan-benchmark": "wan_triton.benchmark:main"}
