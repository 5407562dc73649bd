"""adaLN modulation (wan.dit.modulate): LayerNorm without affine, then scale and shift.

For one row x of width C (x32 = x.float()), with the per-sample or per-token shift/scale rows:

    mean = sum(x32) / C,   var = sum((x32 - mean)^2) / C        (biased, as F.layer_norm)
    n    = cast_to(x.dtype)( (x32 - mean) * rsqrt(var + eps) )   # official WanLayerNorm rounding
    out  = n * (1 + scale) + shift                               # fp32

`round_norm=False` keeps n in fp32 (the LayerNorm of x.float(): diffusers' FP32LayerNorm order).

`layer_norm` (wan.dit.layer_norm: the blocks' affine norm3 before the cross-attention) is the same
kernel with AFFINE: out = n * weight + bias, n in fp32, weight and bias [C] read as rows of stride 0,
stored in `out_dtype` (bf16 for the cross-attention's q Linear: one read of x and a bf16 write
instead of an fp32 LayerNorm output that autocast reads again to cast). Floor at 720p (75,600 x 5120
fp32 in, bf16 out): 2.32 GB -> 555 us; the unfused LayerNorm + cast moved 5.42 GB (1.30 ms), in each
of 40 blocks.

stored as float32 or `out_dtype`. shift/scale are [B, 1, C] (often non-contiguous views m[:, i:i+1]
of a [B, 6, C] tensor: any batch stride) or [B, L, C]; they are addressed by (batch, token)
strides, the token stride being 0 for per-sample rows. One program per row; rows up to 8192 wide
are held in registers (one read of x), wider rows loop (three reads). The row addressing and the
LayerNorm statistics are jit helpers (`modulation_rows`, `layer_norm_block`, `layer_norm_looped`)
shared with modulate_quant_fp8.py.

`modulate` launches the kernel; call it only where `modulate_supports` says yes.

Per-token rows (`modulate_rows`, wan.dit.modulate_rows; the TI2V image mode's two timesteps):
shift and scale are tables [K, C] (any row stride, last stride 1; often views m[:, i] of a
[K, 6, C] tensor) and token (b, l) reads row k = index[b, l] (index [B, L] int32 / int64, any
strides). Same math per row; the [B, L, C] per-token shift/scale the official code holds are never
made. Floor: that of `modulate` (x read once, out written once; the K table rows stay in cache
and the index adds 4 bytes per row of C elements). The index entries must lie in [0, K): not
checked (that would need a device sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import (KERNEL_OUT_DTYPES, broadcast_rows, broadcasts_to, cast_to, jit, launchable, num_warps_for,
                     register_op, round_to, row_block, rows_problem, tl, unsupported_tensors, verdict)

__all__ = ["modulate", "modulate_supports", "layer_norm", "layer_norm_supports", "modulate_rows", "modulate_rows_supports"]


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
def _modulate_store(d, rstd, sh_ptrs, sc_ptrs, y_ptrs, mask, X_DT: tl.constexpr, ROUND_NORM: tl.constexpr,
                    AFFINE: tl.constexpr):
    """Centred row d: n = d * rstd (rounded to X_DT when ROUND_NORM), then n * (1 + scale) + shift (AFFINE:
    n * scale + shift, scale and shift the LayerNorm's weight and bias), stored."""
    n = d * rstd
    if ROUND_NORM:
        n = round_to(n, X_DT)
    sh = tl.load(sh_ptrs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptrs, mask=mask, other=0.0).to(tl.float32)
    if AFFINE:
        y = n * sc + sh
    else:
        y = n * (1.0 + sc) + sh
    tl.store(y_ptrs, cast_to(y, y_ptrs.dtype.element_ty), mask=mask)


@jit
def _modulate_row(x_row, sh_row, sc_row, y_row, n_cols, eps, X_DT: tl.constexpr, ROUND_NORM: tl.constexpr,
                  BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, AFFINE: tl.constexpr = False):
    """One row: LayerNorm statistics (one read, or looped), then `_modulate_store` block by block."""
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < n_cols
        d, rstd = layer_norm_block(x_row + cols, mask, n_cols, eps)
        _modulate_store(d, rstd, sh_row + cols, sc_row + cols, y_row + cols, mask, X_DT, ROUND_NORM, AFFINE)
    else:
        mean, rstd = layer_norm_looped(x_row, n_cols, eps, BLOCK)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            _modulate_store(x - mean, rstd, sh_row + c, sc_row + c, y_row + c, mask, X_DT, ROUND_NORM, AFFINE)


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
                     ONE_PASS: tl.constexpr,   # whole row in one block (one read) or loops (three reads)
                     AFFINE: tl.constexpr):    # n * SCALE + SHIFT (a LayerNorm's weight and bias), not n * (1 + SCALE)
    row = tl.program_id(0).to(tl.int64)
    x_row, sh_row, sc_row = modulation_rows(X, SHIFT, SCALE, row, seq_len, stride_xb, stride_xl, stride_hb,
                                            stride_hl, stride_cb, stride_cl)
    _modulate_row(x_row, sh_row, sc_row, Y + row * n_cols, n_cols, eps, X.dtype.element_ty, ROUND_NORM, BLOCK,
                  ONE_PASS, AFFINE)


def _launch_modulate(x3: torch.Tensor, shift3: torch.Tensor, scale3: torch.Tensor, y3: torch.Tensor,
                     eps: float, round_norm: bool, affine: bool = False) -> None:
    """x3/shift3/scale3 [B, L, C] (last stride 1; shift/scale may have zero strides), y3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block, one_pass = row_block(C)
    launchable(_modulate_kernel)[(B * L,)](
        x3, shift3, scale3, y3, L, x3.stride(0), x3.stride(1), shift3.stride(0), shift3.stride(1),
        scale3.stride(0), scale3.stride(1), C, eps,
        ROUND_NORM=round_norm, BLOCK=block, ONE_PASS=one_pass, AFFINE=affine,
        num_warps=num_warps_for(block, max_warps=4))


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


def _layer_norm_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else x.dtype)


@register_op("layer_norm", _modulate_kernel, _layer_norm_fake)
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype if out_dtype is not None else x.dtype, device=x.device)
    _launch_modulate(x, broadcast_rows(bias, x.shape), broadcast_rows(weight, x.shape), y, eps, round_norm=False,
                     affine=True)
    return y


def layer_norm_supports(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        out_dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = "" if weight is not None and bias is not None else "no affine weight and bias"
    if not why:
        why = unsupported_tensors(x, weight, bias)
    if not why:
        C = x.shape[-1] if x.dim() else 0
        if x.dim() != 3:
            why = f"x {tuple(x.shape)} is not [B, L, C]"
        elif out_dtype not in KERNEL_OUT_DTYPES:
            why = f"out_dtype {out_dtype}"
        elif tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
            why = f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} are not [{C}]"
    return verdict(why)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm of x.float() (fp32 statistics) * weight + bias in fp32, stored in `out_dtype` (default
    x's dtype): wan.dit.layer_norm's signature and result (inputs as `layer_norm_supports` accepts)."""
    return _layer_norm_op(x, weight, bias, float(eps), out_dtype)


# ------------------------------------------------------------------------------------------
# per-token rows: shift / scale tables [K, C] selected by a token index
# ------------------------------------------------------------------------------------------

@jit
def _modulate_rows_kernel(X,            # input x [B, L, C], last stride 1
                          SHIFT,        # shift table [K, C], last stride 1
                          SCALE,        # scale table [K, C], last stride 1
                          INDEX,        # token -> table row, [B, L] int32 / int64 (any strides)
                          Y,            # output [B, L, C], contiguous, fp32 or out_dtype
                          seq_len,      # L, to split the row index into (batch, token)
                          stride_xb,    # X batch stride
                          stride_xl,    # X token stride
                          stride_hk,    # SHIFT row stride
                          stride_ck,    # SCALE row stride
                          stride_ib,    # INDEX batch stride (0: one index row for the batch)
                          stride_il,    # INDEX token stride
                          n_cols,       # C, the normalised width
                          eps,          # added to the variance
                          ROUND_NORM: tl.constexpr,  # round the normalised row to x's dtype (official) or keep fp32
                          BLOCK: tl.constexpr,      # columns per block (power of two)
                          ONE_PASS: tl.constexpr):  # whole row in one block (one read) or loops (three reads)
    row = tl.program_id(0).to(tl.int64)
    bi = row // seq_len
    li = row - bi * seq_len
    k = tl.load(INDEX + bi * stride_ib + li * stride_il).to(tl.int64)
    _modulate_row(X + bi * stride_xb + li * stride_xl, SHIFT + k * stride_hk, SCALE + k * stride_ck,
                  Y + row * n_cols, n_cols, eps, X.dtype.element_ty, ROUND_NORM, BLOCK, ONE_PASS)


def _launch_modulate_rows(x3, shift, scale, index, y3, eps: float, round_norm: bool) -> None:
    """x3 [B, L, C] and the [K, C] tables with last stride 1, index [B, L], y3 contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    block, one_pass = row_block(C)
    launchable(_modulate_rows_kernel)[(B * L,)](
        x3, shift, scale, index, y3, L, x3.stride(0), x3.stride(1), shift.stride(0), scale.stride(0),
        index.stride(0), index.stride(1), C, eps,
        ROUND_NORM=round_norm, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps_for(block, max_warps=4))


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _modulate_rows_fake(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float,
                        out_dtype: Optional[torch.dtype], round_norm: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32)


@register_op("modulate_rows", _modulate_rows_kernel, _modulate_rows_fake)
def _modulate_rows_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float,
                      out_dtype: Optional[torch.dtype], round_norm: bool) -> torch.Tensor:
    x = _last_contiguous(x)
    y = torch.empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32, device=x.device)
    _launch_modulate_rows(x, _last_contiguous(shift), _last_contiguous(scale), index.expand(x.shape[:2]), y, eps,
                          round_norm)
    return y


def modulate_rows_supports(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float,
                           out_dtype: Optional[torch.dtype] = None, round_norm: bool = True) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, shift, scale)
    if not why:
        why = f"out_dtype {out_dtype}" if out_dtype not in KERNEL_OUT_DTYPES else rows_problem(x, (shift, scale), index)
    return verdict(why)


def modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float,
                  out_dtype: Optional[torch.dtype] = None, round_norm: bool = True) -> torch.Tensor:
    """modulate() with the shift/scale rows of each token taken from [K, C] tables by `index`
    [B or 1, L]; same signature and result as wan.dit.modulate_rows (inputs as
    `modulate_rows_supports` accepts)."""
    return _modulate_rows_op(x, shift, scale, index, float(eps), out_dtype, bool(round_norm))
