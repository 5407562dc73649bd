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
then GELU again and the quantized write).

`gelu_quant_fp8` launches the kernel; call it only where `gelu_quant_fp8_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import jit, launchable, num_warps_for, register_op, tl
from .quant_fp8 import (AMAX_FLOOR, FP8_DTYPE, MAX_FP8_ROW_BLOCK, e4m3_store, fp8_row_block, quant_fp8_supports,
                        row_scale)

__all__ = ["gelu_quant_fp8", "gelu_quant_fp8_supports"]


@jit
def _gelu_tanh(x):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * tl.abs(z), 80.0)) + 1.0)  # exp(80) ~ 5.5e34: t = 1 exactly
    t = tl.where(z < 0, -t, t)
    return 0.5 * x * (1.0 + t)


@jit
def _gelu_quant_fp8_kernel(X,           # input [M, K], last stride 1
                           Q,           # out [M, K] float8_e4m3fn, contiguous
                           S,           # out [M] fp32 scales
                           stride_x,    # X row stride
                           n_cols,      # K
                           amax_floor,  # AMAX_FLOOR
                           BLOCK: tl.constexpr,
                           ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    q_row = Q + row * n_cols
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        g = _gelu_tanh(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32))
        scale = row_scale(tl.max(tl.abs(g), axis=0), amax_floor)
        tl.store(S + row, scale)
        e4m3_store(g, scale, q_row + cols, mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            g = _gelu_tanh(tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32))
            acc = tl.maximum(acc, tl.abs(g))
        scale = row_scale(tl.max(acc, axis=0), amax_floor)
        tl.store(S + row, scale)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            g = _gelu_tanh(tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32))
            e4m3_store(g, scale, q_row + c, mask)


def _gelu_quant_fake(x: torch.Tensor, max_block: int):
    return (x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@register_op("gelu_quant_fp8", _gelu_quant_fp8_kernel, _gelu_quant_fake)
def _gelu_quant_op(x: torch.Tensor, max_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    M = x2.shape[0]
    if M and K:
        block, one_pass = fp8_row_block(K, max_block)
        launchable(_gelu_quant_fp8_kernel)[(M,)](x2, q.view(-1, K), s.view(-1), x2.stride(0), K, AMAX_FLOOR,
                                                 BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block))
    return q, s


def gelu_quant_fp8_supports(x: torch.Tensor) -> tuple[bool, str]:
    """(True, '') when the kernel covers x, else (False, reason)."""
    return quant_fp8_supports(x)


def gelu_quant_fp8(x: torch.Tensor, max_block: int = MAX_FP8_ROW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(tanh) of x [..., K] in fp32, quantized per row to e4m3: (q [..., K], scale fp32 [..., 1])
    with GELU(x) ~= q * scale (math in the module docstring)."""
    return _gelu_quant_op(x, int(max_block))
