"""RMSNorm over the last dimension, official rounding order (wan.dit.rms_norm).

For one row x of width C (x32 = x.float()):

    rstd = 1 / sqrt( sum(x32^2) / C + eps )
    n    = cast_to(x.dtype)( x32 * rstd )            # rounded to the input dtype first
    y    = n * weight                                # in promote(x.dtype, weight.dtype)

Math in fp32 inside the kernel; `n` is rounded to x's dtype, the product is rounded to
promote(x, weight) when that is a 16-bit type (bf16 x with bf16 weight), and the result is
stored in promote(x.dtype, weight.dtype). One program per row; rows up to 8192 wide are held in
registers (one read, one write), wider rows loop over column blocks (two reads).
"""
from __future__ import annotations

import torch

from ._utils import (cast_to, jit, round_to, launchable, num_warps_for, register_op, row_block, tl, use_triton)

__all__ = ["rms_norm", "torch_rms_norm"]


@jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n_cols, eps,
                     ROUND_PROD: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = round_to(x * rstd, X.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = n * w
        if ROUND_PROD:
            y = round_to(y, X.dtype.element_ty)
        tl.store(y_row + cols, cast_to(y, Y.dtype.element_ty), mask=mask)
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
            n = round_to(x * rstd, X.dtype.element_ty)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            y = n * w
            if ROUND_PROD:
                y = round_to(y, X.dtype.element_ty)
            tl.store(y_row + c, cast_to(y, Y.dtype.element_ty), mask=mask)


def _launch_rms_norm(x2: torch.Tensor, w: torch.Tensor, y2: torch.Tensor, eps: float) -> None:
    """x2 [R, C] (last stride 1), w [C] contiguous, y2 [R, C] contiguous."""
    rows, n_cols = x2.shape
    if rows == 0 or n_cols == 0:
        return
    block, one_pass = row_block(n_cols)
    round_prod = torch.promote_types(x2.dtype, w.dtype) != torch.float32
    launchable(_rms_norm_kernel)[(rows,)](
        x2, w, y2, x2.stride(0), y2.stride(0), n_cols, eps,
        ROUND_PROD=round_prod, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=8))


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@register_op("rms_norm", _rms_norm_kernel, _rms_norm_fake)
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if n_cols and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.reshape(-1).contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch_rms_norm(x2, w, y.view(-1, n_cols), eps)
    return y


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch fallback, the reference math."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; same signature, dtype and rounding as wan.dit.rms_norm."""
    if (use_triton(x, weight) and x.dim() >= 1 and weight.dim() >= 1
            and weight.numel() == x.shape[-1] and weight.shape[-1] == x.shape[-1]
            and all(s == 1 for s in weight.shape[:-1]) and weight.dim() <= x.dim()):
        return _rms_norm_op(x, weight, float(eps))
    return torch_rms_norm(x, weight, eps)
