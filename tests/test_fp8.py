"""fp8 linears (wan_triton.fp8, wan_triton/kernels/*quant_fp8.py): the quantize kernels against float64
formulas, the emulated fp8 product against the reference, the model switch (on: close to the
bf16/fp32 model; off: bit-exact), and the CLI refusing --fp8 without an fp8 GPU (fp8 expert
files: tests/test_fp8_files.py). The kernel tests run on DEVICE: the compiled kernels on
a CUDA GPU, the Triton interpreter on the CPU; the float64 references are always on the CPU.

Tolerances (stated here, checked below):
- scales: exactly the fp32 rounding of the float64 formula max(amax, 1e-12) / 448 (GELU: 2e-6
  relative, fp32 tanh; modulate: 1e-5, or two ulps of x's dtype, to which LayerNorm rounds).
- codes: e4m3 of the float64 value x / scale (torch's own float8 cast, round to nearest even,
  saturated at +-448). Plain quantization: at most 1e-5 of the codes (a float64 value within an
  fp32 ulp of an e4m3 tie) may sit one e4m3 step away; GELU and modulate (fp32 tanh / LayerNorm
  statistics vs float64): at most 1e-3, each one step away.
- one fp8 linear (emulated, fp32): within 1e-5 of its own formula in float64, within 6 % (rel.
  Frobenius) of the unquantized float64 product (e4m3 keeps 3 mantissa bits: 2^-4 relative
  step per element, ~2-3 % measured on random data).
- tiny model forward: within 5 % of the fp32 reference (measured ~0.5-1 %).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_triton.kernels.gelu_quant_fp8 import gelu_quant_fp8
from wan_triton.kernels.modulate_quant_fp8 import modulate_quant_fp8
from wan_triton.kernels.quant_fp8 import quant_fp8
from tests.conftest import DEVICE, HAS_CUDA, tol
from wan_triton import fp8

E4M3 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(m, k, dtype, gen, zero_row=True):
    """Rows of very different magnitudes (1e-6 .. 1e3), one all-zero row, a few outliers. The top
    magnitude is capped so that an outlier (x20) at 8 sigma stays finite in `dtype` (fp16: 65504;
    uncapped, 1e3 x 20 x 3.3 sigma overflowed to inf for about one seed in 300)."""
    top = min(3.0, math.log10(torch.finfo(dtype).max / (20 * 8)))
    mags = torch.logspace(-6, top, m, dtype=torch.float64)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64) * mags[:, None]
    if k > 3:
        x[:, :: max(1, k // 3)] *= 20.0  # outliers: the amax is far from the bulk
    if zero_row and m > 1:
        x[1] = 0.0
    return x.to(dtype)


def _ref_scale(v64):
    """float64 formula -> fp32 scale [.., 1]."""
    return (v64.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0).float()


def _native_here() -> bool:
    """Whether fp8 linears on DEVICE use torch._scaled_mm (CUDA, capability >= 8.9) or are emulated."""
    return fp8.fp8_support(DEVICE)[0]


def _products_via() -> str:
    """What quantize_model's log line says for a model on DEVICE (a CPU-resident model on a machine
    with CUDA reports the GPU, where it will run: also fp8_support(DEVICE))."""
    return "torch._scaled_mm" if _native_here() else "EMULATED"


def _ref_codes(v64, scale32):
    q = (v64 / scale32.double()).clamp(-448.0, 448.0)
    return q.to(E4M3)


def _e4m3_step(q):
    """Index of each e4m3 value on the ordered grid (sign-magnitude codes -> ordered ints)."""
    c = q.view(torch.uint8).to(torch.int32)
    mag = c & 0x7F
    return torch.where(c & 0x80 != 0, -mag, mag)


def _check_codes(q, ref, max_frac):
    assert q.dtype == E4M3 and q.shape == ref.shape
    assert not q.float().isnan().any(), "NaN code (0x7F/0xFF): saturation failed"
    d = (_e4m3_step(q) - _e4m3_step(ref)).abs()
    assert int(d.max()) <= 1 if d.numel() else True, "a code is more than one e4m3 step away"
    n_off = int((d != 0).sum())
    assert n_off <= max(1, math.floor(max_frac * d.numel())), f"{n_off} of {d.numel()} codes one step off"


# ------------------------------------------------------------------ kernels vs float64

SHAPES = [((1, 1), None), ((7, 33), None), ((4, 5120), None), ((3, 13824), None), ((5, 100), 32), ((3, 300), 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,max_block", SHAPES, ids=[f"{s[0]}x{s[1]}-blk{b}" for s, b in SHAPES])
def test_quant_fp8_matches_float64(seed, dtype, shape, max_block):
    g = torch.Generator().manual_seed(seed)
    x = _rows(*shape, dtype, g)
    kw = {} if max_block is None else {"max_block": max_block}
    q, s = quant_fp8(x.to(DEVICE), **kw)
    q, s = q.cpu(), s.cpu()
    x64 = x.double()
    s_ref = _ref_scale(x64)
    assert s.dtype == torch.float32 and s.shape == (shape[0], 1)
    assert torch.equal(s, s_ref), "scales differ from max(amax, 1e-12) / 448"
    assert torch.isfinite(s).all() and (s > 0).all()
    _check_codes(q, _ref_codes(x64, s), 1e-5)
    if shape[0] > 1:  # the zero row: finite scale, zero codes
        assert torch.equal(q[1].float(), torch.zeros(shape[1]))
    # saturation: each row's largest |x| lands on +-448, never beyond
    top = q.float().abs().amax(-1)
    nz = x64.abs().amax(-1) > 0
    assert torch.equal(top[nz], torch.full_like(top[nz], 448.0))


def test_quant_fp8_rounding_ties_subnormals_and_saturation():
    """A row whose amax is 448 has scale 1: the codes are e4m3(x) itself. Ties go to even,
    subnormals (multiples of 2^-9) round right, |x| = 448 stays 448 (no NaN)."""
    vals = [448.0, -448.0, 17.0, 19.0, 18.5, -17.0, 2 ** -10, 3 * 2 ** -10, -5 * 2 ** -10, 2 ** -7 + 2 ** -11,
            0.0013, 240.0, 232.0, 1e-9, 300.0]
    x = torch.tensor([vals], dtype=torch.float32)
    q, s = quant_fp8(x.to(DEVICE))
    q, s = q.cpu(), s.cpu()
    assert s.item() == 1.0
    want = torch.tensor([448, -448, 16, 20, 18, -16, 0, 2 ** -8, -2 ** -8, 2 ** -7, 2 ** -9, 240, 224, 0, 288.0])
    assert torch.equal(q.float()[0], want)
    assert torch.equal(q.view(torch.uint8), x.to(E4M3).view(torch.uint8))  # torch's own cast agrees


def _gelu64(x64):
    return 0.5 * x64 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,max_block", [((3, 13824), None), ((4, 5120), None), ((5, 100), 32), ((2, 7), None)])
def test_gelu_quant_fp8_matches_float64(seed, dtype, shape, max_block):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, 0] = 0.0
    if shape[0] > 1:
        x[1] = -30.0  # GELU ~ 0 (underflows to zero): a zero row after the activation
    kw = {} if max_block is None else {"max_block": max_block}
    q, s = gelu_quant_fp8(x.to(DEVICE), **kw)
    q, s = q.cpu(), s.cpu()
    g64 = _gelu64(x.double())
    s_ref = _ref_scale(g64)
    torch.testing.assert_close(s, s_ref, rtol=2e-6, atol=0)
    assert torch.isfinite(s).all() and (s > 0).all()
    _check_codes(q, _ref_codes(g64, s), 1e-3)
    # torch's own GELU(tanh) agrees with the formula in the docstring
    torch.testing.assert_close(F.gelu(x.double(), approximate="tanh"), g64, rtol=1e-12, atol=1e-12)


def _mod_scale_rtol(dtype):
    """The official LayerNorm output is rounded to x's dtype: fp32 statistics vs float64 may round
    a row's largest element the other way (one ulp of that dtype), which moves the scale by it."""
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def _modulate64(x, shift, scale, eps):
    """float64 LayerNorm, rounded to x.dtype (official), then n * (1 + scale) + shift."""
    n = F.layer_norm(x.double(), (x.shape[-1],), eps=eps).to(x.dtype).double()
    return n * (1 + scale.double()) + shift.double()


def _check_modulate_codes(q, s, x, shift, scale, eps):
    """Codes of modulate_quant_fp8 against the float64 formula. The LayerNorm output is rounded to
    x's dtype, and fp32 statistics (kernel) vs float64 (reference) may round an element one ulp of
    that dtype the other way: y then moves by ulp(n) * |1 + scale|. Far from zero that is well
    inside one e4m3 step (the one-step rule of _check_codes); near zero, where e4m3 steps are
    tiny, it can span several codes (seen: one fp16 element in ~10^3 runs, 15 steps at y ~ 5e-4).
    So a code more than one step away must still dequantize within that input rounding plus one
    e4m3 step of the float64 value, and at most 1e-3 of the codes may differ at all."""
    y64 = _modulate64(x, shift, scale, eps)
    ref = _ref_codes(y64, s)
    d = (_e4m3_step(q) - _e4m3_step(ref)).abs()
    far = d > 1
    if far.any():
        n = F.layer_norm(x.double(), (x.shape[-1],), eps=eps).to(x.dtype).double()
        ulp = torch.finfo(x.dtype).eps * torch.exp2(torch.floor(torch.log2(n.abs().clamp_min(1e-30))))
        c = (y64 / s.double()).abs()  # value in code units: e4m3 step 2^(e-3), subnormal 2^-9
        step = torch.exp2(torch.floor(torch.log2(c.clamp_min(2.0 ** -6))) - 3) * s.double()
        allow = ulp * (1 + scale.double()).abs() + step
        err = (q.double() * s.double() - y64).abs()
        bad = far & (err > allow)
        assert not bad.any(), f"{int(bad.sum())} codes beyond the input rounding plus one e4m3 step"
    n_off = int((d != 0).sum())
    assert n_off <= max(1, math.floor(1e-3 * d.numel())), f"{n_off} of {d.numel()} codes off"
    return y64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C,per_token,max_block", [(2, 3, 64, False, None), (1, 2, 5120, False, None),
                                                       (2, 2, 100, True, 32), (1, 3, 48, True, None)])
def test_modulate_quant_fp8_matches_float64(seed, dtype, B, L, C, per_token, max_block):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, C, generator=g) * 4 + 1).to(dtype)
    if per_token:
        shift, scale = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g) * 0.5
        shift_d, scale_d = shift.to(DEVICE), scale.to(DEVICE)
    else:  # views of a [B, 6, C] modulation tensor, as in the block (strided views on DEVICE too)
        m = torch.randn(B, 6, C, generator=g)
        shift, scale = m[:, 0:1], m[:, 1:2]
        m_d = m.to(DEVICE)
        shift_d, scale_d = m_d[:, 0:1], m_d[:, 1:2]
    kw = {} if max_block is None else {"max_block": max_block}
    q, s = modulate_quant_fp8(x.to(DEVICE), shift_d, scale_d, 1e-6, **kw)
    q, s = q.cpu(), s.cpu()
    assert q.shape == (B, L, C) and s.shape == (B, L, 1)
    assert q.dtype == E4M3 and not q.float().isnan().any()
    y64 = _check_modulate_codes(q, s, x, shift, scale, 1e-6)
    torch.testing.assert_close(s, _ref_scale(y64), rtol=_mod_scale_rtol(dtype), atol=0)


# ------------------------------------------------------------------ one fp8 linear (emulated on CPU)

def test_fp8_linear_emulated_vs_reference(seed):
    """On DEVICE: the CPU emulates in fp32 (within 1e-5 of the formula); on CUDA the product passes
    through bf16 (torch._scaled_mm's bf16 output, or the emulation's bf16 matmul on GPUs without
    fp8), so both paths there are held to the bf16 tolerance (conftest) against the same formula."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(96, 80)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(80, generator=g) * 0.1)
    x = torch.randn(3, 7, 96, generator=g)
    w64, b64 = lin.weight.detach().double(), lin.bias.detach().double()
    f = fp8.Fp8Linear.from_linear(lin.to(DEVICE))
    assert f.weight.dtype == E4M3 and f.weight_scale.shape == (80, 1) and f.weight_scale.dtype == torch.float32
    assert f.weight.device.type == torch.device(DEVICE).type
    xd = x.to(DEVICE)
    y = f(xd)
    assert y.shape == (3, 7, 80) and y.dtype == torch.float32
    # the bookkeeping: exactly the stated formula, evaluated in float64 on the CPU
    qa, sa = quant_fp8(xd)
    qa, sa, w8, ws = qa.cpu(), sa.cpu(), f.weight.cpu(), f.weight_scale.cpu()
    formula = ((qa.double() * sa.double()).reshape(-1, 96) @ (w8.double() * ws.double()).t()
               + b64).reshape(3, 7, 80)
    close = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else tol(torch.bfloat16)
    torch.testing.assert_close(y.cpu().double(), formula, **close)
    if DEVICE != "cpu":  # the emulated path on the GPU as well (f(x) above may have been _scaled_mm)
        emu = f._emulated(qa.to(DEVICE).reshape(-1, 96), sa.to(DEVICE).reshape(-1, 1), torch.float32)
        torch.testing.assert_close(emu.cpu().double().reshape(3, 7, 80), formula, **tol(torch.bfloat16))
    # the error of fp8 itself, against the unquantized product
    ref = F.linear(x.double(), w64, b64)
    rel = ((y.cpu().double() - ref).norm() / ref.norm()).item()
    print(f"fp8 linear rel. error {rel:.4f} on {DEVICE}")
    assert 0 < rel < 0.06
    # a QuantizedInput gives the same result as the tensor it came from
    assert torch.equal(f(fp8.quantize_input(xd)), y)


def test_fp8_linear_autocast_output_dtype_and_dtype_guard():
    lin = nn.Linear(32, 16, device=DEVICE)
    f = fp8.Fp8Linear.from_linear(lin)
    x = torch.randn(4, 32, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        assert f(x).dtype == torch.bfloat16
    w, s = f.weight.clone(), f.weight_scale.clone()
    f.to(torch.bfloat16)  # a model-wide dtype change must not touch the e4m3 weight or its scales
    assert f.weight.dtype == E4M3 and torch.equal(f.weight.view(torch.uint8), w.view(torch.uint8))
    assert f.weight_scale.dtype == torch.float32 and torch.equal(f.weight_scale, s)
    assert f.bias.dtype == torch.bfloat16


# ------------------------------------------------------------------ the model switch

def _tiny(dtype=torch.float32):
    from wan.configs import get_config
    from wan.dit import WanModel

    cfg = get_config("tiny")
    return cfg, WanModel.from_config(cfg.dit, dtype=dtype, seed=0, zero_head=False)


def _inputs(cfg, gen, frames=1, hw=4):
    x = torch.randn(1, cfg.dit.in_dim, frames, hw, hw, generator=gen)
    return x, torch.tensor([700.0]), torch.randn(1, 5, cfg.dit.text_dim, generator=gen)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(
        a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k], b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k])
        for k in a)


def test_quantize_model_close_and_switch_off_exact(seed, caplog):
    cfg, model = _tiny()
    model = model.to(DEVICE)  # the activation kernels run on DEVICE (a CPU model needs the interpreter)
    g = torch.Generator().manual_seed(seed)
    x, t, ctx = (a.to(DEVICE) for a in _inputs(cfg, g))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x, t, ctx)
        fp8.reset_fp8_stats()
        with caplog.at_level("WARNING", logger="wan_triton"):
            summ = fp8.quantize_model(model, progress=False, keep_original=True)
        assert summ.layers == 10 * cfg.dit.num_layers and summ.bytes_after < summ.bytes_before
        lines = [r.getMessage() for r in caplog.records if "fp8 linears: lossy" in r.getMessage()]
        # one line says it is lossy, and how the products run here: EMULATED on the CPU (and on GPUs
        # without fp8), torch._scaled_mm on an fp8 GPU
        assert len(lines) == 1 and _products_via() in lines[0], lines
        assert fp8.is_quantized(model)
        # embeddings, time projection and head untouched
        assert type(model.head.head) is nn.Linear and type(model.text_embedding[0]) is nn.Linear
        assert type(model.time_projection[1]) is nn.Linear
        out = model(x, t, ctx)
        st = fp8.fp8_stats()
        assert st["modulate_quant_fp8"]["launches"] == 2 * cfg.dit.num_layers
        assert st["gelu_quant_fp8"]["launches"] == cfg.dit.num_layers
        rel = _rel(out, ref)
        print(f"tiny model fp8 forward rel. error {rel:.4f}")
        assert 0 < rel < 0.05
        assert fp8.dequantize_model(model) == 10 * cfg.dit.num_layers
        assert not fp8.is_quantized(model)
        assert _same_state(model.state_dict(), before)
        assert torch.equal(model(x, t, ctx), ref)  # the exact path is back


def test_dequantize_without_originals_is_refused():
    _, model = _tiny()
    fp8.quantize_model(model, progress=False)
    with pytest.raises(fp8.Fp8Error, match="reload the model"):
        fp8.dequantize_model(model)


def test_optimize_fp8_switch(monkeypatch, caplog):
    import wan_triton
    from wan import pipeline

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("WAN_TRITON_STRICT", "0")
    pipe = pipeline.WanT2V.from_config("tiny", device="cpu")
    with pytest.raises(fp8.Fp8Error, match="fp8 matrix products need an NVIDIA GPU"):  # as --fp8 on a CPU
        wan_triton.optimize(pipe, "cpu", fp8=True)
    assert not fp8.is_quantized(pipe.high_noise_model)  # refused before anything changed
    monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)  # the switch itself, on the CPU
    with caplog.at_level("WARNING", logger="wan_triton"):
        applied = wan_triton.optimize(pipe, "cpu", fp8=True)
    assert applied.fp8 and "fp8 linears on (lossy)" in applied.summary()
    assert fp8.is_quantized(pipe.high_noise_model) and fp8.is_quantized(pipe.low_noise_model)
    lines = [r.getMessage() for r in caplog.records if "fp8 linears: lossy" in r.getMessage()]
    # one line for both experts; CPU-resident experts on a machine with an fp8 GPU report _scaled_mm
    # (they run there), else EMULATED
    assert len(lines) == 1 and "2 models" in lines[0] and _products_via() in lines[0], lines
    assert wan_triton.optimize(pipe, "cpu").fp8  # fp8=None leaves the experts quantized
    with pytest.raises(fp8.Fp8Error):
        wan_triton.optimize(pipe, "cpu", fp8=False)  # the bf16 weights were freed: reload
    with pytest.raises(TypeError):
        wan_triton.patch(fp8=True)  # patch() swaps functions only; it has no fp8 switch


def test_cli_fp8_without_fp8_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    from wan_triton import benchmark as benchmark_t2v
    from wan.pipeline import WanT2V
    from wan_triton import generate

    def must_not_build(*a, **k):
        raise AssertionError("a model was built before --fp8 was checked")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    monkeypatch.setattr(WanT2V, "from_pretrained", must_not_build)
    if HAS_CUDA:  # a GPU here: pretend it is pre-Ada
        monkeypatch.setattr(fp8, "fp8_support", lambda device=None: (False, "X is compute capability 8.0; fp8 "
                                                                             "matrix products need >= 8.9"))
        args = ["--device", "cuda", "--fp8"]
        want = "--fp8: X is compute capability 8.0"
    else:
        args = ["--device", "cpu", "--fp8"]
        want = "--fp8: device cpu: fp8 matrix products need"
    for tool, out in ((generate, ["--save_file", str(tmp_path / "v.mp4")]),
                      (benchmark_t2v, ["--out_dir", str(tmp_path / "o")])):
        rc = tool.main(args + out + ["--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and want in err[0], err
    assert not (tmp_path / "v.mp4").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ GPU (H200 / Ada or newer)

def _rows_ieee(x):
    """The kernels' formula in torch ops, op for op: fp32 amax, fp32 max with the floor, IEEE fp32
    division by 448, then IEEE x32 / scale, clamp, round-to-nearest-even e4m3.

    The divisors are CUDA tensors on purpose: PyTorch's CUDA `tensor / python_scalar` computes
    tensor * (1 / scalar) (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, "may lose one bit of
    precision"), and fp32(1/448) is inexact, so `amax / 448.0` can be one ulp off the kernel's
    tl.math.div_rn(amax, 448.0) - the last-bit scale mismatch this test used to report."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True)
    s = torch.maximum(amax, torch.full_like(amax, fp8.AMAX_FLOOR)) / torch.full_like(amax, fp8.E4M3_MAX)
    return (x32 / s).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(E4M3), s


def _same_bits(q, s, qr, sr):
    assert s.dtype == sr.dtype == torch.float32
    n_s = int((s.view(torch.int32) != sr.view(torch.int32)).sum())
    assert n_s == 0, f"{n_s} of {s.numel()} scales differ from max(amax, 1e-12) / 448 (IEEE fp32)"
    n_q = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
    assert n_q == 0, f"{n_q} of {q.numel()} e4m3 codes differ bit-wise from the torch formula"


@pytest.mark.gpu
def test_gpu_kernels_match_torch_formula_bits():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(333, 5120, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    _same_bits(*quant_fp8(x), *_rows_ieee(x))
    x = torch.randn(64, 13824, device="cuda", generator=g, dtype=torch.bfloat16) * 3  # the ffn.2 width, one pass
    _same_bits(*quant_fp8(x), *_rows_ieee(x))
    q, s = gelu_quant_fp8(x)
    g64 = _gelu64(x.double().cpu())
    torch.testing.assert_close(s.cpu(), _ref_scale(g64), rtol=2e-6, atol=0)
    _check_codes(q.cpu(), _ref_codes(g64, s.cpu()), 1e-3)
    xm = torch.randn(2, 300, 5120, device="cuda", generator=g, dtype=torch.bfloat16)
    mod = torch.randn(2, 6, 5120, device="cuda", generator=g)
    q, s = modulate_quant_fp8(xm, mod[:, 0:1], mod[:, 1:2], 1e-6)
    y64 = _check_modulate_codes(q.cpu(), s.cpu(), xm.cpu(), mod[:, 0:1].cpu(), mod[:, 1:2].cpu(), 1e-6)
    torch.testing.assert_close(s.cpu(), _ref_scale(y64), rtol=_mod_scale_rtol(torch.bfloat16), atol=0)


@pytest.mark.gpu
def test_gpu_quantize_weight_same_bits_on_cpu_and_gpu():
    """quantize_model quantizes CPU-resident weights on the GPU and promises the same bits. The CPU
    divides by 448 exactly (IEEE); if this fails on the scales, fp8.quantize_rows_reference divides
    by the Python scalar 448.0, which CUDA computes as * (1 / 448) (see _rows_ieee): divide by a
    tensor there instead."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    qc, sc = fp8.quantize_weight(w)
    _same_bits(qc, sc, *_rows_ieee(w))  # the CPU formula is the kernels' formula
    qg, sg = fp8.quantize_weight(w.cuda())  # weights quantize to the same bits on either device
    _same_bits(qg.cpu(), sg.cpu(), qc, sc)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [77, 300, 1024])
def test_gpu_scaled_mm_vs_emulated(M):
    ok, why = fp8.fp8_support("cuda")
    if not ok:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(M)
    lin = nn.Linear(5120, 1536, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    f = fp8.Fp8Linear.from_linear(lin)
    x = torch.randn(1, M, 5120, device="cuda", generator=g, dtype=torch.bfloat16)
    qi = fp8.quantize_input(x)
    a, sa = qi.data.reshape(-1, 5120), qi.scale.reshape(-1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16
    formula = (a.double() * sa.double()) @ (f.weight.double() * f.weight_scale.double()).t() + lin.bias.double()
    emu = f._emulated(a, sa, torch.bfloat16)
    assert _rel(y.reshape(-1, 1536), formula) < 4e-3  # bf16 output rounding
    assert _rel(emu, formula) < 8e-3
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert _rel(y, ref) < 0.06
