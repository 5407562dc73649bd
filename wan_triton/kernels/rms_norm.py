"""RMSNorm over the last dimension, official rounding order (wan.dit.rms_norm).

For one row x of width C (x32 = x.float()):

    rstd = 1 / sqrt( sum(x32^2) / C + eps )
    n    = cast_to(x.dtype)( x32 * rstd )            # rounded to the input dtype first
    y    = n * weight                                # in promote(x.dtype, weight.dtype)

or, with `round_norm=False`, torch's fused order (torch.nn.functional.rms_norm since torch 2.8;
diffusers' q/k norms): y = cast_to(out)( x32 * rstd * float32(weight) ), one rounding at the store.

Math in fp32 inside the kernel; `n` is rounded to x's dtype, the product is rounded to
promote(x, weight) when that is a 16-bit type (bf16 x with bf16 weight), and the result is
stored in promote(x.dtype, weight.dtype). One program per row; rows up to 8192 wide are held in
registers (one read, one write), wider rows loop over column blocks (two reads).

`rms_norm` launches the kernel; call it only where `rms_norm_supports` says yes (wan_triton.patch
does that and falls back to the reference otherwise).
"""
from __future__ import annotations

import torch

from ._utils import (cast_to, jit, launchable, num_warps_for, register_op, round_to, row_block, tl,
                     unsupported_tensors, verdict)

__all__ = ["rms_norm", "rms_norm_supports"]


@jit
def _normalize_store(x, rstd, w_ptrs, y_ptrs, mask, X_DT: tl.constexpr, ROUND_NORM: tl.constexpr,
                     ROUND_PROD: tl.constexpr):
    """n = x * rstd (rounded to X_DT when ROUND_NORM), times the weight (rounded again when
    ROUND_PROD), stored."""
    n = x * rstd
    if ROUND_NORM:
        n = round_to(n, X_DT)
    y = n * tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROUND_PROD:
        y = round_to(y, X_DT)
    tl.store(y_ptrs, cast_to(y, y_ptrs.dtype.element_ty), mask=mask)


@jit
def _rms_norm_kernel(X,            # input rows [R, C], last stride 1
                     W,            # weight [C], contiguous
                     Y,            # output rows [R, C], dtype promote(x, weight)
                     stride_x,     # elements between two rows of X
                     stride_y,     # elements between two rows of Y
                     n_cols,       # C, the normalised width
                     eps,          # added to the mean square
                     ROUND_NORM: tl.constexpr,  # round x * rstd to x's dtype (official order) or keep fp32
                     ROUND_PROD: tl.constexpr,  # round n * weight to x's dtype (16-bit promote(x, w))
                     BLOCK: tl.constexpr,       # columns per block (power of two)
                     ONE_PASS: tl.constexpr):   # whole row in one block (one read) or a loop (two reads)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        _normalize_store(x, rstd, W + cols, y_row + cols, mask, X.dtype.element_ty, ROUND_NORM, ROUND_PROD)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            _normalize_store(x, rstd, W + c, y_row + c, mask, X.dtype.element_ty, ROUND_NORM, ROUND_PROD)


def _launch_rms_norm(x2: torch.Tensor, w: torch.Tensor, y2: torch.Tensor, eps: float, round_norm: bool) -> None:
    """x2 [R, C] (last stride 1), w [C] contiguous, y2 [R, C] contiguous."""
    rows, n_cols = x2.shape
    if rows == 0 or n_cols == 0:
        return
    block, one_pass = row_block(n_cols)
    round_prod = round_norm and torch.promote_types(x2.dtype, w.dtype) != torch.float32
    launchable(_rms_norm_kernel)[(rows,)](
        x2, w, y2, x2.stride(0), y2.stride(0), n_cols, eps,
        ROUND_NORM=round_norm, ROUND_PROD=round_prod, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=8))


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, round_norm: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@register_op("rms_norm", _rms_norm_kernel, _rms_norm_fake)
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, round_norm: bool) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if n_cols and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.reshape(-1).contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch_rms_norm(x2, w, y.view(-1, n_cols), eps, round_norm)
    return y


def rms_norm_supports(x: torch.Tensor, weight: torch.Tensor, eps: float, round_norm: bool = True) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, weight)
    if not why:
        if x.dim() < 1 or weight.dim() < 1 or weight.dim() > x.dim():
            why = f"x {tuple(x.shape)} / weight {tuple(weight.shape)}: needs 1 <= weight.dim() <= x.dim()"
        elif weight.shape[-1] != x.shape[-1] or weight.numel() != x.shape[-1]:
            why = f"weight {tuple(weight.shape)} is not one row of width {x.shape[-1]}"
    return verdict(why)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, round_norm: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim; same signature, dtype and rounding as wan.dit.rms_norm
    (inputs as `rms_norm_supports` accepts). `round_norm=False`: torch's fused order instead
    (x32 * rstd * weight in fp32, one rounding; module docstring)."""
    return _rms_norm_op(x, weight, float(eps), bool(round_norm))
