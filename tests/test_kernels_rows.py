"""Per-token rows kernels (modulate_rows, gated_residual_rows: the TI2V image mode's two timesteps)
against the wan reference on float64-upcast inputs, with NaN-poisoned outputs (tests/test_kernels.py's
helpers); the patched DiT with per-token timesteps runs them (strict, counted) and matches the
reference model."""
from __future__ import annotations

import pytest
import torch

import wan.dit as wd
import wan_triton
from conftest import DEVICE
from test_kernels import BF16, EPS, F16, F32, _check, _randn, poison  # noqa: F401 - poison is an autouse fixture
from wan.configs import DiTConfig
from wan.tokens import TokenTimesteps
from wan_triton import kernels


def _index(B, L, K, per_sample: bool, dtype=torch.int32):
    idx = torch.randint(0, K, (B if per_sample else 1, L), device=DEVICE).to(dtype)
    idx[:, 0] = K - 1  # the last row is read
    return idx


@pytest.mark.parametrize("xdt", [F32, BF16, F16])
@pytest.mark.parametrize("C", [96, 5121])
@pytest.mark.parametrize("out_dtype", [None, BF16])
@pytest.mark.parametrize("per_sample_index", [False, True])
def test_modulate_rows(seed, xdt, C, out_dtype, per_sample_index):
    B, L, K = 2, (3 if C > 1000 else 17), 2
    x = _randn(B, L, C, dtype=xdt, scale=2.0) + 0.5
    m = _randn(K, 6, C, scale=0.5)  # strided views, as in the block: m[:, 3], m[:, 4]
    shift, scale = m[:, 3], m[:, 4]
    assert not shift.is_contiguous()
    index = _index(B, L, K, per_sample_index)
    out = kernels.modulate_rows(x, shift, scale, index, EPS, out_dtype)
    assert out.dtype == wd.modulate_rows(x, shift, scale, index, EPS, out_dtype).dtype
    ref = wd.modulate_rows(x.double(), shift.double(), scale.double(), index, EPS)
    _check(out, ref.expand(B, L, C), xdt, out_dtype)


def test_modulate_rows_wide_row_loops_and_int64_index(seed):
    x = _randn(1, 4, 8200, dtype=BF16)
    hm = _randn(3, 2, 8200, scale=0.5)  # a head-like [K, 2, C] table, K = 3
    index = _index(1, 4, 3, True, torch.int64)
    out = kernels.modulate_rows(x, hm[:, 0], hm[:, 1], index, EPS)
    _check(out, wd.modulate_rows(x.double(), hm[:, 0].double(), hm[:, 1].double(), index, EPS), BF16)


@pytest.mark.parametrize("xdt,ydt,gdt", [(F32, BF16, F32), (BF16, BF16, F32), (F32, F32, F32), (BF16, BF16, BF16)])
@pytest.mark.parametrize("C", [96, 5121])
@pytest.mark.parametrize("per_sample_index", [False, True])
def test_gated_residual_rows(seed, xdt, ydt, gdt, C, per_sample_index):
    B, L, K = 2, (3 if C > 1000 else 19), 2
    x = _randn(B, L, C, dtype=xdt, scale=2.0)
    y = _randn(B, L, C, dtype=ydt)
    gate = _randn(K, 6, C, dtype=gdt, scale=0.5)[:, 2]
    index = _index(B, L, K, per_sample_index)
    out = kernels.gated_residual_rows(x, y, gate, index)
    assert out.dtype == wd.gated_residual_rows(x, y, gate, index).dtype
    _check(out, wd.gated_residual_rows(x.double(), y.double(), gate.double(), index), out.dtype)
    assert out.data_ptr() not in (x.data_ptr(), y.data_ptr())


def test_rows_supports_say_why(seed):
    x, y = _randn(2, 5, 64), _randn(2, 5, 64)
    t = _randn(2, 64)
    idx = _index(2, 5, 2, True)
    assert kernels.modulate_rows_supports(x, t, t, idx, EPS) == (True, "")
    assert kernels.gated_residual_rows_supports(x, y, t, idx) == (True, "")
    cases = [
        (kernels.modulate_rows_supports(x, t, t, idx.float(), EPS), "index dtype"),
        (kernels.modulate_rows_supports(x, t, t, idx[:, :4], EPS), "does not cover"),
        (kernels.modulate_rows_supports(x, _randn(2, 63), t, idx, EPS), "is not [K, 64]"),
        (kernels.modulate_rows_supports(x[0], t, t, idx, EPS), "[B, L, C]"),
        (kernels.modulate_rows_supports(x, t, t, idx, EPS, torch.int8), "out_dtype"),
        (kernels.gated_residual_rows_supports(x, y[:, :4], t, idx), "not the same"),
        (kernels.gated_residual_rows_supports(x, y, t, idx.double()), "index dtype"),
    ]
    for (ok, why), words in cases:
        assert not ok and words in why, (why, words)


def test_patched_dit_runs_the_rows_kernels(seed):
    """The TI2V image mode through a patched model (strict: a fallback would raise): the rows
    kernels run, and the output matches the reference model's."""
    cfg = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                    num_heads=2, num_layers=2, text_len=16)
    model = wd.WanModel.from_config(cfg, device=DEVICE, seed=seed, zero_head=False)
    x = torch.randn(1, 48, 2, 4, 6, device=DEVICE)
    ctx = [torch.randn(5, 32, device=DEVICE)]
    tt = TokenTimesteps.first_frame(torch.tensor(700, device=DEVICE), 6, 12)
    ref = model(x, tt, ctx)
    wan_triton.reset_kernel_stats()
    with wan_triton.patched(strict=True):
        out = model(x, tt, ctx)
    stats = wan_triton.kernel_stats()
    assert stats["modulate_rows"]["launches"] == 2 * 2 + 1  # two per block, one in the head
    assert stats["gated_residual_rows"]["launches"] == 2 * 2
    assert stats["modulate"]["launches"] == 0 and stats["modulate_rows"]["fallbacks"] == 0
    err = ((out - ref).norm() / ref.norm()).item()
    print("relative error in norm", err)
    assert err < 1e-4


def test_fp8_linears_with_per_token_timesteps(seed):
    """fp8 (lossy, opt-in) on the TI2V image mode: the fp8 linears get the token rows gathered to
    [B, L, C] and quantize them in their own kernel; close to the exact model, as for T2V."""
    from wan_triton import fp8

    cfg = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                    num_heads=2, num_layers=2, text_len=16)
    model = wd.WanModel.from_config(cfg, device=DEVICE, seed=seed, zero_head=False)
    x = torch.randn(1, 48, 2, 4, 6, device=DEVICE)
    ctx = [torch.randn(5, 32, device=DEVICE)]
    tt = TokenTimesteps.first_frame(torch.tensor(700, device=DEVICE), 6, 12)
    with torch.no_grad():
        ref = model(x, tt, ctx)
        fp8.quantize_model(model, progress=False, keep_original=True)
        fp8.reset_fp8_stats()
        out = model(x, tt, ctx)
    assert fp8.fp8_stats()["modulate_quant_fp8"]["launches"] == 2 * cfg.num_layers
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"fp8 rel. error {rel:.4f}")
    assert 0 < rel < 0.05
