"""adaLN modulation (wan.dit.modulate): LayerNorm without affine, then scale and shift.

For one row x of width C (x32 = x.float()), with the per-sample or per-token shift/scale rows:

    mean = sum(x32) / C,   var = sum((x32 - mean)^2) / C        (biased, as F.layer_norm)
    n    = cast_to(x.dtype)( (x32 - mean) * rsqrt(var + eps) )   # official WanLayerNorm rounding
    out  = n * (1 + scale) + shift                               # fp32

`round_norm=False` keeps n in fp32 (the LayerNorm of x.float(): diffusers' FP32LayerNorm order).

stored as float32 or `out_dtype`. shift/scale are [B, 1, C] (often non-contiguous views m[:, i:i+1]
of a [B, 6, C] tensor: any batch stride) or [B, L, C]; they are addressed by (batch, token)
strides, the token stride being 0 for per-sample rows. One program per row; rows up to 8192 wide
are held in registers (one read of x), wider rows loop (three reads). The row addressing and the
LayerNorm statistics are jit helpers (`modulation_rows`, `layer_norm_block`, `layer_norm_looped`)
shared with modulate_quant_fp8.py.

`modulate` launches the kernel; call it only where `modulate_supports` says yes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import (KERNEL_OUT_DTYPES, broadcast_rows, broadcasts_to, cast_to, jit, launchable, num_warps_for,
                     register_op, round_to, row_block, tl, unsupported_tensors, verdict)

__all__ = ["modulate", "modulate_supports"]


@jit
def modulation_rows(X, SHIFT, SCALE, row, seq_len, stride_xb, stride_xl, stride_hb, stride_hl, stride_cb,
                    stride_cl):
    """Pointers to row `row` (= batch * seq_len + token) of x, shift and scale."""
    bi = row // seq_len
    li = row - bi * seq_len
    return (X + bi * stride_xb + li * stride_xl, SHIFT + bi * stride_hb + li * stride_hl,
            SCALE + bi * stride_cb + li * stride_cl)


@jit
def layer_norm_block(x_ptrs, mask, n_cols, eps):
    """The whole row read once: (d, rstd), d = x32 - mean (0 outside the mask), rstd = rsqrt(var + eps)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=0) / n_cols + eps)
    return d, rstd


@jit
def layer_norm_looped(x_row, n_cols, eps, BLOCK: tl.constexpr):
    """(mean, rstd) of the row read in BLOCK-column blocks, twice (mean, then the centred variance)."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        acc += tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        d = tl.where(mask, tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    return mean, tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)


@jit
def _modulate_store(d, rstd, sh_ptrs, sc_ptrs, y_ptrs, mask, X_DT: tl.constexpr, ROUND_NORM: tl.constexpr):
    """Centred row d: n = d * rstd (rounded to X_DT when ROUND_NORM), then n * (1 + scale) + shift, stored."""
    n = d * rstd
    if ROUND_NORM:
        n = round_to(n, X_DT)
    sh = tl.load(sh_ptrs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, cast_to(n * (1.0 + sc) + sh, y_ptrs.dtype.element_ty), mask=mask)


@jit
def _modulate_kernel(X,            # input x [B, L, C], last stride 1
                     SHIFT,        # shift rows, addressed [B, L, C] (token stride 0 when per sample)
                     SCALE,        # scale rows, same addressing as SHIFT
                     Y,            # output [B, L, C], contiguous, fp32 or out_dtype
                     seq_len,      # L, to split the row index into (batch, token)
                     stride_xb,    # X batch stride
                     stride_xl,    # X token stride
                     stride_hb,    # SHIFT batch stride
                     stride_hl,    # SHIFT token stride (0: one row per sample)
                     stride_cb,    # SCALE batch stride
                     stride_cl,    # SCALE token stride (0: one row per sample)
                     n_cols,       # C, the normalised width
                     eps,          # added to the variance
                     ROUND_NORM: tl.constexpr,  # round the normalised row to x's dtype (official) or keep fp32
                     BLOCK: tl.constexpr,      # columns per block (power of two)
                     ONE_PASS: tl.constexpr):  # whole row in one block (one read) or loops (three reads)
    row = tl.program_id(0).to(tl.int64)
    x_row, sh_row, sc_row = modulation_rows(X, SHIFT, SCALE, row, seq_len, stride_xb, stride_xl, stride_hb,
                                            stride_hl, stride_cb, stride_cl)
    y_row = Y + row * n_cols
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        d, rstd = layer_norm_block(x_row + cols, mask, n_cols, eps)
        _modulate_store(d, rstd, sh_row + cols, sc_row + cols, y_row + cols, mask, X.dtype.element_ty, ROUND_NORM)
    else:
        mean, rstd = layer_norm_looped(x_row, n_cols, eps, BLOCK)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            _modulate_store(x - mean, rstd, sh_row + c, sc_row + c, y_row + c, mask, X.dtype.element_ty, ROUND_NORM)


def _launch_modulate(x3: torch.Tensor, shift3: torch.Tensor, scale3: torch.Tensor, y3: torch.Tensor,
                     eps: float, round_norm: bool) -> None:
    """x3/shift3/scale3 [B, L, C] (last stride 1; shift/scale may have zero strides), y3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block, one_pass = row_block(C)
    launchable(_modulate_kernel)[(B * L,)](
        x3, shift3, scale3, y3, L, x3.stride(0), x3.stride(1), shift3.stride(0), shift3.stride(1),
        scale3.stride(0), scale3.stride(1), C, eps,
        ROUND_NORM=round_norm, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=4))


def _modulate_fake(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype], round_norm: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32)


@register_op("modulate", _modulate_kernel, _modulate_fake)
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                 out_dtype: Optional[torch.dtype], round_norm: bool) -> torch.Tensor:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32, device=x.device)
    _launch_modulate(x, broadcast_rows(shift, x.shape), broadcast_rows(scale, x.shape), y, eps, round_norm)
    return y


def modulate_supports(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                      out_dtype: Optional[torch.dtype] = None, round_norm: bool = True) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, shift, scale)
    if not why:
        if x.dim() != 3:
            why = f"x {tuple(x.shape)} is not [B, L, C]"
        elif out_dtype not in KERNEL_OUT_DTYPES:
            why = f"out_dtype {out_dtype}"
        elif not (broadcasts_to(shift, x.shape) and broadcasts_to(scale, x.shape)):
            why = f"shift {tuple(shift.shape)} / scale {tuple(scale.shape)} do not broadcast to {tuple(x.shape)}"
    return verdict(why)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             out_dtype: Optional[torch.dtype] = None, round_norm: bool = True) -> torch.Tensor:
    """LayerNorm (no affine, fp32 stats, rounded to x.dtype) * (1 + scale) + shift, fp32 math;
    float32 out or `out_dtype`. Same signature and result dtype as wan.dit.modulate (inputs as
    `modulate_supports` accepts). `round_norm=False`: the normalised row stays fp32."""
    return _modulate_op(x, shift, scale, float(eps), out_dtype, bool(round_norm))
