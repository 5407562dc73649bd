"""The fp8 row-quantization kernels as they were before issue #34 (commit adb6d6a), frozen for
`python -m bench.bench_fp8_kernels`, which times them side by side with today's kernels in one
process: one program per row, the row padded to a power of two (5120 -> 8192), 16 warps, an IEEE
division (div.rn) per element. Not used by the package."""
from __future__ import annotations

import os

import torch

from wan_triton.kernels._utils import broadcast_rows, jit, num_warps_for, round_to, row_block, tl, triton_available
from wan_triton.kernels.modulate import layer_norm_block, layer_norm_looped, modulation_rows
from wan_triton.kernels.quant_fp8 import AMAX_FLOOR, FP8_DTYPE

MAX_FP8_ROW_BLOCK = 16384
_SOFT_FP8 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1") if triton_available() else False


@jit
def e4m3_round(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3fn value (ties to even), as fp32.

    Normal range (|v| >= 2^-6): keep 3 mantissa bits (add half an ulp minus one, plus the kept
    lowest bit, then truncate). Subnormals (|v| < 2^-6): multiples of 2^-9, rounded with the
    1.5 * 2^23 magic number (fp32 adds round to nearest even).
    """
    a = tl.abs(v)
    u = a.to(tl.uint32, bitcast=True)
    r = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20
    normal = r.to(tl.float32, bitcast=True)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    out = tl.where(a < 0.015625, sub, normal)
    return tl.where(v < 0, -out, out)


@jit
def e4m3_store(x, scale, q_ptrs, mask):
    """q = e4m3(clamp(x / scale, -448, 448)) stored (round to nearest even; exact IEEE division)."""
    v = tl.math.div_rn(x, scale)
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if _SOFT_FP8:
        q = e4m3_round(v).to(q_ptrs.dtype.element_ty)
    else:
        q = v.to(q_ptrs.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(q_ptrs, q, mask=mask)


@jit
def row_scale(amax, amax_floor):
    """scale = max(amax, floor) / 448 (IEEE division)."""
    return tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)


@jit
def e4m3_quant_block(y, amax_floor, s_ptr, q_ptrs, mask):
    """A whole row y (fp32, 0 outside the mask) quantized: scale stored at s_ptr, q at q_ptrs."""
    scale = row_scale(tl.max(tl.abs(y), axis=0), amax_floor)
    tl.store(s_ptr, scale)
    e4m3_store(y, scale, q_ptrs, mask)


@jit
def e4m3_quant_looped(F: tl.constexpr, ARGS, x_row, s_ptr, q_row, n_cols, amax_floor, BLOCK: tl.constexpr):
    """The row in BLOCK-column blocks, two reads of x: amax of y = F(x32, cols, mask, ARGS) (0 outside
    the mask), scale stored at s_ptr, then y again and q stored at q_row."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        acc = tl.maximum(acc, tl.abs(F(tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32), c, mask, ARGS)))
    scale = row_scale(tl.max(acc, axis=0), amax_floor)
    tl.store(s_ptr, scale)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        e4m3_store(F(tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32), c, mask, ARGS), scale, q_row + c, mask)


@jit
def e4m3_quant_row(F: tl.constexpr, ARGS, x_row, s_ptr, q_row, n_cols, amax_floor, BLOCK: tl.constexpr,
                   ONE_PASS: tl.constexpr):
    """y = F(x32, cols, mask, ARGS) of one row quantized: in registers (one read of x) or looped (two)."""
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = F(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), cols, mask, ARGS)
        e4m3_quant_block(y, amax_floor, s_ptr, q_row + cols, mask)
    else:
        e4m3_quant_looped(F, ARGS, x_row, s_ptr, q_row, n_cols, amax_floor, BLOCK)


@jit
def _identity(x, cols, mask, ARGS):
    return x


@jit
def _quant_fp8_kernel(X,            # input [M, K], last stride 1
                      Q,            # out [M, K] float8_e4m3fn, contiguous
                      S,            # out [M] fp32 scales
                      stride_x,     # X row stride
                      n_cols,       # K
                      amax_floor,   # AMAX_FLOOR
                      BLOCK: tl.constexpr,      # columns per block (power of two)
                      ONE_PASS: tl.constexpr):  # whole row in one block (one read) or loops (two reads)
    row = tl.program_id(0).to(tl.int64)
    e4m3_quant_row(_identity, (), X + row * stride_x, S + row, Q + row * n_cols, n_cols, amax_floor, BLOCK, ONE_PASS)


def quant_rows(kernel, x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., K], scale [..., 1]) of x [..., K] from a one-program-per-row kernel that takes
    `_quant_fp8_kernel`'s arguments (the launcher shared with gelu_quant_fp8.py)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    M = x2.shape[0]
    if M and K:
        block, one_pass = row_block(K, max_block)
        kernel[(M,)](x2, q.view(-1, K), s.view(-1), x2.stride(0), K, AMAX_FLOOR,
                                 BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block))
    return q, s



@jit
def _gelu_tanh(x):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * tl.abs(z), 80.0)) + 1.0)  # exp(80) ~ 5.5e34: t = 1 exactly
    t = tl.where(z < 0, -t, t)
    return 0.5 * x * (1.0 + t)


@jit
def _gelu_value(x, cols, mask, ARGS):
    """GELU(tanh) of the fp32 block x (0 stays 0, so padded lanes hold 0)."""
    return _gelu_tanh(x)


@jit
def _gelu_quant_fp8_kernel(X,           # input [M, K], last stride 1
                           Q,           # out [M, K] float8_e4m3fn, contiguous
                           S,           # out [M] fp32 scales
                           stride_x,    # X row stride
                           n_cols,      # K
                           amax_floor,  # AMAX_FLOOR
                           BLOCK: tl.constexpr,      # columns per block (power of two)
                           ONE_PASS: tl.constexpr):  # whole row in one block (one read) or loops (two reads)
    row = tl.program_id(0).to(tl.int64)
    e4m3_quant_row(_gelu_value, (), X + row * stride_x, S + row, Q + row * n_cols, n_cols, amax_floor, BLOCK,
                   ONE_PASS)


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
def _modulate_quant_fp8_kernel(X,             # input x [B, L, C], last stride 1
                               SHIFT,         # shift rows, addressed [B, L, C] (token stride 0 when per sample)
                               SCALE,         # scale rows, same addressing as SHIFT
                               Q,             # out [B, L, C] float8_e4m3fn, contiguous
                               S,             # out [B * L] fp32 scales
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
                               BLOCK: tl.constexpr,      # columns per block (power of two)
                               ONE_PASS: tl.constexpr):  # whole row in one block (one read) or loops (four)
    row = tl.program_id(0).to(tl.int64)
    x_row, sh_row, sc_row = modulation_rows(X, SHIFT, SCALE, row, seq_len, stride_xb, stride_xl, stride_hb,
                                            stride_hl, stride_cb, stride_cl)
    q_row = Q + row * n_cols
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        d, rstd = layer_norm_block(x_row + cols, mask, n_cols, eps)
        y = _modulated(d, rstd, sh_row + cols, sc_row + cols, mask, X.dtype.element_ty)
        e4m3_quant_block(y, amax_floor, S + row, q_row + cols, mask)
    else:
        mean, rstd = layer_norm_looped(x_row, n_cols, eps, BLOCK)
        e4m3_quant_looped(_modulated_x, (mean, rstd, sh_row, sc_row, x_row), x_row, S + row, q_row, n_cols,
                          amax_floor, BLOCK)


def quant_fp8_v1(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK):
    return quant_rows(_quant_fp8_kernel, x, max_block)


def gelu_quant_fp8_v1(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK):
    return quant_rows(_gelu_quant_fp8_kernel, x, max_block)


def modulate_quant_fp8_v1(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    B, L, C = x.shape
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((B, L, 1), dtype=torch.float32, device=x.device)
    if B * L and C:
        sh, sc = broadcast_rows(shift, x.shape), broadcast_rows(scale, x.shape)
        block, one_pass = row_block(C, max_block)
        _modulate_quant_fp8_kernel[(B * L,)](
            x, sh, sc, q, s, L, x.stride(0), x.stride(1), sh.stride(0), sh.stride(1), sc.stride(0), sc.stride(1),
            C, eps, AMAX_FLOOR, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=8))
    return q, s
