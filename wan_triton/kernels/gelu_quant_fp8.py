"""GELU (tanh approximation) followed by per-row e4m3 quantization, in one kernel: the input of
the second FFN layer when it runs in fp8.

For one row x of width K (x32 = x.float()), all in fp32:

    g[k]  = 0.5 * x32[k] * (1 + tanh( sqrt(2/pi) * (x32[k] + 0.044715 * x32[k]^3) ))
            (torch's GELU(approximate="tanh"); tanh(z) = sign(z) * (1 - 2 / (exp(min(2|z|, 80)) + 1)))
    amax  = max_k |g[k]|,   scale = max(amax, AMAX_FLOOR) / 448
    q[k]  = e4m3( clamp(g[k] / scale, -448, 448) )          round to nearest even

g is quantized straight from fp32 (not rounded to x's dtype first). Returns (q float8_e4m3fn,
x's shape; scale fp32 [..., 1]). Rows up to 16384 wide (13824 in A14B: 27 tiles of 512) are
held in registers (one read of x); wider rows make two passes over x inside the kernel (amax,
then GELU again and the quantized write): quant_fp8.py's row skeleton, launcher and division-free
exact codes.

Floor at the 720p shape (75,600 x 13824 bf16): read 2.090 GB + write 1.045 GB = 3.135 GB -> 750 us
at 4.18 TB/s.

`gelu_quant_fp8` launches the kernel; call it only where `gelu_quant_fp8_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import jit, register_op, tl
from .quant_fp8 import MAX_FP8_ROW_BLOCK, e4m3_quant_rows, quant_fp8_supports, quant_rows, quant_rows_fake, \
    row_tiles

__all__ = ["gelu_quant_fp8", "gelu_quant_fp8_supports"]


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
def _gelu_tiles(xs, ARGS, CHUNKS: tl.constexpr):
    """GELU(tanh) of each fp32 tile (a tuple)."""
    ys = ()
    for c in tl.static_range(CHUNKS):
        ys = ys + (_gelu_tanh(xs[c]),)
    return ys


@jit
def _gelu_quant_fp8_kernel(X,            # input [M, K], last stride 1
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
    e4m3_quant_rows(_gelu_value, _gelu_tiles, (), X, Q, S, n_rows, stride_x, n_cols, amax_floor, ROWS, CHUNK,
                    CHUNKS, EVEN, LOOPED)


@register_op("gelu_quant_fp8", _gelu_quant_fp8_kernel, quant_rows_fake)
def _gelu_quant_op(x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_rows(_gelu_quant_fp8_kernel, x, row_tiles(x.shape[-1], max_block))


def gelu_quant_fp8_supports(x: torch.Tensor) -> tuple[bool, str]:
    """(True, '') when the kernel covers x, else (False, reason)."""
    return quant_fp8_supports(x)


def gelu_quant_fp8(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(tanh) of x [..., K] in fp32, quantized per row to e4m3: (q [..., K], scale fp32 [..., 1])
    with GELU(x) ~= q * scale (math in the module docstring)."""
    return _gelu_quant_op(x, int(max_block))
