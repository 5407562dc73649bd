"""The VAE's fused RMSNorm + SiLU kernel (wan_triton/kernels/vae_norm.py) against wan.vae.rms_norm_silu.

Without CUDA the kernel runs through the Triton interpreter on small shapes. Outputs are written
into NaN-filled buffers (torch.empty_like poisoned), so an element the kernel misses shows up.
"""
from __future__ import annotations

import pytest
import torch

import wan.vae as wv
from conftest import DEVICE, tol
from wan_triton.kernels.vae_norm import MAX_CHANNELS, rms_norm_silu, rms_norm_silu_supports

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    real = torch.empty_like

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", poisoned)


def _inputs(c, shape_thw, dtype, layout="contiguous", b=2, spread=3.0):
    x = (torch.randn(b, c, *shape_thw, dtype=torch.float64) * spread).to(dtype)
    gamma = (torch.rand(c, 1, 1, 1, dtype=torch.float64) * 2 - 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "frames_first":  # [B, T, C, H, W] memory, as wan.vae._batch_to_frames returns it
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(DEVICE), gamma.to(DEVICE), c ** 0.5


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "frames_first"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("c", [8, 96, 40])
def test_parity_with_the_reference(seed, c, dtype, layout):
    x, gamma, scale = _inputs(c, (3, 5, 7), dtype, layout)
    out = rms_norm_silu(x, gamma, scale)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) elements"
    exact = wv.rms_norm_silu(x.double(), gamma.double(), scale)
    torch.testing.assert_close(out.double(), exact, **tol(dtype))
    same_dtype = wv.rms_norm_silu(x, gamma, scale)
    if dtype == F32:
        torch.testing.assert_close(out, same_dtype, atol=1e-6, rtol=2e-6)
    else:  # the same roundings: equal but where the norm's last bit differs (sum order)
        assert (out == same_dtype).float().mean() >= 0.98
        torch.testing.assert_close(out.float(), same_dtype.float(), **tol(dtype))


def test_zero_vectors_and_one_channel(seed):
    x, gamma, scale = _inputs(4, (2, 3, 3), F32)
    x[:, :, 0] = 0  # a zero channel vector: the clamp keeps the division finite, the output is 0
    out = rms_norm_silu(x, gamma, scale)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out, wv.rms_norm_silu(x, gamma, scale), atol=1e-6, rtol=2e-6)
    x1, g1, s1 = _inputs(1, (2, 2, 3), F32)
    torch.testing.assert_close(rms_norm_silu(x1, g1, s1), wv.rms_norm_silu(x1, g1, s1), atol=1e-6, rtol=2e-6)


def test_supports_says_why():
    x, gamma, scale = _inputs(8, (2, 3, 3), F32)
    assert rms_norm_silu_supports(x, gamma, scale) == (True, "")
    cases = [
        (x[:, :, 0], gamma, "is not [B, C, T, H, W]"),
        (x, gamma[:4], "one value per channel"),
        (x, gamma.to(F16), "promoted"),
        (x.transpose(3, 4), gamma, "H and W are not one run"),
        (x[:, :, :, :, :2], gamma, "not dense"),
        (x.to(torch.float64), gamma.to(torch.float64), "dtype"),
    ]
    for xx, gg, words in cases:
        ok, why = rms_norm_silu_supports(xx, gg, scale)
        assert not ok and words in why, why
    wide = torch.zeros(1, MAX_CHANNELS + 1, 1, 1, 1, device=DEVICE)
    ok, why = rms_norm_silu_supports(wide, torch.ones(MAX_CHANNELS + 1, device=DEVICE), 1.0)
    assert not ok and "at most" in why


def test_reference_equals_the_module_pair(seed):
    """wan.vae.rms_norm_silu is exactly what the blocks computed before: SiLU(RMSNorm(x))."""
    norm = wv.RMSNorm(6)
    with torch.no_grad():
        norm.gamma.uniform_(-1, 2)
    x = torch.randn(1, 6, 2, 3, 4)
    assert torch.equal(wv.rms_norm_silu(x, norm.gamma, norm.scale), torch.nn.SiLU()(norm(x)))


def test_patch_puts_the_kernel_in_the_vae_and_unpatch_takes_it_out(seed):
    """patch() binds wan.vae.rms_norm_silu (under the rms_norm flag): a decoder's residual blocks
    and head run the kernel, the decode matches the reference's, unpatch() restores the function."""
    import wan_triton

    original = wv.rms_norm_silu
    dec = wv.Decoder3d(dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                       temperal_upsample=[False], dropout=0.0).to(DEVICE).eval()
    z = torch.randn(1, 4, 2, 4, 4, device=DEVICE)  # 2 frames: the upsample hands back frames-first memory
    with torch.no_grad():
        ref = dec(z)
    wan_triton.reset_kernel_stats()
    done = wan_triton.patch(rms_norm=True, rope=False, modulation=False, residual=False, cfg=False)
    try:
        assert "wan.vae.rms_norm_silu" in done and wv.rms_norm_silu is not original
        with torch.no_grad():
            out = dec(z)
        stats = wan_triton.kernel_stats()["rms_norm_silu"]
        assert stats["launches"] > 0 and stats["fallbacks"] == 0
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    finally:
        wan_triton.unpatch()
    assert wv.rms_norm_silu is original


@pytest.mark.gpu
@pytest.mark.parametrize("c, thw", [(384, (3, 90, 160)), (96, (4, 720, 1280))])
def test_parity_at_the_720p_decoder_shapes(seed, c, thw):
    """The real decoder's widest and largest calls (bf16: every element as the reference's)."""
    for layout in ("contiguous", "channels_last", "frames_first"):
        x, gamma, scale = _inputs(c, thw, BF16, layout, b=1)
        out = rms_norm_silu(x, gamma, scale)
        ref = wv.rms_norm_silu(x, gamma, scale)
        assert torch.isfinite(out).all() and out.stride() == x.stride()
        assert (out == ref).float().mean() >= 0.98, layout
        torch.testing.assert_close(out.float(), ref.float(), **tol(BF16))
        del x, out, ref
