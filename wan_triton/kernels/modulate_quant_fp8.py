"""adaLN modulation (wan.dit.modulate) with the result quantized per row to e4m3, in one kernel:
the input of the q/k/v and first-FFN matrix products when they run in fp8.

For one row x of width C (x32 = x.float()), with the per-sample or per-token shift/scale rows:

    mean = sum(x32) / C,   var = sum((x32 - mean)^2) / C        (biased, as F.layer_norm)
    n    = cast_to(x.dtype)( (x32 - mean) * rsqrt(var + eps) )   # official WanLayerNorm rounding
    y    = n * (1 + scale) + shift                               # fp32, as wan.dit.modulate
    amax = max |y|,   s = max(amax, AMAX_FLOOR) / 448
    q    = e4m3( clamp(y / s, -448, 448) )                       # round to nearest even

y is quantized straight from fp32 (modulate's optional `out_dtype` rounding is skipped: the
product reads q, not y). Returns (q float8_e4m3fn [B, L, C], s fp32 [B, L, 1]). shift/scale are
[B, 1, C] (any batch stride) or [B, L, C], addressed by (batch, token) strides as in
wan_triton/kernels/modulate.py. Rows up to 16384 wide are held in registers as tiles (quant_fp8.py's
`row_tiles`: 5120 = 5 tiles of 1024, several narrow rows per program; one read of x), wider rows
loop one row per program (mean, variance, amax, write: four reads). The row addressing and the
looped LayerNorm statistics are modulate.py's jit helpers, the tiles and the division-free exact
codes quant_fp8.py's. The statistics of a row held in tiles are summed tile-wise, then across
the tile: another fp32 summation order than modulate.py's one-block kernel (both are fp32 sums;
the tests bound both against float64).

Floor at the 720p shape (75,600 x 5120, fp32 residual stream x): read 1.548 GB + write 0.387 GB =
1.935 GB -> 463 us at 4.18 TB/s (bf16 x, block 0: 1.161 GB -> 278 us).

`modulate_quant_fp8` launches the kernel; call it only where `modulate_quant_fp8_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import broadcast_rows, broadcasts_to, jit, launchable, register_op, round_to, tl, unsupported_tensors, \
    verdict
from .modulate import layer_norm_looped, modulation_rows
from .quant_fp8 import AMAX_FLOOR, FP8_DTYPE, MAX_FP8_ROW_BLOCK, RowTiles, e4m3_quant_looped, e4m3_quant_tiles, \
    load_tiles, row_tiles, tile_mask, tiles_amax

__all__ = ["modulate_quant_fp8", "modulate_quant_fp8_supports"]


@jit
def _modulated(d, rstd, sh_ptrs, sc_ptrs, mask, X_DT: tl.constexpr):
    """Centred row d -> n * (1 + scale) + shift in fp32, 0 outside the mask (padded lanes would
    otherwise hold n(-mean), which could raise the amax)."""
    n = round_to(d * rstd, X_DT)
    sh = tl.load(sh_ptrs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, n * (1.0 + sc) + sh, 0.0)


@jit
def _modulated_x(x, cols, mask, ARGS):
    """`_modulated` of a block of x32; ARGS = (mean, rstd, shift row, scale row, x row)."""
    mean, rstd, sh_row, sc_row, x_row = ARGS
    return _modulated(x - mean, rstd, sh_row + cols, sc_row + cols, mask, x_row.dtype.element_ty)


@jit
def _tiles_sum(ts, CHUNKS: tl.constexpr):
    """Row sums ([ROWS]) of the tiles: tile-wise, then across the tile."""
    acc = ts[0]
    for c in tl.static_range(1, CHUNKS):
        acc = acc + ts[c]
    return tl.sum(acc, axis=1)


@jit
def _modulated_tiles(xs, rmask, cols, sh_rows, sc_rows, n_cols, eps, X_DT: tl.constexpr, CHUNK: tl.constexpr,
                     CHUNKS: tl.constexpr, EVEN: tl.constexpr):
    """The rows' tiles xs (fp32, 0 outside the masks) -> tiles of n * (1 + scale) + shift (0 outside)."""
    mean = _tiles_sum(xs, CHUNKS) / n_cols
    ds = ()
    for c in tl.static_range(CHUNKS):
        ds = ds + (tl.where(tile_mask(rmask, cols, c, n_cols, CHUNK, EVEN), xs[c] - mean[:, None], 0.0),)
    sq = ()
    for c in tl.static_range(CHUNKS):
        sq = sq + (ds[c] * ds[c],)
    rstd = tl.rsqrt(_tiles_sum(sq, CHUNKS) / n_cols + eps)[:, None]
    ys = ()
    for c in tl.static_range(CHUNKS):
        off = cols[None, :] + c * CHUNK
        ys = ys + (_modulated(ds[c], rstd, sh_rows[:, None] + off, sc_rows[:, None] + off,
                              tile_mask(rmask, cols, c, n_cols, CHUNK, EVEN), X_DT),)
    return ys


@jit
def _modulate_quant_fp8_kernel(X,             # input x [B, L, C], last stride 1
                               SHIFT,         # shift rows, addressed [B, L, C] (token stride 0 when per sample)
                               SCALE,         # scale rows, same addressing as SHIFT
                               Q,             # out [B, L, C] float8_e4m3fn, contiguous
                               S,             # out [B * L] fp32 scales
                               n_rows,        # B * L
                               seq_len,       # L, to split the row index into (batch, token)
                               stride_xb,     # X batch stride
                               stride_xl,     # X token stride
                               stride_hb,     # SHIFT batch stride
                               stride_hl,     # SHIFT token stride (0: one row per sample)
                               stride_cb,     # SCALE batch stride
                               stride_cl,     # SCALE token stride (0: one row per sample)
                               n_cols,        # C, the normalised width
                               eps,           # added to the variance
                               amax_floor,    # AMAX_FLOOR
                               ROWS: tl.constexpr,    # rows per program (tiles; 1 when LOOPED)
                               CHUNK: tl.constexpr,   # columns per tile (power of two); the block width when LOOPED
                               CHUNKS: tl.constexpr,  # tiles per row (cdiv(C, CHUNK))
                               EVEN: tl.constexpr,    # CHUNK divides C (no column mask)
                               LOOPED: tl.constexpr):  # the row is wider than the registers hold: four reads of x
    pid = tl.program_id(0).to(tl.int64)
    if LOOPED:
        x_row, sh_row, sc_row = modulation_rows(X, SHIFT, SCALE, pid, seq_len, stride_xb, stride_xl, stride_hb,
                                                stride_hl, stride_cb, stride_cl)
        mean, rstd = layer_norm_looped(x_row, n_cols, eps, CHUNK)
        e4m3_quant_looped(_modulated_x, (mean, rstd, sh_row, sc_row, x_row), x_row, S + pid, Q + pid * n_cols,
                          n_cols, amax_floor, CHUNK)
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        x_rows, sh_rows, sc_rows = modulation_rows(X, SHIFT, SCALE, rows, seq_len, stride_xb, stride_xl,
                                                   stride_hb, stride_hl, stride_cb, stride_cl)
        cols = tl.arange(0, CHUNK)
        xs = load_tiles(x_rows[:, None] + cols[None, :], rmask, cols, n_cols, CHUNK, CHUNKS, EVEN)
        ys = _modulated_tiles(xs, rmask, cols, sh_rows, sc_rows, n_cols, eps, X.dtype.element_ty, CHUNK, CHUNKS,
                              EVEN)
        e4m3_quant_tiles(ys, tiles_amax(ys, CHUNKS), amax_floor, S + rows, Q + rows[:, None] * n_cols + cols[None, :],
                         rmask, cols, n_cols, CHUNK, CHUNKS, EVEN)


def launch_modulate_quant(x, sh, sc, q, s, eps: float, tiles: RowTiles) -> None:
    """Launch over x [B, L, C] (last stride 1), sh/sc broadcast rows, q/s outputs (the benchmark's sweep too)."""
    B, L, C = x.shape
    launchable(_modulate_quant_fp8_kernel)[tiles.grid(B * L)](
        x, sh, sc, q, s, B * L, L, x.stride(0), x.stride(1), sh.stride(0), sh.stride(1), sc.stride(0), sc.stride(1),
        C, eps, AMAX_FLOOR, **tiles.launch_kw())


def _fake(x, shift, scale, eps: float, max_block: int):
    return (x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@register_op("modulate_quant_fp8", _modulate_quant_fp8_kernel, _fake)
def _modulate_quant_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    B, L, C = x.shape
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((B, L, 1), dtype=torch.float32, device=x.device)
    if B * L and C:
        launch_modulate_quant(x, broadcast_rows(shift, x.shape), broadcast_rows(scale, x.shape), q, s, eps,
                              row_tiles(C, max_block))
    return q, s


def modulate_quant_fp8_supports(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float = 1e-6) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, shift, scale)
    if not why:
        if FP8_DTYPE is None:
            why = f"torch {torch.__version__} has no float8_e4m3fn"
        elif x.dim() != 3:
            why = f"x {tuple(x.shape)} is not [B, L, C]"
        elif not (broadcasts_to(shift, x.shape) and broadcasts_to(scale, x.shape)):
            why = f"shift {tuple(shift.shape)} / scale {tuple(scale.shape)} do not broadcast to {tuple(x.shape)}"
    return verdict(why)


def modulate_quant_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (no affine, rounded to x.dtype) * (1 + scale) + shift in fp32, quantized per row
    to e4m3: (q float8_e4m3fn [B, L, C], s fp32 [B, L, 1]) (math in the module docstring)."""
    return _modulate_quant_op(x, shift, scale, float(eps), int(max_block))
