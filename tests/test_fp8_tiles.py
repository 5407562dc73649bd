"""The fp8 row-quantization kernels' inner workings (wan_triton/kernels/quant_fp8.py): the
division-free codes and their check, and the tiled kernels bit for bit against the IEEE formula.

- `e4m3_near_boundary` on q0 = x * (1 / scale): wherever it does not flag an element, the e4m3 code
  of q0 is the code of the IEEE quotient x / scale (sign included, -0 too), on operands built to sit
  within a few ulps of every e4m3 rounding boundary (exact ties too) over the whole range of scales;
  NaN and infinities need no flag (x * r is then x / scale: NaN, (-)0), and almost nothing on
  random data is flagged (measured: about 3 in 2^20 elements).
- rows near the boundaries (the programs divide there), NaN and infinite rows (NaN propagates as in
  torch's formula), under the tilings.
- the kernels under every tiling (rows per program, tile width, masked last tile, looped wide
  rows): codes and scales equal the torch formula (IEEE fp32 division, round to nearest even),
  bit for bit, for fp32 / bf16 / fp16 inputs.
"""
import json
import math

import pytest
import torch

from tests.conftest import DEVICE
from wan_triton import fp8
from wan_triton.kernels._utils import triton_available
from wan_triton.kernels.gelu_quant_fp8 import _gelu_quant_fp8_kernel
from wan_triton.kernels.quant_fp8 import (AMAX_FLOOR, E4M3_MAX, FP8_DTYPE, _quant_fp8_kernel, e4m3_near_boundary,
                                          quant_rows, row_tiles)

if not triton_available():  # pragma: no cover - the kernels need triton (the interpreter on a CPU)
    pytest.skip("needs triton", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

E4M3 = torch.float8_e4m3fn


@triton.jit
def _codes_kernel(X,        # x [n] fp32
                  SCALE,    # scale [n] fp32 (> 0)
                  Q0,       # out [n] fp32: x * (1 / scale), as the kernels compute it
                  FLAG,     # out [n] int32: 1 where e4m3_near_boundary flags it
                  n,        # elements
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0)
    s = tl.load(SCALE + offs, mask=m, other=1.0)
    q0 = x * tl.math.div_rn(1.0, s)
    tl.store(Q0 + offs, q0, mask=m)
    tl.store(FLAG + offs, e4m3_near_boundary(q0).to(tl.int32), mask=m)


def _codes(x, s):
    """(q0, flagged) from the kernel helper."""
    x, s = x.to(DEVICE), s.to(DEVICE)
    q0, flag = torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)
    _codes_kernel[(triton.cdiv(x.numel(), 1024),)](x, s, q0, flag, x.numel(), BLOCK=1024)
    return q0.cpu(), flag.cpu().bool()


def _e4m3(v):
    """The formula's code of fp32 v: clamp to +-448, round to nearest even (torch on the CPU)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8)


def _boundaries():
    """Every positive e4m3 rounding boundary below 448: the midpoints between neighbouring codes
    (subnormal ones and 2^-10, the tie between 0 and 2^-9, included), as float64."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3).double()  # 0 .. 448
    return (codes[:-1] + codes[1:]) / 2


def _operands(n_scales, g):
    """x and scale such that x / scale lands 0, +-1 .. +-6 fp32 ulps from every boundary (both
    signs), over scales from AMAX_FLOOR / 448 to 1e30: scales with a short mantissa (x / scale
    then hits a boundary exactly: ties), with a full one, and powers of two."""
    mids = _boundaries()
    full = torch.exp(torch.empty(n_scales, dtype=torch.float64).uniform_(math.log(AMAX_FLOOR / E4M3_MAX),
                                                                          math.log(1e30), generator=g))
    short = torch.ldexp(torch.randint(1, 8, (n_scales,), generator=g).double(),
                        torch.randint(-48, 96, (n_scales,), generator=g))
    scales = torch.cat([full.float(), short.float(), torch.ldexp(torch.ones(8), torch.arange(-40, 88, 16)).float()])
    steps = torch.arange(-6, 7, dtype=torch.float64)
    q = mids[:, None] * (1 + steps[None, :] * 2.0 ** -24)  # about one ulp apart around each boundary
    q = torch.cat([q.flatten(), -q.flatten()])
    s = scales[:, None].expand(-1, q.numel()).flatten()
    x = (q[None, :].expand(scales.numel(), -1).flatten() * s.double()).float()
    return x, s


def test_unflagged_codes_are_the_ieee_quotients(seed):
    g = torch.Generator().manual_seed(seed)
    x, s = _operands(24, g)
    q0, flag = _codes(x, s)
    ieee = x / s  # torch on the CPU: IEEE division
    wrong = _e4m3(q0) != _e4m3(ieee)
    ties = int((_e4m3(ieee) != _e4m3(ieee * (1 + 2.0 ** -22))).sum())
    print(f"{x.numel()} operands near boundaries: {int(flag.sum())} flagged, {int(wrong.sum())} codes of "
          f"x * r wrong (all must be flagged), {ties} next to a boundary")
    assert int(wrong.sum()) > 0, "the operands never reach a code x * r gets wrong: the test tests nothing"
    assert not bool((wrong & ~flag).any()), f"{int((wrong & ~flag).sum())} wrong codes not flagged"
    assert bool((torch.signbit(q0) == torch.signbit(x)).all())


def test_random_operands_are_rarely_flagged(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 << 20, generator=g)
    s = (x.abs().amax() / E4M3_MAX).expand(x.shape).contiguous()
    q0, flag = _codes(x, s)
    assert bool((_e4m3(q0) == _e4m3(x / s))[~flag].all())
    print(f"flagged: {int(flag.sum())} of {x.numel()}")
    assert int(flag.sum()) <= 32  # 3 of 2^20 bit patterns: about 3 expected


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
def test_codes_special_values():
    x = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1.0, -3.0, 1e-30, -1e-30, 448.0])
    s = torch.tensor([1.0, 1.0, 1.0, float("inf"), float("inf"), float("inf"), float("inf"), 1.0, 1.0, 1.0])
    q0, flag = _codes(x, s)
    assert _bits(q0[0]) == _bits(torch.tensor(-0.0)) and not flag[0]  # -0 keeps its sign: code -0
    assert _bits(q0[1]) == 0 and not flag[1]
    # NaN; an infinite x (its row's scale is infinite): x * r is x / scale already (NaN), no division needed
    assert torch.isnan(q0[2:5]).all() and torch.isnan(x[2:5] / s[2:5]).all() and not flag[2:5].any()
    assert torch.equal(_e4m3(q0[5:7]), _e4m3(x[5:7] / s[5:7])) and not flag[5:7].any()  # finite x / inf: (-)0
    assert not flag[7] and not flag[8] and torch.signbit(q0[8])  # tiny: e4m3 gives (-)0 either way
    assert not flag[9] and q0[9].item() == 448.0


def _bits(t):
    return t.view(torch.int32)


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


def _same_codes(q, qr) -> torch.Tensor:
    """Codes equal bit for bit, or both NaN (0x7F / 0xFF: which NaN code is not specified)."""
    a, b = q.cpu().view(torch.uint8), qr.view(torch.uint8)
    return (a == b) | (((a & 0x7F) == 0x7F) & ((b & 0x7F) == 0x7F))


@pytest.mark.parametrize("kw", [{}, dict(rows=2, warps=4), dict(max_block=512)], ids=["default", "2-rows", "looped"])
def test_quant_kernel_divides_near_boundaries(seed, kw):
    """Rows whose elements sit within ulps of every e4m3 rounding boundary (the row's own scale):
    x * (1 / scale) gets some codes wrong there, the kernel must not (its programs divide)."""
    g = torch.Generator().manual_seed(seed)
    amax = torch.exp(torch.empty(4, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e3), generator=g)).float()
    s = amax / E4M3_MAX  # the formula's scale (IEEE fp32)
    steps = torch.arange(-3, 4, dtype=torch.float64)
    q = (_boundaries()[:, None] * (1 + steps[None, :] * 2.0 ** -24)).flatten()
    x = (q[None, :] * s.double()[:, None]).float()
    x = torch.cat([amax[:, None], x, -x], dim=1)
    fast = _e4m3(x * (1 / s)[:, None])
    qr, sr = _rows_ieee(x)
    assert int((fast != qr.view(torch.uint8)).sum()) > 0, "no code of x * r is wrong here: the test tests nothing"
    qk, sk = quant_rows(_quant_fp8_kernel, x.to(DEVICE), row_tiles(x.shape[1], **kw))
    assert torch.equal(sk.cpu().view(torch.int32), sr.view(torch.int32))
    assert bool(_same_codes(qk, qr).all()), f"{int((~_same_codes(qk, qr)).sum())} codes differ from the formula"


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0, inf / inf in the interpreter's numpy
@pytest.mark.parametrize("kw", [{}, dict(max_block=64)], ids=["tiles", "looped"])
def test_quant_kernel_nan_and_inf_rows_as_the_formula(kw):
    """A NaN in a row: NaN amax, scale and codes; an infinity: infinite scale, (-)0 for finite
    elements, NaN for the infinity (inf / inf) -- torch's formula, not a silent +-448."""
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    x[0, 5], x[1, 7], x[2, 3] = float("nan"), float("inf"), -float("inf")
    q, s = quant_rows(_quant_fp8_kernel, x.to(DEVICE), row_tiles(300, **kw))
    qr, sr = _rows_ieee(x)
    s = s.cpu()
    assert torch.isnan(s[0]).all() and torch.isinf(s[1:3]).all() and torch.equal(s[3], sr[3])
    assert bool(_same_codes(q, qr).all()), f"{int((~_same_codes(q, qr)).sum())} codes differ from the formula"
    assert bool(((q.cpu()[0].view(torch.uint8) & 0x7F) == 0x7F).all())  # every code of the NaN row is NaN
    qg, sg = quant_rows(_gelu_quant_fp8_kernel, x.to(DEVICE), row_tiles(300, **kw))
    assert torch.isnan(sg.cpu()[0]).all() and bool(((qg.cpu()[0].view(torch.uint8) & 0x7F) == 0x7F).all())


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
    assert [sorted(r.get("probes", {})) for r in rows] == [["probe: tile copy", "probe: x*r cast", "torch cast"]] * 2 + [[], []]
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
