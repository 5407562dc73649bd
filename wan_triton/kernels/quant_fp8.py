"""Per-row (per-token) e4m3 quantization of a [M, K] tensor, for the fp8 matrix products.

For one row x of width K (x32 = x.float()):

    amax  = max_k |x32[k]|
    scale = max(amax, AMAX_FLOOR) / 448                       fp32, IEEE division (one per row)
    q[k]  = e4m3( clamp(x32[k] / scale, -448, 448) )          round to nearest even, IEEE division

so that x ~= q * scale, the largest |x| of the row landing on 448 (the e4m3fn maximum). A zero
row gets scale AMAX_FLOOR / 448 (finite, > 0) and q = 0. AMAX_FLOOR = 1e-12 keeps the scale a
normal fp32 number. Returns q (float8_e4m3fn, the input's shape) and scale (fp32, [..., 1]).

One program per row; rows up to 16384 wide (5120 and 13824 in the A14B DiT) are held in
registers (one read of x), wider rows loop (amax pass, then the quantize-and-write pass).

The row skeleton is shared, as jit helpers, with gelu_quant_fp8.py and modulate_quant_fp8.py,
which quantize y = f(x) for their own f: `e4m3_quant_block` (whole row in registers),
`e4m3_quant_looped` (two passes over x, f applied in each), `e4m3_quant_row` (either, by
ONE_PASS). Padded lanes (past K) must hold y = 0: the amax starts from 0 and |y| >= 0, so zeros
leave it unchanged, and the store masks them out.

The Triton interpreter does not round fp32 -> e4m3 correctly (it truncates and flushes
subnormals), though it stores exactly representable values right: under TRITON_INTERPRET=1 the
kernels round to the e4m3 grid by hand (`e4m3_round`), so interpreted and compiled kernels give
the same bits.

`quant_fp8` launches the kernel; call it only where `quant_fp8_supports` says yes.
"""
from __future__ import annotations

import os

import torch

from ._utils import jit, launchable, num_warps_for, register_op, row_block, tl, triton_available, \
    unsupported_tensors, verdict

__all__ = ["quant_fp8", "quant_fp8_supports", "E4M3_MAX", "AMAX_FLOOR", "FP8_DTYPE"]

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
MAX_FP8_ROW_BLOCK = 16384  # widest row held in registers (13824 -> 16384, 16 warps)

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
        launchable(kernel)[(M,)](x2, q.view(-1, K), s.view(-1), x2.stride(0), K, AMAX_FLOOR,
                                 BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block))
    return q, s


def quant_rows_fake(x: torch.Tensor, max_block: int):
    return (x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@register_op("quant_fp8", _quant_fp8_kernel, quant_rows_fake)
def _quant_op(x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_rows(_quant_fp8_kernel, x, max_block)


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
