"""Gated residual (wan.dit.gated_residual), out of place:

    out = x + y * gate

fp32 math. The product is rounded to promote(y, gate) when that is a 16-bit type (all-bf16 or
all-fp16 operands), and the result is stored in `out_dtype` when given (diffusers' residual
stream: `(x.float() + y * gate).type_as(x)`), else in promote(x, promote(y, gate)) (fp32 in the model:
fp32 or bf16 x, bf16 y, fp32 gate). x and y are [B, L, C]; gate is [B, 1, C] (a strided view
m[:, i:i+1] of the [B, 6, C] modulation: any batch stride, token stride 0) or [B, L, C].
Grid: (row, column block), int64 row offsets, so tensors past 2^31 elements index correctly.

`gated_residual` launches the kernel; call it only where `gated_residual_supports` says yes.

Per-token rows (`gated_residual_rows`, wan.dit.gated_residual_rows): the gate is a table [K, C]
(any row stride, last stride 1) and token (b, l) reads row index[b, l] (index [B or 1, L] int32 /
int64). Same math and rounding per element; the floor is that of `gated_residual` (the table
rows stay in cache). Index entries must lie in [0, K) (not checked: no device sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import (ELEMWISE_BLOCK, KERNEL_OUT_DTYPES, broadcast_rows, broadcasts_to, cast_to, cdiv, jit, launchable, next_pow2,
                     register_op, round_to, rows_problem, tl, unsupported_tensors, verdict)

__all__ = ["gated_residual", "gated_residual_supports", "gated_residual_rows", "gated_residual_rows_supports"]


@jit
def _gated_residual_store(x_ptrs, y_ptrs, g_ptrs, out_ptrs, mask, Y_DT: tl.constexpr, ROUND_PROD: tl.constexpr):
    """out = x + y * gate in fp32, the product rounded to Y_DT first when ROUND_PROD."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    p = y * g
    if ROUND_PROD:
        p = round_to(p, Y_DT)
    tl.store(out_ptrs, cast_to(x + p, out_ptrs.dtype.element_ty), mask=mask)


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
    _gated_residual_store(X + bi * stride_xb + li * stride_xl + c, Y + bi * stride_yb + li * stride_yl + c,
                          G + bi * stride_gb + li * stride_gl + c, OUT + row * n_cols + c, c < n_cols,
                          Y.dtype.element_ty, ROUND_PROD)


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


# ------------------------------------------------------------------------------------------
# per-token rows: a gate table [K, C] selected by a token index
# ------------------------------------------------------------------------------------------

@jit
def _gated_residual_rows_kernel(X,          # residual stream x [B, L, C], last stride 1
                                Y,          # branch output y [B, L, C], last stride 1
                                G,          # gate table [K, C], last stride 1
                                INDEX,      # token -> gate row, [B, L] int32 / int64 (any strides)
                                OUT,        # output [B, L, C], contiguous, promote(x, y, gate)
                                seq_len,    # L, to split the row index into (batch, token)
                                stride_xb,  # X batch stride
                                stride_xl,  # X token stride
                                stride_yb,  # Y batch stride
                                stride_yl,  # Y token stride
                                stride_gk,  # G row stride
                                stride_ib,  # INDEX batch stride (0: one index row for the batch)
                                stride_il,  # INDEX token stride
                                n_cols,     # C
                                ROUND_PROD: tl.constexpr,  # round y * gate to y's dtype (16-bit promote(y, gate))
                                BLOCK: tl.constexpr):      # columns per program (power of two)
    row = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    bi = row // seq_len
    li = row - bi * seq_len
    k = tl.load(INDEX + bi * stride_ib + li * stride_il).to(tl.int64)
    c = cb * BLOCK + tl.arange(0, BLOCK)
    _gated_residual_store(X + bi * stride_xb + li * stride_xl + c, Y + bi * stride_yb + li * stride_yl + c,
                          G + k * stride_gk + c, OUT + row * n_cols + c, c < n_cols, Y.dtype.element_ty, ROUND_PROD)


def _launch_gated_residual_rows(x3, y3, gate, index, out3) -> None:
    """x3/y3 [B, L, C] views with last stride 1, gate [K, C] with last stride 1, index [B, L], out3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block = min(ELEMWISE_BLOCK, max(16, next_pow2(C)))
    round_prod = torch.promote_types(y3.dtype, gate.dtype) != torch.float32
    launchable(_gated_residual_rows_kernel)[(B * L, cdiv(C, block))](
        x3, y3, gate, index, out3, L, x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1), gate.stride(0),
        index.stride(0), index.stride(1), C, ROUND_PROD=round_prod, BLOCK=block, num_warps=4)


def _gated_residual_rows_fake(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor,
                              out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_out_dtype(x, y, gate, out_dtype))


@register_op("gated_residual_rows", _gated_residual_rows_kernel, _gated_residual_rows_fake)
def _gated_residual_rows_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor,
                            out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    shape = x.shape
    out = torch.empty(shape, dtype=_out_dtype(x, y, gate, out_dtype), device=x.device)
    g = gate if gate.shape[-1] <= 1 or gate.stride(-1) == 1 else gate.contiguous()
    _launch_gated_residual_rows(broadcast_rows(x, shape), broadcast_rows(y, shape), g, index.expand(shape[:2]), out)
    return out


def gated_residual_rows_supports(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor,
                                 out_dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, y, gate)
    if not why:
        if out_dtype not in KERNEL_OUT_DTYPES:
            why = f"out_dtype {out_dtype}"
        elif y.shape != x.shape:
            why = f"x {tuple(x.shape)} / y {tuple(y.shape)} are not the same [B, L, C]"
        else:
            why = rows_problem(x, (gate,), index)
    return verdict(why)


def gated_residual_rows(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor,
                        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x + y * gate[index] (fp32 math, promoted output dtype or `out_dtype`); same as
    wan.dit.gated_residual_rows (inputs as `gated_residual_rows_supports` accepts)."""
    return _gated_residual_rows_op(x, y, gate, index, out_dtype)
