"""Parity of the Triton kernels (wan_triton/kernels/) with the wan reference ops.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so CPU shapes stay small; tests marked `gpu` run the real 720p sizes and a
tensor past 2^31 elements.

References: the wan function on float64-upcast inputs, compared with the conftest tolerance of
the least precise dtype involved. RoPE outputs computed from a 16-bit rounded intermediate (the
fused RMSNorm+RoPE must round the normalised value to x's dtype, as the official code does) are
compared pair by pair: |z_out - z_ref| <= atol + rtol * |z_ref| for each complex pair z, because a
rotation can make one component much smaller than the rounding error of the two it mixes, while
the rounding error relative to the pair's modulus stays bounded (rotations preserve it).

Every kernel call runs with `torch.empty` poisoned (NaN-filled), so any element a kernel fails
to write shows up as a mismatch.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan_triton import kernels
import wan.dit as wd
import wan.pipeline as wp
from conftest import DEVICE, TOLERANCES, tol

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _loosest(*dtypes):
    dts = [d for d in dtypes if d is not None]
    return max(dts, key=lambda d: TOLERANCES[d][0])


def _check(out, ref, *dtypes):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten poisoned output?)"
    torch.testing.assert_close(out.double(), ref.double(), **tol(_loosest(*dtypes)))


def _check_pairs(out, ref, *dtypes):
    """Pairwise (complex) comparison for RoPE outputs, see the module docstring."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten poisoned output?)"
    atol, rtol = TOLERANCES[_loosest(*dtypes)]
    zo = out.double().unflatten(-1, (-1, 2))
    zr = ref.double().unflatten(-1, (-1, 2))
    err = (zo - zr).norm(dim=-1)
    bound = atol + rtol * zr.norm(dim=-1)
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} / {bad.numel()} pairs off; worst excess "
                           f"{float((err - bound).max()):.3g}, max err {float(err.max()):.3g}")


def _randn(*shape, dtype=F32, device=DEVICE, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


@pytest.fixture(autouse=True)
def poison(monkeypatch, request):
    """torch.empty returns NaN-filled (int: -7-filled) memory for the duration of each test
    (not for tests marked `no_poison = True`, e.g. where a compiler allocates through it)."""
    if getattr(request.function, "no_poison", False):
        yield
        return
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        with torch.no_grad():
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool:
                t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    yield


GRID_2 = torch.tensor([[3, 5, 7], [2, 3, 4]])  # 105 and 24 valid tokens; L=110 pads both


# ------------------------------------------------------------------------------------------
# dispatch / import
# ------------------------------------------------------------------------------------------

def test_triton_path_is_taken():
    x = _randn(2, 3, 96)
    w = _randn(96)
    assert kernels.triton_available()
    assert kernels.rms_norm_supports(x, w, EPS) == (True, ""), "the kernels must run here (CUDA or interpreter)"
    ok, why = kernels.rms_norm_supports(x.double(), w.double(), EPS)
    assert not ok and "float64" in why


def test_kernels_is_a_leaf():
    """wan_triton/kernels imports nothing of wan or of the rest of wan_triton (and holds no reference
    math): loaded on its own, as a top-level package under another name, it pulls in neither."""
    pkg = ROOT / "wan_triton" / "kernels"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('leaf', {str(pkg / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(pkg)!r}])\n"
            "leaf = importlib.util.module_from_spec(spec); sys.modules['leaf'] = leaf; spec.loader.exec_module(leaf)\n"
            "bad = [m for m in sys.modules if m == 'wan' or m.startswith(('wan.', 'wan_triton'))]; assert not bad, bad\n"
            "assert leaf.rms_norm and not [n for n in dir(leaf) if n.startswith('torch_')]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for path in pkg.glob("*.py"):
        src = path.read_text()
        assert "import wan" not in src and "from wan" not in src, path


def test_import_without_interpret_and_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from wan_triton import kernels; x = torch.randn(2, 8)\n"
            "ok, why = kernels.rms_norm_supports(x, torch.ones(8), 1e-6)\n"
            "assert not ok and 'TRITON_INTERPRET' in why, why")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # triton missing: imports, every support check says why
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch; from wan_triton import kernels\n"
            "assert not kernels.triton_available()\n"
            "x = torch.randn(1, 4, 8); m = torch.randn(1, 6, 8)\n"
            "ok, why = kernels.modulate_supports(x, m[:, 0:1], m[:, 1:2], 1e-6)\n"
            "assert not ok and why == 'Triton is not installed', why")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_supports_says_why(monkeypatch):
    """Each check names what the kernel does not cover; a covered call says (True, '')."""
    x, w = _randn(2, 5, 64), _randn(64)
    g, fr = GRID_2, wd.rope_freqs(32)
    xq = _randn(2, 110, 2, 32)
    m = _randn(2, 6, 64)
    cases = [
        (kernels.rms_norm_supports(x, _randn(32), EPS), "weight"),
        (kernels.modulate_supports(x[0], m[:, 0:1], m[:, 1:2], EPS), "[B, L, C]"),
        (kernels.modulate_supports(x, m[:, 0:1], m[:, 1:2], EPS, torch.int8), "out_dtype"),
        (kernels.modulate_supports(x, _randn(3, 1, 64), m[:, 1:2], EPS), "broadcast"),
        (kernels.gated_residual_supports(x, x[:, :2], m[:, 2:3]), "same"),
        (kernels.cfg_combine_supports(x, x[:1], 5.0), "shape"),
        (kernels.rope_apply_supports(xq, g, wd.rope_freqs(64)), "freqs"),
        (kernels.rope_apply_supports(xq, g[:1], fr), "grid_sizes"),
        (kernels.rope_apply_supports(xq, g, fr, token_offset=-1), "token_offset"),
        (kernels.rms_norm_rope_supports(x, w, EPS, 3, g, fr), "num_heads=3"),
        (kernels.rms_norm_rope_supports(_randn(2, 5, 64, device="meta"), w, EPS, 2, g, fr), "meta"),
    ]
    for (ok, why), words in cases:
        assert not ok and words in why, (why, words)
    for ok_why in (kernels.rms_norm_supports(x, w, EPS), kernels.modulate_supports(x, m[:, 0:1], m[:, 1:2], EPS),
                   kernels.gated_residual_supports(x, x, m[:, 2:3]), kernels.cfg_combine_supports(x, x, 5.0),
                   kernels.rope_apply_supports(xq, g, fr, 7), kernels.rms_norm_rope_supports(x, w, EPS, 2, g, fr)):
        assert ok_why == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET" in kernels.rms_norm_supports(x, w, EPS)[1]


@pytest.mark.parametrize("head_dim", [2, 12, 32, 96, 128])
def test_rope_split_is_wans(head_dim):
    assert kernels.rope_split(head_dim) == wd.rope_split(head_dim)[:2]


# ------------------------------------------------------------------------------------------
# rms_norm
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xdt,wdt", [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F32), (F16, F16)])
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 3, 5120), (2, 3, 5121), (37, 24)])
def test_rms_norm(seed, xdt, wdt, shape):
    x = _randn(*shape, dtype=xdt, scale=3.0)
    w = _randn(shape[-1], dtype=wdt)
    out = kernels.rms_norm(x, w, EPS)
    assert out.dtype == wd.rms_norm(x, w, EPS).dtype == torch.promote_types(xdt, wdt)
    _check(out, wd.rms_norm(x.double(), w.double(), EPS), xdt, wdt)


def test_rms_norm_wide_row_loops(seed):
    """Width past the one-pass cap (8192): the looped two-read path."""
    x = _randn(3, 9000, dtype=BF16)
    w = _randn(9000)
    _check(kernels.rms_norm(x, w, EPS), wd.rms_norm(x.double(), w.double(), EPS), BF16)


def test_rms_norm_strided_rows(seed):
    base = _randn(4, 2, 160)
    x = base[:, 1, :]          # row stride 320
    w = _randn(160)
    _check(kernels.rms_norm(x, w, EPS), wd.rms_norm(x.double(), w.double(), EPS), F32)


# ------------------------------------------------------------------------------------------
# rope_apply
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("heads,head_dim", [(3, 128), (2, 12), (1, 96)])
def test_rope_apply(seed, dtype, heads, head_dim):
    """Batch 2, different grids per sample, padding tokens past F*H*W in both samples."""
    x = _randn(2, 110, heads, head_dim, dtype=dtype, scale=2.0)
    fr = wd.rope_freqs(head_dim)
    out = kernels.rope_apply(x, GRID_2, fr)
    assert out.dtype == torch.float32
    ref = wd.rope_apply(x.double(), GRID_2, fr)  # float64 inside
    # inputs are exact in float64 and RoPE has no intermediate rounding: fp32 tolerance
    _check(out, ref, F32)
    # padding tokens pass through bit-exactly
    assert torch.equal(out[0, 105:], x[0, 105:].float()) and torch.equal(out[1, 24:], x[1, 24:].float())


@pytest.mark.parametrize("offset", [0, 17, 100, 130])
def test_rope_token_offset(seed, offset):
    """A sequence-parallel slice: local token n is global token n + offset (100 and 130 run into
    and past the padding of both samples)."""
    x = _randn(2, 12, 2, 32, scale=2.0)
    fr = wd.rope_freqs(32)
    out = kernels.rope_apply(x, GRID_2, fr, token_offset=offset)
    _check(out, wd.rope_apply(x.double(), GRID_2, fr, token_offset=offset), F32)
    xc = _randn(2, 12, 64, dtype=BF16, scale=2.0)
    w = 1 + _randn(64, scale=0.2)
    out = kernels.rms_norm_rope(xc, w, EPS, 2, GRID_2, fr, BF16, token_offset=offset)
    native = wd.rms_norm_rope(xc, w, EPS, 2, GRID_2, fr, BF16, token_offset=offset)
    assert out.dtype == native.dtype == BF16
    _check_pairs(out, wd.rms_norm_rope(xc.double(), w.double(), EPS, 2, GRID_2, fr, token_offset=offset), BF16)


def test_rope_apply_noncontiguous_and_grid_on_device(seed):
    base = _randn(2, 4, 110, 64)                 # [B, H, L, D] -> view [B, L, H, D]
    x = base.transpose(1, 2)
    fr = wd.rope_freqs(64)
    g = torch.tensor([[2, 4, 5], [3, 2, 3]], device=DEVICE)
    _check(kernels.rope_apply(x, g, fr.to(DEVICE)), wd.rope_apply(x.double(), g.cpu(), fr), F32)


def test_rope_large_positions(seed):
    """Positions up to the 720p grid's extents (f < 21, h < 45, w < 80) on short sequences."""
    fr = wd.rope_freqs(128)
    g = torch.tensor([[21, 2, 2], [2, 45, 2], [1, 1, 80]])
    x = _randn(3, 180, 1, 128)
    _check(kernels.rope_apply(x, g, fr), wd.rope_apply(x.double(), g, fr), F32)


def test_rope_cos_sin_cached():
    fr = wd.rope_freqs(128)
    t1 = kernels.rope_cos_sin(fr, DEVICE)
    t2 = kernels.rope_cos_sin(fr, DEVICE)
    assert t1 is t2 and t1.dtype == torch.float32 and t1.shape == (1024, 64, 2)
    torch.testing.assert_close(t1[..., 0].double().cpu(), fr.real, atol=1e-7, rtol=0)
    torch.testing.assert_close(t1[..., 1].double().cpu(), fr.imag, atol=1e-7, rtol=0)
    assert kernels.rope_cos_sin(fr.clone(), DEVICE) is not t1


# ------------------------------------------------------------------------------------------
# rms_norm_rope
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xdt,wdt", [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F32), (F32, None),
                                     (BF16, None)])
@pytest.mark.parametrize("out_dtype", [None, BF16])
def test_rms_norm_rope(seed, xdt, wdt, out_dtype):
    heads, hd = 3, 128
    x = _randn(2, 110, heads * hd, dtype=xdt, scale=2.0)
    w = None if wdt is None else (1 + _randn(heads * hd, scale=0.2)).to(wdt)
    fr = wd.rope_freqs(hd)
    out = kernels.rms_norm_rope(x, w, EPS, heads, GRID_2, fr, out_dtype)
    native = wd.rms_norm_rope(x, w, EPS, heads, GRID_2, fr, out_dtype)
    assert out.dtype == native.dtype and out.shape == native.shape == (2, 110, heads, hd)
    ref = wd.rms_norm_rope(x.double(), None if w is None else w.double(), EPS, heads, GRID_2, fr)
    if xdt == F32 or w is None:   # no 16-bit intermediate rounding: element-wise
        _check(out, ref, F32, out_dtype)
    else:
        _check_pairs(out, ref, xdt, wdt, out_dtype)


def test_rms_norm_rope_real_width(seed):
    """C = 5120 = 40 heads x 128, bf16 in / bf16 out as in the model, with padding tokens."""
    x = _randn(1, 14, 5120, dtype=BF16, scale=4.0)
    w = 1 + _randn(5120, scale=0.2)
    fr = wd.rope_freqs(128)
    g = torch.tensor([[1, 3, 4]])
    out = kernels.rms_norm_rope(x, w, EPS, 40, g, fr, BF16)
    _check_pairs(out, wd.rms_norm_rope(x.double(), w.double(), EPS, 40, g, fr), BF16)


def test_rms_norm_rope_wide_row_loops(seed):
    """C = 72 x 128 = 9216 > 8192: the looped path (two reads)."""
    x = _randn(1, 3, 72 * 128)
    w = _randn(72 * 128)
    fr = wd.rope_freqs(128)
    g = torch.tensor([[1, 1, 2]])
    out = kernels.rms_norm_rope(x, w, EPS, 72, g, fr)
    _check(out, wd.rms_norm_rope(x.double(), w.double(), EPS, 72, g, fr), F32)


@pytest.mark.parametrize("xdt", [F32, BF16])
def test_rms_norm_rope_is_composition(seed, xdt):
    """Fused kernel == rope_apply(rms_norm(x)) through the kernels and through the reference."""
    heads, hd = 2, 64
    x = _randn(2, 110, heads * hd, dtype=xdt)
    w = _randn(heads * hd)
    fr = wd.rope_freqs(hd)
    fused = kernels.rms_norm_rope(x, w, EPS, heads, GRID_2, fr)
    comp = kernels.rope_apply(kernels.rms_norm(x, w, EPS).unflatten(-1, (heads, hd)), GRID_2, fr)
    # Both round the normalised value to x's dtype; with bf16 x, a different fp32 reduction order
    # can put a value on the other side of a bf16 rounding boundary (one bf16 ulp, ~0.4 %).
    torch.testing.assert_close(fused, comp, **tol(xdt))
    ref = wd.rope_apply(wd.rms_norm(x.double(), w.double(), EPS).unflatten(-1, (heads, hd)), GRID_2, fr)
    _check_pairs(fused, ref, xdt)


# ------------------------------------------------------------------------------------------
# modulate
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xdt", [F32, BF16, F16])
@pytest.mark.parametrize("C", [96, 5120, 5121])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("out_dtype", [None, BF16])
def test_modulate(seed, xdt, C, per_token, out_dtype):
    B, L = 2, (3 if C > 1000 else 17)
    x = _randn(B, L, C, dtype=xdt, scale=2.0) + 0.5
    if per_token:
        shift, scale = _randn(B, L, C, scale=0.5), _randn(B, L, C, scale=0.5)
    else:
        m = _randn(B, 6, C, scale=0.5)        # strided views, as in the block
        shift, scale = m[:, 0:1], m[:, 1:2]
        assert not shift.is_contiguous()
    out = kernels.modulate(x, shift, scale, EPS, out_dtype)
    assert out.dtype == wd.modulate(x, shift, scale, EPS, out_dtype).dtype
    ref = wd.modulate(x.double(), shift.double(), scale.double(), EPS)
    _check(out, ref, xdt, out_dtype)


def test_modulate_wide_row_loops(seed):
    x = _randn(2, 2, 8200, dtype=BF16)
    m = _randn(2, 6, 8200, scale=0.5)
    out = kernels.modulate(x, m[:, 3:4], m[:, 4:5], EPS)
    _check(out, wd.modulate(x.double(), m[:, 3:4].double(), m[:, 4:5].double(), EPS), BF16)


@pytest.mark.parametrize("xdt", [F32, BF16])
@pytest.mark.parametrize("C", [96, 5120, 8200])
@pytest.mark.parametrize("out_dtype", [None, BF16, F32])
def test_layer_norm_affine(seed, xdt, C, out_dtype):
    """norm3's LayerNorm (fp32 statistics and affine, x.float()), stored in out_dtype (default x's): against
    the float64 reference; 8200 columns take the looped path."""
    x = _randn(2, 3 if C > 1000 else 17, C, dtype=xdt, scale=2.0) + 0.5
    w, b = _randn(C, scale=0.5) + 1.0, _randn(C, scale=0.5)
    out = kernels.layer_norm(x, w, b, EPS, out_dtype)
    assert out.dtype == wd.layer_norm(x, w, b, EPS, out_dtype).dtype == (out_dtype or xdt)
    ref = wd.layer_norm(x.double(), w.double(), b.double(), EPS)
    _check(out, ref, xdt, out_dtype)


def test_layer_norm_bf16_out_is_the_cast_of_fp32_out(seed):
    """The bf16 output is the fp32 output rounded (what autocast's cast of it gave the q Linear)."""
    x, w, b = _randn(2, 7, 80), _randn(80) + 1.0, _randn(80)
    _same(kernels.layer_norm(x, w, b, EPS, BF16), kernels.layer_norm(x, w, b, EPS).bfloat16())


def test_layer_norm_without_affine_or_row_shape_is_refused():
    x = _randn(2, 7, 80)
    assert kernels.layer_norm_supports(x, None, None, EPS) == (False, "no affine weight and bias")
    assert not kernels.layer_norm_supports(x, _randn(81), _randn(81), EPS)[0]
    assert not kernels.layer_norm_supports(x[0], _randn(80), _randn(80), EPS)[0]


def test_modulate_head_broadcast(seed):
    """Head: shift/scale from hm [B, 2, C], fp32 x."""
    x = _randn(2, 9, 160)
    hm = _randn(2, 2, 160, scale=0.5)
    out = kernels.modulate(x, hm[:, 0:1], hm[:, 1:2], EPS)
    _check(out, wd.modulate(x.double(), hm[:, 0:1].double(), hm[:, 1:2].double(), EPS), F32)


# ------------------------------------------------------------------------------------------
# gated_residual
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xdt,ydt,gdt", [(F32, BF16, F32), (BF16, BF16, F32), (F32, F32, F32),
                                         (BF16, BF16, BF16), (F16, F16, F32)])
@pytest.mark.parametrize("C", [96, 5120, 5121])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual(seed, xdt, ydt, gdt, C, per_token):
    B, L = 2, (3 if C > 1000 else 19)
    x = _randn(B, L, C, dtype=xdt, scale=2.0)
    y = _randn(B, L, C, dtype=ydt)
    if per_token:
        gate = _randn(B, L, C, dtype=gdt, scale=0.5)
    else:
        gate = _randn(B, 6, C, dtype=gdt, scale=0.5)[:, 2:3]
    out = kernels.gated_residual(x, y, gate)
    assert out.dtype == wd.gated_residual(x, y, gate).dtype
    ref = wd.gated_residual(x.double(), y.double(), gate.double())
    _check(out, ref, out.dtype)
    # out of place
    assert out.data_ptr() not in (x.data_ptr(), y.data_ptr())


# ------------------------------------------------------------------------------------------
# cfg_combine
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("shape", [(1, 16, 3, 5, 7), (2, 16, 2, 10, 13)])
def test_cfg_combine(seed, dtype, shape):
    u = _randn(*shape, dtype=dtype)
    c = _randn(*shape, dtype=dtype)
    out = kernels.cfg_combine(u, c, 5.0)
    assert out.dtype == wp.cfg_combine(u, c, 5.0).dtype
    _check(out, wp.cfg_combine(u.double(), c.double(), 5.0), dtype)


def test_cfg_combine_noncontiguous(seed):
    u = _randn(16, 1, 4, 6, 5).transpose(0, 1)
    c = _randn(1, 16, 4, 6, 5)
    _check(kernels.cfg_combine(u, c, 3.5), wp.cfg_combine(u.double(), c.double(), 3.5), F32)


# ------------------------------------------------------------------------------------------
# torch.compile traces through the custom ops (no graph break)
# ------------------------------------------------------------------------------------------

def _block_like(x, y, m, w, g, fr):
    u = kernels.modulate(x, m[:, 0:1], m[:, 1:2], EPS, BF16)
    q = kernels.rms_norm_rope(u, w, EPS, 2, g, fr, BF16)
    r = kernels.gated_residual(x, y + q.flatten(2).float(), m[:, 2:3])
    k = kernels.rope_apply(r.unflatten(-1, (2, -1)), g, fr)
    n = kernels.rms_norm(k.flatten(2), w, EPS)
    return kernels.cfg_combine(n[:1], n[1:], 5.0)


def test_torch_compile_fullgraph(seed):
    torch._dynamo.reset()
    B, L, C = 2, 30, 64
    x = _randn(B, L, C)
    y = _randn(B, L, C, dtype=BF16)
    m = _randn(B, 6, C, scale=0.5)
    w = _randn(C)
    g = torch.tensor([[2, 3, 4], [1, 5, 5]], device=DEVICE)
    fr = wd.rope_freqs(32).to(DEVICE)
    eager = _block_like(x, y, m, w, g, fr)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(_block_like, backend=backend, fullgraph=True)
    out = compiled(x, y, m, w, g, fr)
    torch.testing.assert_close(out, eager, **tol(F32))


test_torch_compile_fullgraph.no_poison = True  # Inductor allocates through torch.empty


# ------------------------------------------------------------------------------------------
# GPU: real 720p sizes and a tensor past 2^31 elements
# ------------------------------------------------------------------------------------------

L720 = 21 * 45 * 80  # 75,600 tokens


@pytest.mark.gpu
def test_gpu_rms_norm_real(seed):
    x = _randn(1, L720, 5120, dtype=BF16, scale=3.0)
    w = 1 + _randn(5120, scale=0.2)
    out = kernels.rms_norm(x, w, EPS)
    _check(out, wd.rms_norm(x.double(), w.double(), EPS), BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [None, BF16])
def test_gpu_rms_norm_rope_real(seed, out_dtype):
    x = _randn(1, L720, 5120, dtype=BF16, scale=3.0)
    w = 1 + _randn(5120, scale=0.2)
    fr = wd.rope_freqs(128).to(DEVICE)
    g = torch.tensor([[21, 45, 80]])
    out = kernels.rms_norm_rope(x, w, EPS, 40, g, fr, out_dtype)
    ref = wd.rms_norm_rope(x.double(), w.double(), EPS, 40, g, fr)
    _check_pairs(out, ref, BF16, out_dtype)


@pytest.mark.gpu
def test_gpu_rope_apply_real_batched_cfg(seed):
    """q [2, 75600, 40, 128] fp32: batched CFG, the second sample a smaller grid with padding."""
    x = _randn(2, L720, 40, 128)
    fr = wd.rope_freqs(128).to(DEVICE)
    g = torch.tensor([[21, 45, 80], [21, 40, 80]])
    out = kernels.rope_apply(x, g, fr)
    for b in range(2):  # reference per sample to bound memory
        ref = wd.rope_apply(x[b:b + 1].double(), g[b:b + 1], fr)
        _check(out[b:b + 1], ref, F32)
        del ref


@pytest.mark.gpu
@pytest.mark.parametrize("xdt", [F32, BF16])
def test_gpu_modulate_real(seed, xdt):
    x = _randn(1, L720, 5120, dtype=xdt, scale=2.0)
    m = _randn(1, 6, 5120, scale=0.5)
    out = kernels.modulate(x, m[:, 0:1], m[:, 1:2], EPS, BF16)
    _check(out, wd.modulate(x.double(), m[:, 0:1].double(), m[:, 1:2].double(), EPS), BF16)


@pytest.mark.gpu
def test_gpu_layer_norm_real(seed):
    """norm3 at the 720p shape: the fp32 residual stream in, bf16 out for cross_attn.q."""
    x = _randn(1, L720, 5120, scale=2.0)
    w, b = _randn(5120, scale=0.5) + 1.0, _randn(5120, scale=0.5)
    out = kernels.layer_norm(x, w, b, EPS, BF16)
    _check(out, wd.layer_norm(x.double(), w.double(), b.double(), EPS), BF16)


@pytest.mark.gpu
def test_gpu_gated_residual_real(seed):
    x = _randn(2, L720, 5120)
    y = _randn(2, L720, 5120, dtype=BF16)
    gate = _randn(2, 6, 5120, scale=0.5)[:, 5:6]
    out = kernels.gated_residual(x, y, gate)
    _check(out, wd.gated_residual(x.double(), y.double(), gate.double()), F32)


@pytest.mark.gpu
def test_gpu_cfg_combine_real(seed):
    u = _randn(1, 16, 21, 90, 160)
    c = _randn(1, 16, 21, 90, 160)
    _check(kernels.cfg_combine(u, c, 4.0), wp.cfg_combine(u.double(), c.double(), 4.0), F32)


def _rows_past_2_31(C):
    return (2 ** 31) // C + 64


@pytest.mark.gpu
def test_gpu_gated_residual_past_2_31(seed):
    """x, out fp32 [1, R, 5120] with R*5120 > 2^31: rows past the int32 boundary are right."""
    C = 5120
    R = _rows_past_2_31(C)
    assert R * C > 2 ** 31
    x = _randn(1, R, C)
    y = _randn(1, R, C, dtype=BF16)
    gate = _randn(1, 6, C, scale=0.5)[:, 2:3]
    out = kernels.gated_residual(x, y, gate)
    for sl in (slice(0, 64), slice(R // 2, R // 2 + 64), slice(R - 256, R)):
        ref = wd.gated_residual(x[:, sl].double(), y[:, sl].double(), gate.double())
        _check(out[:, sl], ref, F32)


@pytest.mark.gpu
def test_gpu_modulate_and_rms_norm_past_2_31(seed):
    C = 5120
    R = _rows_past_2_31(C)
    x = _randn(1, R, C, dtype=BF16)
    m = _randn(1, 6, C, scale=0.5)
    w = 1 + _randn(C, scale=0.2)
    out = kernels.modulate(x, m[:, 0:1], m[:, 1:2], EPS, BF16)
    tail = slice(R - 256, R)
    _check(out[:, tail], wd.modulate(x[:, tail].double(), m[:, 0:1].double(), m[:, 1:2].double(), EPS), BF16)
    del out
    out = kernels.rms_norm(x, w, EPS)
    _check(out[:, tail], wd.rms_norm(x[:, tail].double(), w.double(), EPS), BF16)
    del out
    # RoPE positions for every token (f < 410, h < 1024): the tail past 2^31 elements is rotated
    fr = wd.rope_freqs(128).to(DEVICE)
    g = torch.tensor([[410, 1024, 1]])
    assert 410 * 1024 >= R
    out = kernels.rms_norm_rope(x, w, EPS, 40, g, fr, BF16)
    table = wd.rope_table(g, R, fr)[:, tail]                       # complex128 [1, 256, 64]
    n = wd.rms_norm(x[:, tail].double(), w.double(), EPS).unflatten(-1, (40, 64, 2))
    ref = torch.view_as_real(torch.view_as_complex(n.contiguous()) * table[:, :, None, :]).flatten(3)
    _check_pairs(out[:, tail], ref, BF16)


@pytest.mark.gpu
def test_gpu_cfg_combine_past_2_31(seed):
    n = 2 ** 31 + 4096 + 17
    u = _randn(n)
    c = _randn(n)
    out = kernels.cfg_combine(u, c, 5.0)
    tail = slice(n - 100_000, n)
    _check(out[tail], wp.cfg_combine(u[tail].double(), c[tail].double(), 5.0), F32)


# ------------------------------------------------------------------------------------------
# diffusers' rounding orders (wan_triton/diffusers.py): round_norm=False, gated_residual out_dtype
# ------------------------------------------------------------------------------------------

def _same(out, want):
    """The same rounding order as `want`: under the interpreter every element equal or one ulp of the
    dtype away, and at most 1 % of them away (the kernel sums a row's statistics in its own order:
    an fp32 ulp there moves a near-tie to the other neighbour now and then; a different order of
    rounding moves most elements); within the dtype's tolerance on a GPU (FMA contraction)."""
    assert out.dtype == want.dtype and out.shape == want.shape
    if DEVICE == "cpu":
        up = torch.nextafter(want, torch.full_like(want, math.inf))
        down = torch.nextafter(want, torch.full_like(want, -math.inf))
        assert ((out == want) | (out == up) | (out == down)).all(), (out, want)
        assert (out != want).float().mean().item() <= 0.01, (out != want).float().mean().item()
    else:
        torch.testing.assert_close(out.float(), want.float(), **tol(want.dtype))


def test_rms_norm_fused_order(seed):
    x = torch.randn(3, 5, 96, device=DEVICE).bfloat16()
    w = (1 + 0.3 * torch.randn(96, device=DEVICE)).bfloat16()
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    _same(kernels.rms_norm(x, w, EPS, round_norm=False), (x32 * rstd * w.float()).bfloat16())
    assert not torch.equal((x32 * rstd * w.float()).bfloat16(), (x32 * rstd).bfloat16() * w)  # orders differ


def test_rms_norm_rope_fused_order(seed):
    B, L, H, D = 1, 12, 2, 32
    grid = torch.tensor([[3, 2, 2]])
    freqs = wd.rope_freqs(D)
    x = torch.randn(B, L, H * D, device=DEVICE).bfloat16()
    w = (1 + 0.3 * torch.randn(H * D, device=DEVICE)).bfloat16()
    x32 = x.float()
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).bfloat16()
    want = wd.rope_apply(n.unflatten(-1, (H, D)), grid, freqs).bfloat16()
    out = kernels.rms_norm_rope(x, w, EPS, H, grid, freqs, torch.bfloat16, round_norm=False)
    torch.testing.assert_close(out.float(), want.float(), **tol(torch.bfloat16))
    official = kernels.rms_norm_rope(x, w, EPS, H, grid, freqs, torch.bfloat16)
    assert (out.float() - want.float()).abs().sum() < (official.float() - want.float()).abs().sum()


def test_modulate_unrounded_norm(seed):
    x = torch.randn(2, 7, 80, device=DEVICE).bfloat16()
    m = torch.randn(2, 6, 80, device=DEVICE)
    shift, scale = m[:, 0:1], m[:, 1:2]
    want = (F.layer_norm(x.float(), (80,), eps=EPS) * (1 + scale) + shift).bfloat16()
    _same(kernels.modulate(x, shift, scale, EPS, torch.bfloat16, round_norm=False), want)


def test_gated_residual_out_dtype(seed):
    x = torch.randn(2, 7, 80, device=DEVICE).bfloat16()
    y = torch.randn(2, 7, 80, device=DEVICE).bfloat16()
    gate = torch.randn(2, 6, 80, device=DEVICE)[:, 2:3]
    _same(kernels.gated_residual(x, y, gate, torch.bfloat16), (x.float() + y * gate).bfloat16())
    assert kernels.gated_residual(x, y, gate).dtype == torch.float32
    assert not kernels.gated_residual_supports(x, y, gate, torch.int8)[0]
