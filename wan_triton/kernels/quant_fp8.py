"""Per-row (per-token) e4m3 quantization of a [M, K] tensor, for the fp8 matrix products.

For one row x of width K (x32 = x.float()):

    amax  = max_k |x32[k]|
    scale = max(amax, AMAX_FLOOR) / 448                       fp32, IEEE division (one per row)
    q[k]  = e4m3( clamp(x32[k] / scale, -448, 448) )          round to nearest even, IEEE division

so that x ~= q * scale, the largest |x| of the row landing on 448 (the e4m3fn maximum). A zero
row gets scale AMAX_FLOOR / 448 (finite, > 0) and q = 0. AMAX_FLOOR = 1e-12 keeps the scale a
normal fp32 number. NaN propagates as in torch's formula: a row with a NaN has a NaN amax and
scale and every code NaN; a row with an infinity has an infinite scale, its finite elements the
code (-)0 and its infinities NaN (inf / inf). (Which NaN code, 0x7F or 0xFF, is not specified:
torch's cast keeps the NaN's sign; tests compare NaN-ness.) Returns q (float8_e4m3fn, the input's
shape) and scale (fp32, [..., 1]).

Floor at the 720p shape (75,600 x 5120 bf16, bench/KERNEL_FLOORS.md): read 774.1 MB + write
387.1 MB of codes + 0.3 MB of scales = 1.161 GB -> 277.9 us at 4.18 TB/s.

How a program works (`RowTiles`, `row_tiles`): it takes ROWS rows and holds them in registers as
CHUNKS tiles of [ROWS, CHUNK] columns, CHUNK a power of two that divides K where one does
(5120 = 5 x 1024, 13824 = 27 x 512: no padded lanes; else the last tile is masked): one read of
x, the amax over the tiles, then the codes tile by tile. Rows wider than `max_block` (16384 by
default; wider than anything in A14B) loop over x twice instead (amax, then codes).

The codes of x32 / scale, exactly and without a division per element (`e4m3_quant_tiles`):
with r = 1 / scale rounded (one IEEE division per row), q0 = x * r is within 1.5 fp32 ulps of the
IEEE quotient q (|x r - q| < |q| 2^-24 <= ulp(q), plus q0's own rounding). e4m3 rounding can tell
q0 from q only where an e4m3 rounding boundary lies between them, and every boundary of the normal
range is a midpoint 2^e (1 + (2m + 1) / 16): an fp32 number whose 20 low mantissa bits are 0x80000.
So where q0's 20 low bits are at least 2 ulps away from 0x80000, e4m3(q0) = e4m3(q) (powers of two
and 448's neighbourhood are grid points or saturate, not boundaries). Below 2^-6 (e4m3 subnormals,
boundaries at odd multiples of 2^-10, 2^-10 itself the tie between 0 and 2^-9), |q0| + 2^-6 puts the
same boundaries on the same bit pattern, 2^-29 apart, with less than 1.25 of those units of error:
the same test applies (`e4m3_boundary_gap`: 0, 1 or 2 that near a boundary; a program keeps the
minimum over its elements). A program with any element that near a boundary (about 3 in 2^20
random elements) divides every element with the IEEE division instead, so the codes are those of
the formula above, bit for bit. NaN and infinities need no such care: with a NaN scale r is NaN,
with an infinite one r = 0, and x * r is then what x / scale is (NaN, (-)0, inf * 0 = NaN). SASS
for sm_90 (`python -m bench.kernel_sass`, Triton 3.6, 5120-wide bf16 rows, 8 warps): 16.8
instructions per element on the fast path, loads, amax and stores included, where the previous
verified quotient (q1 = q0 + r (x - scale q0) checked against its exact remainder;
bench/bench_fp8_kernels.py keeps it for comparison) took 24.7.

The row skeleton is shared, as jit helpers, with gelu_quant_fp8.py and modulate_quant_fp8.py,
which quantize y = f(x) for their own f: `load_tiles` (the rows' tiles as fp32), `tiles_amax`,
`e4m3_quant_tiles` (scales and codes of tiles y, zero outside the masks), `e4m3_quant_looped`
(two passes over a wide row, f applied in each).

The Triton interpreter does not round fp32 -> e4m3 correctly (it truncates and flushes
subnormals), though it stores exactly representable values right: under TRITON_INTERPRET=1 the
kernels round to the e4m3 grid by hand (`e4m3_round`) and write NaN's code (0x7F) themselves, so
interpreted and compiled kernels give the same bits.

`quant_fp8` launches the kernel; call it only where `quant_fp8_supports` says yes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._utils import cdiv, jit, launchable, next_pow2, register_op, tl, triton_available, unsupported_tensors, \
    verdict

__all__ = ["quant_fp8", "quant_fp8_supports", "E4M3_MAX", "AMAX_FLOOR", "FP8_DTYPE", "RowTiles", "row_tiles"]

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
MAX_FP8_ROW_BLOCK = 16384  # widest row held in registers (13824 in A14B)
TILE_CHUNKS = (2048, 1024, 512, 256)  # tile widths tried, widest first (wide tiles: wide vector loads)
MAX_PAD = 1 / 16  # where none divides the row: the widest whose whole tiles pad it by at most this much
MAX_WARPS = 8  # H100, 2026-12-07: 8 warps beat 16 on rows of 13824 (2170 vs 2887 us) and 5120 (720 vs 965 us)
ELEMS_PER_PROGRAM = 4096  # rows per program: narrow rows are packed up to this many elements (at most 16 rows)

_SOFT_FP8 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1") if triton_available() else False


# ------------------------------------------------------------------ e4m3 rounding

@jit
def e4m3_round(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3fn value (ties to even), as fp32.

    Normal range (|v| >= 2^-6): keep 3 mantissa bits (add half an ulp minus one, plus the kept
    lowest bit, then truncate). Subnormals (|v| < 2^-6): multiples of 2^-9, rounded with the
    1.5 * 2^23 magic number (fp32 adds round to nearest even). The sign is v's sign bit (-0 and
    values that round to 0 from below give -0, as the hardware cast does).
    """
    a = tl.abs(v)
    u = a.to(tl.uint32, bitcast=True)
    r = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20
    normal = r.to(tl.float32, bitcast=True)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    out = tl.where(a < 0.015625, sub, normal).to(tl.uint32, bitcast=True)
    return (out | ((v.to(tl.uint32, bitcast=True) >> 31) << 31)).to(tl.float32, bitcast=True)


@jit
def clamp448(v):
    """clamp(v, -448, 448) with NaN kept NaN (as torch.clamp)."""
    return tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                      propagate_nan=tl.PropagateNan.ALL)


@jit
def e4m3_cast_store(v, q_ptrs, mask, CLAMP: tl.constexpr = True):
    """Store e4m3(clamp(v, -448, 448)), rounded to nearest even, NaN kept NaN (`clamp448`). The
    compiled cast saturates at +-448 by itself (satfinite) and keeps NaN: CLAMP=False leaves the
    clamp out."""
    if _SOFT_FP8:
        tl.store(q_ptrs, e4m3_round(clamp448(v)).to(q_ptrs.dtype.element_ty), mask=mask)
        # NaN's code written by hand (0x7F): the interpreter's cast of NaN writes another code
        tl.store(q_ptrs.to(tl.pointer_type(tl.uint8), bitcast=True), tl.full(v.shape, 0x7F, tl.uint8),
                 mask=mask & (v != v))
    else:
        if CLAMP:
            v = clamp448(v)
        tl.store(q_ptrs, v.to(q_ptrs.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@jit
def e4m3_store(x, scale, q_ptrs, mask):
    """q = e4m3(clamp(x / scale, -448, 448)) stored (round to nearest even; exact IEEE division)."""
    e4m3_cast_store(tl.math.div_rn(x, scale), q_ptrs, mask)


@jit
def row_scale(amax, amax_floor):
    """scale = max(amax, floor) / 448 (IEEE division; a NaN amax gives a NaN scale)."""
    return tl.math.div_rn(tl.maximum(amax, amax_floor, propagate_nan=tl.PropagateNan.ALL), 448.0)


@jit
def max_nan(a, b):
    """max(a, b), NaN if either is (the combine of the NaN-propagating amax)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# ------------------------------------------------------------------ the codes without a division

@jit
def e4m3_boundary_gap(q0):
    """(q0's 20 low mantissa bits - 0x7FFFF) mod 2^20, of |q0| + 2^-6 below 2^-6 (the module
    docstring), as uint32: 0, 1 or 2 where q0 is within one ulp of 0x80000, the pattern of every e4m3
    rounding boundary, so that e4m3(q0) may differ from e4m3 of the quotient q0 approximates (within
    1.5 ulps); larger elsewhere, NaN and infinities included (their codes need no check)."""
    a = tl.abs(q0)
    w = tl.where(a < 0.015625, a + 0.015625, a)
    return (w.to(tl.uint32, bitcast=True) + 0x80001) & 0xFFFFF


@jit
def e4m3_near_boundary(q0):
    """True where e4m3(q0) may differ from e4m3 of the quotient (`e4m3_boundary_gap` <= 2)."""
    return e4m3_boundary_gap(q0) <= 2


# ------------------------------------------------------------------ tiles of rows

@jit
def tile_mask(rmask, cols, c: tl.constexpr, n_cols, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """Mask of tile c ([ROWS, CHUNK]): rows in range, columns below n_cols (EVEN: all are)."""
    if EVEN:
        return rmask[:, None] & (cols[None, :] < CHUNK)
    else:
        return rmask[:, None] & (cols[None, :] + c * CHUNK < n_cols)


@jit
def load_tiles(ptrs, rmask, cols, n_cols, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, EVEN: tl.constexpr):
    """The rows' tiles (ptrs [ROWS, CHUNK] addresses tile 0; tile c is c * CHUNK further) as fp32,
    0 outside the mask: a tuple of CHUNKS tensors."""
    tiles = ()
    for c in tl.static_range(CHUNKS):
        m = tile_mask(rmask, cols, c, n_cols, CHUNK, EVEN)
        tiles = tiles + (tl.load(ptrs + c * CHUNK, mask=m, other=0.0).to(tl.float32),)
    return tiles


@jit
def tiles_amax(ys, CHUNKS: tl.constexpr):
    """max |y| over the tiles, per row ([ROWS]); NaN where the row has a NaN (as torch's amax)."""
    acc = tl.abs(ys[0])
    for c in tl.static_range(1, CHUNKS):
        acc = max_nan(acc, tl.abs(ys[c]))
    return tl.reduce(acc, 1, max_nan)


@jit
def e4m3_quant_tiles(ys, amax, amax_floor, s_ptrs, q_ptrs, rmask, cols, n_cols, CHUNK: tl.constexpr,
                     CHUNKS: tl.constexpr, EVEN: tl.constexpr):
    """Tiles ys (fp32, 0 outside the masks) with their row amax [ROWS]: scales stored at s_ptrs
    [ROWS], codes at q_ptrs (tile 0; [ROWS, CHUNK]) from x * (1 / scale); where one of them may
    differ from the IEEE quotient's (`e4m3_near_boundary`), the program stores the IEEE-division
    codes over its own (the same threads: ordered)."""
    scale = row_scale(amax, amax_floor)
    tl.store(s_ptrs, scale, mask=rmask)
    s2 = tl.broadcast_to(scale[:, None], ys[0].shape)
    r2 = tl.broadcast_to(tl.math.div_rn(1.0, scale)[:, None], ys[0].shape)
    gap = tl.full(ys[0].shape, 0xFFFFF, dtype=tl.uint32)
    for c in tl.static_range(CHUNKS):
        q0 = ys[c] * r2
        # no clamp: the cast saturates and keeps NaN
        e4m3_cast_store(q0, q_ptrs + c * CHUNK, tile_mask(rmask, cols, c, n_cols, CHUNK, EVEN), CLAMP=False)
        gap = tl.minimum(gap, e4m3_boundary_gap(q0))
    if tl.min(tl.min(gap, axis=1), axis=0) <= 2:
        for c in tl.static_range(CHUNKS):
            e4m3_store(ys[c], s2, q_ptrs + c * CHUNK, tile_mask(rmask, cols, c, n_cols, CHUNK, EVEN))


@jit
def e4m3_quant_looped(F: tl.constexpr, ARGS, x_row, s_ptr, q_row, n_cols, amax_floor, BLOCK: tl.constexpr):
    """One row too wide for registers, in BLOCK-column blocks, two reads of x: amax of
    y = F(x32, cols, mask, ARGS) (0 outside the mask), scale stored at s_ptr, then y again and its
    codes (IEEE division) stored at q_row."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        acc = max_nan(acc, tl.abs(F(tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32), c, mask, ARGS)))
    scale = row_scale(tl.reduce(acc, 0, max_nan), amax_floor)
    tl.store(s_ptr, scale)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        e4m3_store(F(tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32), c, mask, ARGS), scale, q_row + c, mask)


@jit
def _identity(x, cols, mask, ARGS):
    return x


@jit
def _identity_tiles(xs, ARGS, CHUNKS: tl.constexpr):
    return xs


@jit
def e4m3_quant_rows(F: tl.constexpr, F_TILES: tl.constexpr, ARGS, X, Q, S, n_rows, stride_x, n_cols, amax_floor,
                    ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, EVEN: tl.constexpr,
                    LOOPED: tl.constexpr):
    """The program's rows of y = f(x) quantized: F_TILES(tiles, ARGS, CHUNKS) maps the fp32 tiles
    (a tuple) to y's tiles (0 where x is 0 outside the masks); F is the same f on one block of a
    wide row (F(x32, cols, mask, ARGS)), used when LOOPED (one row per program)."""
    pid = tl.program_id(0).to(tl.int64)
    if LOOPED:
        e4m3_quant_looped(F, ARGS, X + pid * stride_x, S + pid, Q + pid * n_cols, n_cols, amax_floor, CHUNK)
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        cols = tl.arange(0, CHUNK)
        xs = load_tiles(X + rows[:, None] * stride_x + cols[None, :], rmask, cols, n_cols, CHUNK, CHUNKS, EVEN)
        ys = F_TILES(xs, ARGS, CHUNKS)
        e4m3_quant_tiles(ys, tiles_amax(ys, CHUNKS), amax_floor, S + rows, Q + rows[:, None] * n_cols + cols[None, :],
                         rmask, cols, n_cols, CHUNK, CHUNKS, EVEN)


@jit
def _quant_fp8_kernel(X,            # input [M, K], last stride 1
                      Q,            # out [M, K] float8_e4m3fn, contiguous
                      S,            # out [M] fp32 scales
                      n_rows,       # M
                      stride_x,     # X row stride
                      n_cols,       # K
                      amax_floor,   # AMAX_FLOOR
                      ROWS: tl.constexpr,    # rows per program (tiles; 1 when LOOPED)
                      CHUNK: tl.constexpr,   # columns per tile (power of two); the block width when LOOPED
                      CHUNKS: tl.constexpr,  # tiles per row (cdiv(K, CHUNK))
                      EVEN: tl.constexpr,    # CHUNK divides K (no column mask)
                      LOOPED: tl.constexpr):  # the row is wider than the registers hold: two reads of x
    e4m3_quant_rows(_identity, _identity_tiles, (), X, Q, S, n_rows, stride_x, n_cols, amax_floor, ROWS, CHUNK,
                    CHUNKS, EVEN, LOOPED)


# ------------------------------------------------------------------ launch

@dataclass(frozen=True)
class RowTiles:
    """How a row-quantization kernel covers rows of width K: ROWS rows per program, each held as
    CHUNKS tiles of CHUNK columns (EVEN: CHUNK divides K), `warps` per program; `looped`: one row
    per program in CHUNK-column blocks, read twice (rows wider than the registers hold)."""
    rows: int
    chunk: int
    chunks: int
    even: bool
    warps: int
    looped: bool = False

    def launch_kw(self) -> dict:
        return dict(ROWS=self.rows, CHUNK=self.chunk, CHUNKS=self.chunks, EVEN=self.even, LOOPED=self.looped,
                    num_warps=self.warps)

    def grid(self, n_rows: int) -> tuple:
        return (n_rows if self.looped else cdiv(n_rows, self.rows),)


def row_tiles(n_cols: int, max_block: int = MAX_FP8_ROW_BLOCK, rows: int | None = None,
              warps: int | None = None, chunk: int | None = None) -> RowTiles:
    """The tiling of rows of width `n_cols` (module docstring): rows wider than `max_block` loop in
    blocks of `max_block` (a power of two); narrower ones are held in registers, in tiles of the
    widest of TILE_CHUNKS that divides the row (5120: 5 x 1024, 13824: 27 x 512), else the widest
    that pads it by at most MAX_PAD (rows of at most 1024 columns: one tile of the next power of
    two), several rows per program up to ELEMS_PER_PROGRAM elements, the fewest warps (1 to
    MAX_WARPS) that hold them at <= 32 elements per thread, MAX_WARPS where none does. Measured on
    an H100 (bench/RESULTS.md section 17, `python -m bench.bench_fp8_kernels`): 27 x 512 with 8 warps
    took 2170 us for the GELU quantize at 720p, 7 x 2048 (3.7 % padding) with 16 warps 3591 us, same
    codes. `rows` / `warps` / `chunk` override the choice (the benchmark's sweep)."""
    if n_cols > max_block:
        return RowTiles(1, max_block, cdiv(n_cols, max_block), False, warps or 8, looped=True)
    if chunk is None and n_cols <= 1024:
        chunk = max(16, next_pow2(n_cols))
    elif chunk is None:
        chunk = next((c for c in TILE_CHUNKS if n_cols % c == 0), None) or next(
            (c for c in TILE_CHUNKS if cdiv(n_cols, c) * c <= n_cols * (1 + MAX_PAD)), TILE_CHUNKS[-1])
    chunks = cdiv(n_cols, chunk)
    width = chunk * chunks
    if rows is None:
        rows = 1
        while rows < 16 and rows * 2 * width <= ELEMS_PER_PROGRAM:
            rows *= 2
    if warps is None:  # the fewest warps that hold the program's elements at <= 32 per thread
        warps = 1
        while warps < MAX_WARPS and rows * width > warps * 32 * 32:
            warps *= 2
    return RowTiles(rows, chunk, chunks, n_cols % chunk == 0, warps)


def quant_rows(kernel, x: torch.Tensor, tiles: RowTiles) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., K], scale [..., 1]) of x [..., K] from a kernel that takes `_quant_fp8_kernel`'s
    arguments (the launcher shared with gelu_quant_fp8.py)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    M = x2.shape[0]
    if M and K:
        launchable(kernel)[tiles.grid(M)](x2, q.view(-1, K), s.view(-1), M, x2.stride(0), K, AMAX_FLOOR,
                                          **tiles.launch_kw())
    return q, s


def quant_rows_fake(x: torch.Tensor, max_block: int):
    return (x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@register_op("quant_fp8", _quant_fp8_kernel, quant_rows_fake)
def _quant_op(x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_rows(_quant_fp8_kernel, x, row_tiles(x.shape[-1], max_block))


def quant_fp8_supports(x: torch.Tensor) -> tuple[bool, str]:
    """(True, '') when the kernel covers x, else (False, reason)."""
    why = unsupported_tensors(x)
    if not why:
        if FP8_DTYPE is None:
            why = f"torch {torch.__version__} has no float8_e4m3fn"
        elif x.dim() < 1 or x.shape[-1] == 0:
            why = f"x {tuple(x.shape)} has no columns"
    return verdict(why)


def quant_fp8(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of x [..., K] (fp32/bf16/fp16): (q float8_e4m3fn [..., K],
    scale fp32 [..., 1]) with x ~= q * scale (math in the module docstring). `max_block` caps
    the columns held at once (tests use it to exercise the looping path)."""
    return _quant_op(x, int(max_block))
