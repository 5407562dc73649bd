"""The VAE's channel RMSNorm followed by SiLU, in one read and one write (wan.vae.rms_norm_silu).

For one position p (a (b, t, h, w) of a [B, C, T, H, W] tensor) and its channel vector x[:, p]
(x32 = x.float()), every step rounded to x's dtype as the reference's PyTorch ops round:

    n    = rnd( sqrt( sum_c x32[c]^2 ) )                F.normalize's norm (fp32 sum)
    d    = rnd( max(n, 1e-12) )                         its clamp_min
    q    = rnd( rnd( x32 / d ) * scale )                the quotient (IEEE division), times sqrt(C)
    y    = rnd( q * gamma[c] )                          gamma in x's dtype
    out  = rnd( y / (1 + exp(-y)) )                     SiLU

(rnd: round to x's dtype, nearest even; the identity in fp32). The sum's order differs from
PyTorch's, so n can differ in its last bit now and then; everything after it is the same
arithmetic.

Floor (bench/KERNEL_FLOORS.md): one read and one write of x. The eager reference makes ~11
passes (the norm, the clamp, the expand-and-divide, two products, the SiLU): at 720p the decoder
applies it to 77.9 G elements in all.

Layouts: any dense one whose H and W form one run of pixels: contiguous [B, C, T, H, W],
channels-last (`torch.channels_last_3d`), and frames first ([B, T, C, H, W] memory seen as
[B, C, T, H, W], what the decoder's frame-wise layers hand back); the output has x's strides. A
position s = (t, pixel) sits at t * stride_t + pixel * stride_hw. One program holds BLOCK_S
positions x all C channels (C <= MAX_CHANNELS, 384 in Wan2.1's VAE) in registers: the norm is a
reduction over the tile's channel axis, then each element is written once.

`rms_norm_silu` launches the kernel; call it only where `rms_norm_silu_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import cast_to, cdiv, jit, launchable, next_pow2, register_op, round_to, tl, unsupported_tensors, \
    verdict

__all__ = ["rms_norm_silu", "rms_norm_silu_supports", "MAX_CHANNELS"]

MAX_CHANNELS = 1024
TILE = 8192  # elements per program (BLOCK_C x BLOCK_S)
EPS = 1e-12  # F.normalize's default


@jit
def _rms_norm_silu_kernel(X,          # input [B, C, T, H, W], dense (any order of its dims, H and W merged)
                          G,          # gamma [C], x's dtype
                          Y,          # output, same shape, dtype and strides as X
                          n_chan,     # C
                          n_pos,      # S = T * H * W, positions per sample
                          n_hw,       # H * W
                          stride_b,   # elements between two samples
                          stride_c,   # elements between two channels
                          stride_t,   # elements between two frames
                          stride_hw,  # elements between two pixels of a frame (W's stride; H's is W times it)
                          scale,      # sqrt(C), as fp32
                          eps,        # clamp of the norm (1e-12)
                          BLOCK_C: tl.constexpr,  # channels per program (next power of two >= C)
                          BLOCK_S: tl.constexpr):  # positions per program
    pid = tl.program_id(0).to(tl.int64)
    per_sample = tl.cdiv(n_pos, BLOCK_S)
    b = pid // per_sample
    s = (pid % per_sample) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    mask = (c < n_chan)[:, None] & (s < n_pos)[None, :]
    pos = (s // n_hw).to(tl.int64) * stride_t + (s % n_hw).to(tl.int64) * stride_hw
    offs = b * stride_b + c.to(tl.int64)[:, None] * stride_c + pos[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    n = round_to(tl.sqrt(tl.sum(x * x, axis=0)), X.dtype.element_ty)
    d = round_to(tl.maximum(n, eps), X.dtype.element_ty)
    d = tl.where(s < n_pos, d, 1.0)  # positions past the end: no 0 / 0 in lanes that are not stored
    q = round_to(round_to(tl.math.div_rn(x, d[None, :]), X.dtype.element_ty) * scale, X.dtype.element_ty)
    g = tl.load(G + c, mask=c < n_chan, other=0.0).to(tl.float32)
    y = round_to(q * g[:, None], X.dtype.element_ty)
    out = tl.math.div_rn(y, 1.0 + tl.exp(-y))
    tl.store(Y + offs, cast_to(out, X.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor, scale: float) -> None:
    B, C, T, H, W = x.shape
    block_c = max(16, next_pow2(C))
    block_s = max(16, TILE // block_c)
    grid = (B * cdiv(T * H * W, block_s),)
    launchable(_rms_norm_silu_kernel)[grid](x, gamma, y, C, T * H * W, H * W, x.stride(0), x.stride(1), x.stride(2),
                                            x.stride(4), float(scale), EPS, BLOCK_C=block_c, BLOCK_S=block_s,
                                            num_warps=8 if block_c >= 256 else 4)


def _fake(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


@register_op("rms_norm_silu", _rms_norm_silu_kernel, _fake)
def _rms_norm_silu_op(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    y = torch.empty_like(x)  # a dense x: the same strides (contiguous, channels-last, frames first)
    if x.numel():
        _launch(x, gamma.reshape(-1).contiguous(), y, scale)
    return y


def _dense(x: torch.Tensor) -> bool:
    """Every element at its own offset and no gaps: the dims of size > 1, ordered by stride, each
    stride the product of the smaller dims' sizes (torch.empty_like then copies the strides)."""
    expect = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(x.shape, x.stride()) if sz > 1), key=lambda p: p[1]):
        if stride != expect:
            return False
        expect *= size
    return True


def _layout_problem(x: torch.Tensor) -> str:
    if not _dense(x):
        return f"x strides {tuple(x.stride())} for shape {tuple(x.shape)}: not dense"
    if x.shape[3] > 1 and x.stride(3) != x.shape[4] * x.stride(4):
        return f"x strides {tuple(x.stride())}: H and W are not one run of pixels"
    return ""


def rms_norm_silu_supports(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(x, gamma)
    if not why:
        if x.dim() != 5:
            why = f"x {tuple(x.shape)} is not [B, C, T, H, W]"
        elif gamma.numel() != x.shape[1]:
            why = f"gamma {tuple(gamma.shape)} does not hold one value per channel of {x.shape[1]}"
        elif gamma.dtype != x.dtype:
            why = f"gamma {gamma.dtype} with x {x.dtype} (the product would be promoted)"
        elif x.shape[1] > MAX_CHANNELS:
            why = f"{x.shape[1]} channels (the kernel holds at most {MAX_CHANNELS})"
        else:
            why = _layout_problem(x)
    return verdict(why)


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the channels of x [B, C, T, H, W]; same signature, dtype, layout and
    rounding as wan.vae.rms_norm_silu (inputs as `rms_norm_silu_supports` accepts)."""
    return _rms_norm_silu_op(x, gamma, float(scale))
