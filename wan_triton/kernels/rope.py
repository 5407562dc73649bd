"""Wan 3-D RoPE (wan.dit.rope_apply) and the fused q/k path RMSNorm + RoPE (wan.dit.rms_norm_rope).

Local token n of sample b, grid (F, H, W) = grid_sizes[b], has global index g = n + token_offset
(a sequence-parallel rank holds a slice of the sequence) and sits at

    f = g // (H*W),   h = (g % (H*W)) // W,   w = g % W          (valid when g < F*H*W)

Head dim D = 2c holds c complex pairs (x[2j], x[2j+1]) = (re, im), split into (cf, ch, cw) =
(c - 2(c//3), c//3, c//3) pairs for the frame / height / width axes. Pair j uses the position
p_j = f (j < cf), h (j < cf+ch), w (otherwise) and the angle table freqs[p_j, j]:

    out[2j]   = x[2j] * cos(t) - x[2j+1] * sin(t)
    out[2j+1] = x[2j] * sin(t) + x[2j+1] * cos(t),       t = angle(freqs[p_j, j])

same for every head; padding tokens (g >= F*H*W) pass through (cos 1, sin 0). cos/sin are the
fp32 rounding of the fp64 table (cached per freqs tensor and device); the rotation is computed
in fp32 (the reference uses fp64; the difference is a few fp32 ulps). Output fp32.

The fused variant first applies RMSNorm over the full row (width C = heads * D) with the
reference rounding: n = cast_to(x.dtype)(x32 * rstd), n * weight (rounded to promote(x, w) when
that is 16-bit), then the rotation, then the cast to `out_dtype` (fp32 by default). With
`round_norm=False` the norm follows torch's fused order instead (diffusers' q/k norm, then its
rotation of the normalised tensor): n = cast_to(x.dtype)( x32 * rstd * float32(weight) ). One read
and one write per element for rows up to 8192 wide (C = 5120 at real size); wider rows loop
over head blocks (two reads). One program per token, holding a [heads, head_dim] tile; the
position and the (cos, sin) row are computed once per token, in-kernel, from the sample's grid.
The (cf, ch, cw) split is Wan's definition (docs/rope.md), restated here because this package
imports nothing of `wan`; `freqs` is the model's table, taken as an input.

`rope_apply` / `rms_norm_rope` launch the kernel; call them only where `rope_apply_supports` /
`rms_norm_rope_supports` say yes.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ._utils import (KERNEL_OUT_DTYPES, MAX_ROW_BLOCK, cast_to, is_compiling, jit, launchable, next_pow2,
                     num_warps_for, register_op, round_to, tl, unsupported_tensors, verdict)

__all__ = ["rope_apply", "rms_norm_rope", "rope_apply_supports", "rms_norm_rope_supports", "rope_cos_sin",
           "rope_split"]


def rope_split(head_dim: int) -> tuple[int, int]:
    """(cf, ch): complex pairs of the frame and height axes (width gets the rest, = ch)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3


@jit
def _rope_tile(x, offs, mask, X, W, rstd, cs, sn, HAS_NORM: tl.constexpr, ROUND_NORM: tl.constexpr,
               ROUND_PROD: tl.constexpr, BLOCK_H: tl.constexpr, D_P2: tl.constexpr):
    """Normalise (optionally) and rotate one [BLOCK_H, D_P2] tile of heads; cs/sn are [1, D_P2/2]."""
    if HAS_NORM:
        wt = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if ROUND_NORM:
            x = round_to(x * rstd, X.dtype.element_ty) * wt
            if ROUND_PROD:
                x = round_to(x, X.dtype.element_ty)
        else:
            x = round_to(x * rstd * wt, X.dtype.element_ty)
    a, b = tl.split(tl.reshape(x, (BLOCK_H, D_P2 // 2, 2)))
    out = tl.join(a * cs - b * sn, a * sn + b * cs)
    return tl.reshape(out, (BLOCK_H, D_P2))


@jit
def _rope_kernel(X,             # input [B, L, C], C = n_heads * HEAD_DIM, last stride 1
                 W,             # RMSNorm weight [C] (any pointer when HAS_NORM is false)
                 Y,             # output [B, L, C], contiguous, fp32 or out_dtype
                 TAB,           # fp32 [n_pos, HEAD_DIM/2, 2]: (cos, sin) of the model's table
                 GRID,          # int32 [B, 3]: (F, H, W) per sample
                 seq_len,       # L, to split the row index into (batch, token)
                 token_offset,  # global index of local token 0 (sequence parallelism; 0 otherwise)
                 stride_xb,     # X batch stride
                 stride_xl,     # X token stride
                 n_heads,       # heads per token
                 n_pos,         # rows of TAB (positions beyond it are not rotated)
                 eps,           # RMSNorm epsilon
                 HAS_NORM: tl.constexpr,    # RMSNorm over the full row before the rotation
                 ROUND_NORM: tl.constexpr,  # official norm rounding (else torch's fused order)
                 ROUND_PROD: tl.constexpr,  # round n * weight to x's dtype (16-bit promote(x, w))
                 HEAD_DIM: tl.constexpr,    # D, even
                 D_P2: tl.constexpr,        # D rounded up to a power of two (tile width)
                 CF: tl.constexpr,          # complex pairs rotated by the frame position
                 CH: tl.constexpr,          # complex pairs rotated by the height position (width: the rest)
                 BLOCK_H: tl.constexpr,     # heads per tile (power of two)
                 ONE_PASS: tl.constexpr):   # all heads in one tile (one read) or a loop over head blocks
    row = tl.program_id(0).to(tl.int64)
    bi = row // seq_len
    li = row - bi * seq_len
    n_cols = n_heads * HEAD_DIM
    x_row = X + bi * stride_xb + li * stride_xl
    y_row = Y + row * n_cols
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, D_P2)
    dmask = d < HEAD_DIM
    hh = tl.arange(0, BLOCK_H)
    if ONE_PASS:  # issue the row's loads first: they do not depend on the position arithmetic
        offs = hh[:, None] * HEAD_DIM + d[None, :]
        mask = (hh[:, None] < n_heads) & dmask[None, :]
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0
        if HAS_NORM:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / n_cols + eps)
    # token position (f, h, w) from this sample's grid
    gf = tl.load(GRID + bi * 3 + 0)
    gh = tl.load(GRID + bi * 3 + 1)
    gw = tl.load(GRID + bi * 3 + 2)
    hw = gh * gw
    gi = li + token_offset                        # global token index
    valid = gi < gf * hw
    hw1 = tl.maximum(hw, 1)
    gw1 = tl.maximum(gw, 1)
    n = gi.to(tl.int32)
    f = n // hw1
    rem = n - f * hw1
    h = rem // gw1
    w = rem - h * gw1
    # one (cos, sin) row for this token, shared by all heads
    j = d // 2
    odd = d % 2
    pos = tl.where(j < CF, f, tl.where(j < CF + CH, h, w))
    lim = tl.where(valid, n_pos, 0)              # padding tokens: no table row
    tmask = dmask & (pos < lim)
    tab = tl.load(TAB + (pos * HALF + j) * 2 + odd, mask=tmask, other=0.0)
    tab = tl.where(tmask, tab, (1 - odd).to(tl.float32))         # cos 1, sin 0 when unrotated
    cs, sn = tl.split(tl.reshape(tab, (D_P2 // 2, 2)))
    cs = cs[None, :]
    sn = sn[None, :]
    if ONE_PASS:
        out = _rope_tile(x, offs, mask, X, W, rstd, cs, sn, HAS_NORM, ROUND_NORM, ROUND_PROD, BLOCK_H, D_P2)
        tl.store(y_row + offs, cast_to(out, Y.dtype.element_ty), mask=mask)
    else:
        rstd = 1.0
        if HAS_NORM:
            acc = tl.zeros([BLOCK_H, D_P2], dtype=tl.float32)
            for h0 in range(0, n_heads, BLOCK_H):
                offs = (h0 + hh)[:, None] * HEAD_DIM + d[None, :]
                mask = ((h0 + hh)[:, None] < n_heads) & dmask[None, :]
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / n_cols + eps)
        for h0 in range(0, n_heads, BLOCK_H):
            offs = (h0 + hh)[:, None] * HEAD_DIM + d[None, :]
            mask = ((h0 + hh)[:, None] < n_heads) & dmask[None, :]
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            out = _rope_tile(x, offs, mask, X, W, rstd, cs, sn, HAS_NORM, ROUND_NORM, ROUND_PROD, BLOCK_H, D_P2)
            tl.store(y_row + offs, cast_to(out, Y.dtype.element_ty), mask=mask)


def _launch_rope(x3: torch.Tensor, w: Optional[torch.Tensor], y3: torch.Tensor, tab: torch.Tensor,
                 grid: torch.Tensor, eps: float, head_dim: int, token_offset: int, round_norm: bool = True) -> None:
    """x3 [B, L, C] (last stride 1, C = heads * head_dim), w [C] or None, y3 [B, L, C] contiguous,
    tab [n_pos, head_dim/2, 2] fp32 (cos, sin), grid int32 [B, 3] contiguous."""
    B, L, C = x3.shape
    if B * L == 0 or C == 0:
        return
    n_heads = C // head_dim
    d_p2 = max(2, next_pow2(head_dim))
    block_h = min(next_pow2(n_heads), max(1, MAX_ROW_BLOCK // d_p2))
    one_pass = block_h >= n_heads
    cf, ch = rope_split(head_dim)
    has_norm = w is not None
    round_prod = has_norm and round_norm and torch.promote_types(x3.dtype, w.dtype) != torch.float32
    launchable(_rope_kernel)[(B * L,)](
        x3, w if has_norm else x3, y3, tab, grid, L, token_offset, x3.stride(0), x3.stride(1), n_heads,
        tab.shape[0], eps,
        HAS_NORM=has_norm, ROUND_NORM=round_norm, ROUND_PROD=round_prod, HEAD_DIM=head_dim, D_P2=d_p2, CF=cf, CH=ch,
        BLOCK_H=block_h, ONE_PASS=one_pass, num_warps=num_warps_for(block_h * d_p2, max_warps=8))


def _rope_fake(x: torch.Tensor, weight: Optional[torch.Tensor], tab: torch.Tensor, grid: torch.Tensor,
               eps: float, head_dim: int, out_dtype: Optional[torch.dtype], token_offset: int,
               round_norm: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32)


@register_op("rope", _rope_kernel, _rope_fake)
def _rope_op(x: torch.Tensor, weight: Optional[torch.Tensor], tab: torch.Tensor, grid: torch.Tensor,
             eps: float, head_dim: int, out_dtype: Optional[torch.dtype], token_offset: int,
             round_norm: bool) -> torch.Tensor:
    """x [B, L, C] -> [B, L, C] (C = heads * head_dim), optional RMSNorm, then RoPE."""
    if x.shape[-1] and x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype if out_dtype is not None else torch.float32, device=x.device)
    w = None if weight is None else weight.reshape(-1).contiguous()
    _launch_rope(x, w, y, tab.contiguous(), grid.contiguous(), eps, head_dim, token_offset, round_norm)
    return y


# cos/sin tables derived from the model's complex128 `freqs`: one per (freqs tensor, device)
_TAB_CACHE: dict = {}


def _make_cos_sin(freqs: torch.Tensor, device) -> torch.Tensor:
    if freqs.is_complex():
        t = torch.view_as_real(freqs.resolve_conj())
    else:  # already (re, im) pairs
        t = freqs.reshape(freqs.shape[0], -1, 2)
    return t.to(device=device, dtype=torch.float32).contiguous()


def rope_cos_sin(freqs: torch.Tensor, device) -> torch.Tensor:
    """fp32 [n_pos, head_dim/2, 2] = (cos, sin) of the complex128 table, cached per tensor and device."""
    device = torch.device(device)
    if is_compiling():
        return _make_cos_sin(freqs, device)
    key = (freqs.data_ptr(), str(freqs.device), tuple(freqs.shape), freqs._version, str(device))
    hit = _TAB_CACHE.get(key)
    if hit is not None and hit[0]() is freqs:
        return hit[1]
    if len(_TAB_CACHE) >= 16:
        _TAB_CACHE.clear()
    tab = _make_cos_sin(freqs, device)
    _TAB_CACHE[key] = (weakref.ref(freqs), tab)
    return tab


def _grid_on(grid_sizes: torch.Tensor, device) -> torch.Tensor:
    return grid_sizes.to(device=device, dtype=torch.int32).reshape(-1, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# public functions (same signatures as wan.dit) and their support checks
# ---------------------------------------------------------------------------------------------

def _rope_inputs(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor, head_dim: int,
                 token_offset) -> str:
    if head_dim <= 0 or head_dim % 2:
        return f"head_dim {head_dim} is not a positive even number"
    if freqs.dim() != 2 or freqs.shape[1] * 2 != head_dim:
        return f"freqs {tuple(freqs.shape)} is not a [positions, {head_dim // 2}] table"
    if grid_sizes.numel() != 3 * x.shape[0]:
        return f"grid_sizes {tuple(grid_sizes.shape)} is not [{x.shape[0]}, 3]"
    if not isinstance(token_offset, int) or token_offset < 0:
        return f"token_offset {token_offset!r} is not an int >= 0"
    return ""


def rope_apply_supports(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor,
                        token_offset: int = 0) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x)
    if not why:
        why = (f"x {tuple(x.shape)} is not [B, L, heads, head_dim]" if x.dim() != 4
               else _rope_inputs(x, grid_sizes, freqs, x.shape[-1], token_offset))
    return verdict(why)


def rms_norm_rope_supports(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, num_heads: int,
                           grid_sizes: torch.Tensor, freqs: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
                           token_offset: int = 0, round_norm: bool = True) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, weight)
    if not why:
        if x.dim() != 3 or num_heads <= 0 or x.shape[-1] % num_heads:
            why = f"x {tuple(x.shape)} is not [B, L, C] with C a multiple of num_heads={num_heads}"
        elif out_dtype not in KERNEL_OUT_DTYPES:
            why = f"out_dtype {out_dtype}"
        elif weight is not None and weight.numel() != x.shape[-1]:
            why = f"weight {tuple(weight.shape)} is not one row of width {x.shape[-1]}"
        else:
            why = _rope_inputs(x, grid_sizes, freqs, x.shape[-1] // num_heads, token_offset)
    return verdict(why)


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor, token_offset: int = 0) -> torch.Tensor:
    """Wan 3-D RoPE on x [B, L, heads, head_dim] -> float32, same as wan.dit.rope_apply
    (inputs as `rope_apply_supports` accepts)."""
    B, L, H, D = x.shape
    if x.stride(3) != 1 or (H > 1 and x.stride(2) != D):
        x = x.contiguous()
    y = _rope_op(x.reshape(B, L, H * D), None, rope_cos_sin(freqs, x.device),
                 _grid_on(grid_sizes, x.device), 0.0, D, None, token_offset, True)
    return y.view(B, L, H, D)


def rms_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, num_heads: int,
                  grid_sizes: torch.Tensor, freqs: torch.Tensor,
                  out_dtype: Optional[torch.dtype] = None, token_offset: int = 0,
                  round_norm: bool = True) -> torch.Tensor:
    """Fused RMSNorm (full width) + head split + RoPE: x [B, L, C] -> [B, L, heads, C/heads],
    float32 or `out_dtype`; `weight=None` skips the norm. Same as wan.dit.rms_norm_rope
    (inputs as `rms_norm_rope_supports` accepts); `round_norm=False`: torch's fused norm order."""
    B, L, C = x.shape
    D = C // num_heads
    y = _rope_op(x, weight, rope_cos_sin(freqs, x.device), _grid_on(grid_sizes, x.device),
                 float(eps), D, out_dtype, token_offset, bool(round_norm))
    return y.view(B, L, num_heads, D)
