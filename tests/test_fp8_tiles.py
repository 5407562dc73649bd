"""The fp8 row-quantization kernels' inner workings (wan_triton/kernels/quant_fp8.py): the
division-free quotient and its check, and the tiled kernels bit for bit against the IEEE formula.

- `e4m3_quotient` (one product, one FMA correction, checked by the exact remainder): wherever it
  says ok, its value is the IEEE fp32 quotient x / scale bit for bit (sign included, -0 too), or
  below 2^-11 (where e4m3 gives 0 either way); it says ok for nearly every element (>= 99.9 %,
  measured 100 % on random data); NaN, infinite scales are never ok (the program then divides).
- the kernels under every tiling (rows per program, tile width, masked last tile, looped wide
  rows): codes and scales equal the torch formula (IEEE fp32 division, round to nearest even),
  bit for bit, for fp32 / bf16 / fp16 inputs.
Under TRITON_INTERPRET=1 the FMAs run in float64 (exact products), on a GPU as fp32 FMAs.
"""
import json
import math

import pytest
import torch

from tests.conftest import DEVICE
from wan_triton import fp8
from wan_triton.kernels._utils import triton_available
from wan_triton.kernels.gelu_quant_fp8 import _gelu_quant_fp8_kernel
from wan_triton.kernels.quant_fp8 import (AMAX_FLOOR, E4M3_MAX, FP8_DTYPE, _quant_fp8_kernel, e4m3_quotient,
                                          quant_rows, row_tiles)

if not triton_available():  # pragma: no cover - the kernels need triton (the interpreter on a CPU)
    pytest.skip("needs triton", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

E4M3 = torch.float8_e4m3fn


@triton.jit
def _quotient_kernel(X,        # x [n] fp32
                     SCALE,    # scale [n] fp32 (> 0)
                     V,        # out [n] fp32: the quotient
                     OK,       # out [n] int32: 1 where verified
                     n,        # elements
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0)
    s = tl.load(SCALE + offs, mask=m, other=1.0)
    v, ok = e4m3_quotient(x, s, tl.math.div_rn(1.0, s), s * 5.9604644775390625e-08)
    tl.store(V + offs, v, mask=m)
    tl.store(OK + offs, tl.where(ok, 1, 0), mask=m)


def _quotient(x, s):
    x, s = x.to(DEVICE), s.to(DEVICE)
    v, ok = torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)
    _quotient_kernel[(triton.cdiv(x.numel(), 1024),)](x, s, v, ok, x.numel(), BLOCK=1024)
    return v.cpu(), ok.cpu().bool()


def _operands(n, g):
    """Scales over the whole range a row can have (1e-12/448 .. 1e30), x = scale * u with
    |u| <= 448 log-uniform down to 1e-7, some x rounded to bf16 (as activations are), and some u
    next to a midpoint between two fp32 numbers (the hardest quotients to round)."""
    s = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(AMAX_FLOOR / E4M3_MAX), math.log(1e30),
                                                                generator=g)).float()
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-7), math.log(448.0), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    u = (mag * sign).float()
    k = n // 4  # u + half an ulp: x / s lands within about an ulp of a midpoint
    u[:k] = (u[:k].double() + torch.sign(u[:k].double()) * 2.0 ** (torch.frexp(u[:k]).exponent.double() - 25)).float()
    x = (u.double() * s.double()).float()
    x[k:2 * k] = x[k:2 * k].bfloat16().float()
    return x, s


def _bits(t):
    return t.view(torch.int32)


def test_quotient_is_ieee_where_ok(seed):
    g = torch.Generator().manual_seed(seed)
    x, s = _operands(200_000, g)
    v, ok = _quotient(x, s)
    ieee = x / s  # torch on the CPU: IEEE division
    tiny = ieee.abs() < 2.0 ** -11
    exact = _bits(v) == _bits(ieee)
    assert bool((exact | tiny)[ok].all()), f"{int((~(exact | tiny) & ok).sum())} verified quotients are not IEEE"
    assert bool((torch.signbit(v) == torch.signbit(x)).all())
    frac = ok.float().mean().item()
    print(f"verified on the fast path: {frac:.6f}")
    assert frac >= 0.999


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
def test_quotient_special_values():
    x = torch.tensor([-0.0, 0.0, float("nan"), 1.0, -3.0, 1e-30, -1e-30, 448.0], dtype=torch.float32)
    s = torch.tensor([1.0, 1.0, 1.0, float("inf"), float("inf"), 1.0, 1.0, 1.0], dtype=torch.float32)
    v, ok = _quotient(x, s)
    assert _bits(v[0]) == _bits(torch.tensor(-0.0)) and ok[0]  # -0 keeps its sign: code -0
    assert _bits(v[1]) == 0 and ok[1]
    assert not ok[2] and not ok[3] and not ok[4]  # NaN, infinite scale: the program divides instead
    assert ok[5] and ok[6] and torch.signbit(v[6])  # tiny: e4m3 gives (-)0 either way
    assert ok[7] and v[7].item() == 448.0


def _rows_ieee(x):
    """The formula in torch ops on the CPU (IEEE fp32): amax, max with the floor, / 448, x / scale,
    clamp, round to nearest even."""
    x32 = x.float().cpu()
    amax = x32.abs().amax(-1, keepdim=True)
    s = torch.maximum(amax, torch.full_like(amax, AMAX_FLOOR)) / torch.full_like(amax, E4M3_MAX)
    return (x32 / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


# (rows, width, tiling overrides): one tile, several tiles, a masked last tile, several rows per
# program with a partial last program, the A14B widths, a looped wide row
TILINGS = [(3, 5120, {}), (2, 5120, dict(rows=2, warps=8)), (5, 3000, {}), (3, 3000, dict(chunk=512)),
           (37, 100, {}), (9, 64, dict(rows=4)), (2, 13824, {}), (2, 13824, dict(chunk=512)),
           (3, 300, dict(max_block=64)), (1, 1, {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,kw", TILINGS, ids=[f"{m}x{k}-{kw}" for m, k, kw in TILINGS])
def test_quant_kernel_bits_equal_ieee_formula(seed, dtype, m, k, kw):
    g = torch.Generator().manual_seed(seed)
    top = min(3.0, math.log10(torch.finfo(dtype).max / 160))
    x = (torch.randn(m, k, generator=g, dtype=torch.float64) * torch.logspace(-6, top, m, dtype=torch.float64)[:, None])
    x = x.to(dtype)
    if k > 4:
        x[0, 1], x[0, 2] = -0.0, 0.0
    tiles = row_tiles(k, **kw)
    q, s = quant_rows(_quant_fp8_kernel, x.to(DEVICE), tiles)
    qr, sr = _rows_ieee(x)
    assert torch.equal(s.cpu().view(torch.int32), sr.view(torch.int32)), f"scales differ ({tiles})"
    n = int((q.cpu().view(torch.uint8) != qr.view(torch.uint8)).sum())
    assert n == 0, f"{n} of {q.numel()} codes differ from the IEEE formula ({tiles})"


def test_gelu_kernel_same_bits_under_every_tiling(seed):
    """GELU is applied tile by tile: the tiling must not change a bit (one tile width vs another,
    the looped path)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 13824, generator=g) * 3).bfloat16().to(DEVICE)
    runs = [quant_rows(_gelu_quant_fp8_kernel, x, row_tiles(13824, **kw))
            for kw in ({}, dict(chunk=512), dict(max_block=4096))]
    for q, s in runs[1:]:
        assert torch.equal(s, runs[0][1]) and torch.equal(q.view(torch.uint8), runs[0][0].view(torch.uint8))


def test_row_tiles_choices():
    t = row_tiles(5120)
    assert (t.rows, t.chunk, t.chunks, t.even, t.looped) == (1, 1024, 5, True, False)
    assert t.warps == 8
    t = row_tiles(13824)  # 27 x 512, no padded lanes, 8 warps: 1.65x faster than 7 x 2048 / 16 warps (H100)
    assert (t.chunk, t.chunks, t.even) == (512, 27, True) and t.warps == 8
    t = row_tiles(3000)  # no tile width divides it: the widest padding it by <= 1/16 (3 x 1024 = 3072)
    assert (t.chunk, t.chunks, t.even, t.warps) == (1024, 3, False, 4)
    t = row_tiles(64)
    assert t.rows == 16 and t.chunk == 64 and t.grid(100) == (7,)
    t = row_tiles(20000)
    assert t.looped and t.grid(3) == (3,)
    assert FP8_DTYPE is fp8.FP8_DTYPE


def test_bench_fp8_kernels_smoke(tmp_path):
    """The kernel benchmark's flow (v1 vs today's kernels, identity check) on tiny shapes."""
    from bench import bench_fp8_kernels

    out = tmp_path / "k.json"
    assert bench_fp8_kernels.main(["--smoke", "--no-sweep", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["kernel"].split()[0] for r in rows] == ["quant_fp8", "quant_fp8", "gelu_quant_fp8", "modulate_quant_fp8"]
    assert "copy_bytes_per_s" in report and all("now_x_card" in r for r in rows)  # nan on a CPU: no timing
    assert rows[0]["identical"] and rows[1]["identical"]
    # the memory probes beside each plain quantize (their codes are not compared: they are not exact)
    assert [sorted(r.get("probes", {})) for r in rows] == [["probe: x*r cast", "torch cast"]] * 2 + [[], []]
    # the persistent candidate (2 programs walk the 6 rows: 3 blocks each, the next one loaded ahead) writes
    # today's codes, for the plain and the GELU quantize
    for r in rows[:3]:
        cand = [s for s in r["sweep"] if s["tiles"].startswith("persistent")]
        assert len(cand) == 3 and all(s.get("identical") for s in cand), cand


@pytest.mark.parametrize("bad", ["x", "0", "2,", ""])
def test_bench_fp8_kernels_bad_waves_is_one_line(bad, capsys):
    from bench import bench_fp8_kernels

    with pytest.raises(SystemExit) as exit_:
        bench_fp8_kernels.main(["--smoke", "--waves", bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"bench_fp8_kernels: error: argument --waves: expected positive integers separated by commas, got {bad!r}"
