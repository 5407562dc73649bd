"""Classifier-free guidance combine (wan.pipeline.cfg_combine):

    out = uncond + scale * (cond - uncond)

fp32 math with `scale` a Python float, one rounding at the end to promote(uncond, cond)
(fp32 in the pipeline). Flat 1-D grid over the elements with int64 offsets.

`cfg_combine` launches the kernel; call it only where `cfg_combine_supports` says yes.
"""
from __future__ import annotations

import torch

from ._utils import cast_to, cdiv, jit, launchable, register_op, tl, unsupported_tensors, verdict

__all__ = ["cfg_combine", "cfg_combine_supports"]

_BLOCK = 2048


@jit
def _cfg_kernel(U,           # uncond, contiguous
                C,           # cond, contiguous, same shape
                OUT,         # output, contiguous, promote(uncond, cond)
                n_elements,  # number of elements
                scale,       # guidance scale (fp32 scalar)
                BLOCK: tl.constexpr):  # elements per program
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, cast_to(u + scale * (c - u), OUT.dtype.element_ty), mask=mask)


def _launch_cfg(u: torch.Tensor, c: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """u, c, out contiguous, same shape."""
    n = u.numel()
    if n == 0:
        return
    launchable(_cfg_kernel)[(cdiv(n, _BLOCK),)](u, c, out, n, scale, BLOCK=_BLOCK, num_warps=8)


def _cfg_fake(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond.new_empty(uncond.shape, dtype=torch.promote_types(uncond.dtype, cond.dtype))


@register_op("cfg_combine", _cfg_kernel, _cfg_fake)
def _cfg_op(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(uncond.shape, dtype=torch.promote_types(uncond.dtype, cond.dtype), device=uncond.device)
    _launch_cfg(uncond.contiguous(), cond.contiguous(), out, scale)
    return out


def cfg_combine_supports(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> tuple[bool, str]:
    """(True, '') when the kernel covers this call, else (False, reason)."""
    why = unsupported_tensors(uncond, cond)
    if not why:
        if uncond.shape != cond.shape:
            why = f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} differ in shape"
        elif not isinstance(scale, (int, float)):
            why = f"scale is a {type(scale).__name__}, not a Python number"
    return verdict(why)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), fp32 math; same signature as wan.pipeline.cfg_combine
    (inputs as `cfg_combine_supports` accepts)."""
    return _cfg_op(uncond, cond, float(scale))
