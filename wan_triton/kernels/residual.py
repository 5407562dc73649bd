"""Gated residual (wan.dit.gated_residual), out of place:

    out = x + y * gate

fp32 math. The product is rounded to promote(y, gate) when that is a 16-bit type (all-bf16 or
all-fp16 operands), and the result is stored in `out_dtype` when given (diffusers' residual
stream: `(x.float() + y * gate).type_as(x)`), else in promote(x, promote(y, gate)) (fp32 in the model:
fp32 or bf16 x, bf16 y, fp32 gate). x and y are [B, L, C]; gate is [B, 1, C] (a strided view
m[:, i:i+1] of the [B, 6, C] modulation: any batch stride, token stride 0) or [B, L, C].
Grid: (row, column block), int64 row offsets, so tensors past 2^31 elements index correctly.

`gated_residual` launches the kernel; call it only where `gated_residual_supports` says yes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import (ELEMWISE_BLOCK, KERNEL_OUT_DTYPES, broadcast_rows, broadcasts_to, cast_to, cdiv, jit, launchable, next_pow2,
                     register_op, round_to, tl, unsupported_tensors, verdict)

__all__ = ["gated_residual", "gated_residual_supports"]


@jit
def _gated_residual_kernel(X,          # residual stream x [B, L, C], last stride 1
                           Y,          # branch output y [B, L, C], last stride 1
                           G,          # gate, addressed [B, L, C] (token stride 0 when per sample)
                           OUT,        # output [B, L, C], contiguous, promote(x, y, gate)
                           seq_len,    # L, to split the row index into (batch, token)
                           stride_xb,  # X batch stride
                           stride_xl,  # X token stride
                           stride_yb,  # Y batch stride
                           stride_yl,  # Y token stride
                           stride_gb,  # G batch stride
                           stride_gl,  # G token stride (0: one gate row per sample)
                           n_cols,     # C
                           ROUND_PROD: tl.constexpr,  # round y * gate to y's dtype (16-bit promote(y, gate))
                           BLOCK: tl.constexpr):      # columns per program (power of two)
    row = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    bi = row // seq_len
    li = row - bi * seq_len
    c = cb * BLOCK + tl.arange(0, BLOCK)
    mask = c < n_cols
    x = tl.load(X + bi * stride_xb + li * stride_xl + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + bi * stride_yb + li * stride_yl + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + bi * stride_gb + li * stride_gl + c, mask=mask, other=0.0).to(tl.float32)
    p = y * g
    if ROUND_PROD:
        p = round_to(p, Y.dtype.element_ty)
    tl.store(OUT + row * n_cols + c, cast_to(x + p, OUT.dtype.element_ty), mask=mask)


def _launch_gated_residual(x3, y3, g3, out3) -> None:
    """x3/y3/g3 [B, L, C] views with last stride 1 (g3 may have zero strides), out3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block = min(ELEMWISE_BLOCK, max(16, next_pow2(C)))
    round_prod = torch.promote_types(y3.dtype, g3.dtype) != torch.float32
    grid = (B * L, cdiv(C, block))
    launchable(_gated_residual_kernel)[grid](
        x3, y3, g3, out3, L, x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
        g3.stride(0), g3.stride(1), C, ROUND_PROD=round_prod, BLOCK=block, num_warps=4)


def _out_dtype(x, y, gate, out_dtype=None):
    if out_dtype is not None:
        return out_dtype
    return torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))


def _gated_residual_fake(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                         out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_out_dtype(x, y, gate, out_dtype))


@register_op("gated_residual", _gated_residual_kernel, _gated_residual_fake)
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                       out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    shape = x.shape
    out = torch.empty(shape, dtype=_out_dtype(x, y, gate, out_dtype), device=x.device)
    _launch_gated_residual(broadcast_rows(x, shape), broadcast_rows(y, shape), broadcast_rows(gate, shape), out)
    return out


def gated_residual_supports(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                            out_dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, y, gate)
    if not why:
        if out_dtype not in KERNEL_OUT_DTYPES:
            why = f"out_dtype {out_dtype}"
        elif x.dim() != 3 or y.shape != x.shape:
            why = f"x {tuple(x.shape)} / y {tuple(y.shape)} are not the same [B, L, C]"
        elif not broadcasts_to(gate, x.shape):
            why = f"gate {tuple(gate.shape)} does not broadcast to {tuple(x.shape)}"
    return verdict(why)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x + y * gate (fp32 math, promoted output dtype or `out_dtype`); same as
    wan.dit.gated_residual (inputs as `gated_residual_supports` accepts)."""
    return _gated_residual_op(x, y, gate, out_dtype)
