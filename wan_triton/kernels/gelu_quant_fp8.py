"""GELU (tanh approximation) followed by per-row e4m3 quantization, in one kernel: the input of
the second FFN layer when it runs in fp8.

For one row x of width K (x32 = x.float()), all in fp32:

    g[k]  = 0.5 * x32[k] * (1 + tanh( sqrt(2/pi) * (x32[k] + 0.044715 * x32[k]^3) ))
            (torch's GELU(approximate="tanh"); tanh(z) = sign(z) * (1 - 2 / (exp(min(2|z|, 80)) + 1)))
    amax  = max_k |g[k]|,   scale = max(amax, AMAX_FLOOR) / 448
    q[k]  = e4m3( clamp(g[k] / scale, -448, 448) )          round to nearest even

g is quantized straight from fp32 (not rounded to x's dtype first). Returns (q float8_e4m3fn,
x's shape; scale fp32 [..., 1]). One program per row: rows up to 16384 wide (13824 in A14B) are
held in registers (one read of x); wider rows make two passes over x inside the kernel (amax,
then GELU again and the quantized write), through quant_fp8.py's row skeleton and launcher.

`gelu_quant_fp8` launches the kernel; call it only where `gelu_quant_fp8_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import jit, register_op, tl
from .quant_fp8 import MAX_FP8_ROW_BLOCK, e4m3_quant_row, quant_fp8_supports, quant_rows, quant_rows_fake

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


@register_op("gelu_quant_fp8", _gelu_quant_fp8_kernel, quant_rows_fake)
def _gelu_quant_op(x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_rows(_gelu_quant_fp8_kernel, x, max_block)


def gelu_quant_fp8_supports(x: torch.Tensor) -> tuple[bool, str]:
    """(True, '') when the kernel covers x, else (False, reason)."""
    return quant_fp8_supports(x)


def gelu_quant_fp8(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(tanh) of x [..., K] in fp32, quantized per row to e4m3: (q [..., K], scale fp32 [..., 1])
    with GELU(x) ~= q * scale (math in the module docstring)."""
    return _gelu_quant_op(x, int(max_block))
