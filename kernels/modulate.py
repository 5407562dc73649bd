"""adaLN modulation (wan.dit.modulate): LayerNorm without affine, then scale and shift.

For one row x of width C (x32 = x.float()), with the per-sample or per-token shift/scale rows:

    mean = sum(x32) / C,   var = sum((x32 - mean)^2) / C        (biased, as F.layer_norm)
    n    = cast_to(x.dtype)( (x32 - mean) * rsqrt(var + eps) )   # official WanLayerNorm rounding
    out  = n * (1 + scale) + shift                               # fp32

stored as float32 or `out_dtype`. shift/scale are [B, 1, C] (often non-contiguous views m[:, i:i+1]
of a [B, 6, C] tensor: any batch stride) or [B, L, C]; they are addressed by (batch, token)
strides, the token stride being 0 for per-sample rows. One program per row; rows up to 8192 wide
are held in registers (one read of x), wider rows loop (three reads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import broadcast_rows, cast_to, jit, round_to, launchable, num_warps_for, register_op, row_block, tl, use_triton

__all__ = ["modulate", "torch_modulate"]


@jit
def _modulate_kernel(X, SHIFT, SCALE, Y, seq_len, stride_xb, stride_xl, stride_hb, stride_hl,
                     stride_cb, stride_cl, n_cols, eps, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    bi = row // seq_len
    li = row - bi * seq_len
    x_row = X + bi * stride_xb + li * stride_xl
    sh_row = SHIFT + bi * stride_hb + li * stride_hl
    sc_row = SCALE + bi * stride_cb + li * stride_cl
    y_row = Y + row * n_cols
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        d = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / n_cols + eps)
        n = round_to(d * rstd, X.dtype.element_ty)
        sh = tl.load(sh_row + cols, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(sc_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, cast_to(n * (1.0 + sc) + sh, Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            acc += tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            n = round_to((x - mean) * rstd, X.dtype.element_ty)
            sh = tl.load(sh_row + c, mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(sc_row + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, cast_to(n * (1.0 + sc) + sh, Y.dtype.element_ty), mask=mask)


def _launch_modulate(x3: torch.Tensor, shift3: torch.Tensor, scale3: torch.Tensor, y3: torch.Tensor,
                     eps: float) -> None:
    """x3/shift3/scale3 [B, L, C] (last stride 1; shift/scale may have zero strides), y3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block, one_pass = row_block(C)
    launchable(_modulate_kernel)[(B * L,)](
        x3, shift3, scale3, y3, L, x3.stride(0), x3.stride(1), shift3.stride(0), shift3.stride(1),
        scale3.stride(0), scale3.stride(1), C, eps,
        BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=4))


def _modulate_fake(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32)


@register_op("modulate", _modulate_kernel, _modulate_fake)
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                 out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32, device=x.device)
    _launch_modulate(x, broadcast_rows(shift, x.shape), broadcast_rows(scale, x.shape), y, eps)
    return y


def torch_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-torch fallback, the reference math."""
    n = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype).float()
    out = n * (1 + scale) + shift
    return out if out_dtype is None else out.to(out_dtype)


def _broadcasts_to(t: torch.Tensor, shape) -> bool:
    if t.dim() > len(shape):
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(t.shape), reversed(shape)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm (no affine, fp32 stats, rounded to x.dtype) * (1 + scale) + shift, fp32 math;
    float32 out or `out_dtype`. Same signature and result dtype as wan.dit.modulate."""
    if (x.dim() == 3 and use_triton(x, shift, scale)
            and (out_dtype is None or out_dtype in (torch.float32, torch.bfloat16, torch.float16))
            and _broadcasts_to(shift, x.shape) and _broadcasts_to(scale, x.shape)):
        return _modulate_op(x, shift, scale, float(eps), out_dtype)
    return torch_modulate(x, shift, scale, eps, out_dtype)
