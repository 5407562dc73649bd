"""The VAE's dtype as a plan decision (--vae_dtype / optimize(vae_dtype=)): bf16 casts the VAE in
place, is named lossy in the summary and the log, decodes to float32 frames close to the fp32
decode; an unknown dtype is the plan's one-line refusal in both the CLI and the API, before
anything changes; the benchmark records the dtype of each mode. Its quality on a trained VAE is
the gate's "VAE decode in bf16" row (bench/quality.py, tests/test_quality.py)."""
import json
import logging

import pytest
import torch

import wan_triton
from wan.pipeline import WanT2V
from wan_triton.errors import AccelError


@pytest.fixture
def tiny():
    return WanT2V.from_config("tiny", device="cpu", seed=0)


def test_optimize_casts_the_vae_and_says_it_is_lossy(tiny, caplog, seed):
    z = torch.randn(1, tiny.vae.z_dim, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    ref = tiny.vae.decode(z)
    caplog.set_level(logging.INFO)
    applied = wan_triton.optimize(tiny, "none", triton=False, vae_dtype="bf16")
    assert applied.vae_dtype == "bf16" and tiny.vae.dtype_name == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in tiny.vae.parameters())
    assert "VAE in bf16 (lossy)" in applied.summary() and "the VAE runs in bf16: lossy" in caplog.text
    out = tiny.vae.decode(z)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = float((out - ref).norm() / ref.norm())
    print(f"bf16 vs fp32 decode: rel err {err:.2e}")
    assert 0 < err < 0.05  # bf16 rounding through a few conv layers, not a different result
    again = wan_triton.optimize(tiny, "none", triton=False)  # None leaves it
    assert again.vae_dtype == "bf16" and "VAE in bf16" in again.summary()
    assert wan_triton.optimize(tiny, "none", triton=False, vae_dtype="fp32").vae_dtype == "fp32"
    assert next(tiny.vae.parameters()).dtype == torch.float32


def test_an_unknown_dtype_is_one_line_and_changes_nothing(tiny):
    with pytest.raises(AccelError) as err:
        wan_triton.optimize(tiny, "none", triton=False, vae_dtype="fp16")
    assert str(err.value) == "vae_dtype='fp16' is not a VAE dtype; choose from fp32, bf16"
    assert tiny.vae.dtype_name == "fp32"


def test_cli_flag(tmp_path, capsys):
    from wan_triton.generate import main

    out = tmp_path / "v.mp4"
    rc = main(["--task", "tiny", "--vae_dtype", "bf16", "--frame_num", "5", "--sample_steps", "1", "--device", "cpu",
               "--no-triton", "--quiet", "--save_file", str(out)])
    assert rc == 0 and out.stat().st_size > 0
    with pytest.raises(SystemExit) as ex:
        main(["--task", "tiny", "--vae_dtype", "fp16", "--save_file", str(tmp_path / "w.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "--vae_dtype" in err[0] and "fp16" in err[0]
    assert not (tmp_path / "w.mp4").exists()


def test_benchmark_records_the_vae_dtype_per_mode(tmp_path):
    from wan_triton.benchmark import main

    out = tmp_path / "b"
    rc = main(["--task", "tiny", "--vae_dtype", "bf16", "--frame_num", "5", "--sample_steps", "1", "--device", "cpu",
               "--no-triton", "--quiet", "--num_runs", "1", "--warmup", "0", "--out_dir", str(out)])
    assert rc == 0
    (report,) = out.glob("*.json")
    modes = json.loads(report.read_text())["modes"]
    assert modes["reference"]["settings"]["vae_dtype"] == "fp32"
    assert modes["optimized"]["settings"]["vae_dtype"] == "bf16"

