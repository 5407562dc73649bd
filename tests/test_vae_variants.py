"""The VAE decode's variants (bench/bench_vae.py measures them at 720p on a GPU): channels-last
3-D convolutions compute the same decode (on the CPU bit for bit; on a GPU other cuDNN kernels,
so close, not equal), and a bf16 VAE's frames stay close to the fp32 frames (PSNR measured
47.8 dB on the tiny preset's random VAE at 64x64; held to >= 40 dB here). On the CPU with the
tiny preset's VAE: the full VAE's bf16 convolutions take minutes on a CPU."""
import json
import math

import pytest
import torch

from bench.bench_vae import main, psnr
from wan.configs import get_config
from wan.vae import WanVAE


def _z(seed):
    return torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_channels_last_decode_is_the_same_decode(seed):
    z = _z(seed)
    vae = WanVAE.from_config(get_config("tiny").vae, seed=seed % 1000)
    with torch.no_grad():
        ref = vae.decode(z)
        vae.use_channels_last()
        assert vae.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        out = vae.decode(z)
        vae.use_channels_last(False)
        assert vae.decoder.conv1.weight.is_contiguous() and torch.equal(vae.decode(z), ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_decode_psnr_against_fp32(seed):
    z = _z(seed)
    cfg = get_config("tiny").vae
    with torch.no_grad():
        ref = WanVAE.from_config(cfg, seed=3).decode(z)
        out = WanVAE.from_config(cfg, seed=3, dtype=torch.bfloat16).decode(z)
    db, top = psnr(out, ref)
    print(f"bf16 VAE decode vs fp32: PSNR {db:.1f} dB, max abs {top:.3e}")
    assert out.dtype == torch.float32 and 40.0 <= db < math.inf and top < 0.5


@pytest.mark.interpreter  # the kernels on CPU tensors: a child pytest with TRITON_INTERPRET=1 on a GPU machine
def test_bench_vae_smoke(tmp_path):
    out = tmp_path / "vae.json"
    assert main(["--smoke", "--variants", "fp32,fp32-cl,fp32-k,fp32-b", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["fp32", "fp32-cl", "fp32-k", "fp32-b"] and rows[1]["psnr_db"] >= 80
    assert rows[2]["kernel"] and rows[2]["psnr_db"] >= 80  # the fused norm + SiLU: fp32 rounding only
    assert rows[3]["cudnn_benchmark"] and not any(r["cudnn_benchmark"] for r in rows[:3])
    assert not torch.backends.cudnn.benchmark  # left as PyTorch's default after the run
