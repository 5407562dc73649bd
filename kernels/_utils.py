"""Shared helpers for the Triton kernels: guarded imports, dispatch, block-size rules, op registration.

Dispatch rule (per call, per tensor): the Triton path runs when triton imports and the tensor
is on CUDA, or when ``TRITON_INTERPRET=1`` and the tensor is on the CPU (the Triton interpreter,
used by the CPU test suite). Everything else (no triton, other devices, float64 inputs, shapes a
kernel does not cover) goes to a pure-torch fallback with the reference math.

GPU paths are registered as torch custom ops in the ``wan_kernels`` namespace so torch.compile
traces through them without graph breaks:

* ``torch.library.triton_op`` + ``torch.library.wrap_triton`` (torch >= 2.6) when the kernels
  are real JIT kernels: Inductor sees the Triton kernel itself.
* ``torch.library.custom_op`` + a fake (meta) implementation otherwise, and always when the
  kernels are interpreted (``TRITON_INTERPRET=1``): ``wrap_triton`` cannot trace an
  interpreted kernel on fake tensors.
* plain functions when torch has neither.

Nothing here runs at import beyond definitions (and the module-level op registrations that the
kernel modules do, which only define ops).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

try:  # guarded: the package must import without triton
    import triton
    import triton.language as tl
    _TRITON_OK = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    _TRITON_OK = False

    class _TLStub:
        """Lets `BLOCK: tl.constexpr` annotations evaluate when triton is missing."""
        constexpr = object

    tl = _TLStub()

__all__ = [
    "triton", "tl", "jit", "round_to", "cast_to", "triton_available", "interpret_mode", "use_triton", "use_triton_for",
    "KERNEL_DTYPES", "cdiv", "next_pow2", "row_block", "num_warps_for", "launchable", "register_op",
    "is_compiling", "OP_NAMESPACE", "broadcast_rows",
]

OP_NAMESPACE = "wan_kernels"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW_BLOCK = 8192        # widest row held in registers in one pass (5120 -> 8192)
ELEMWISE_BLOCK = 1024       # column block of the element-wise kernels


def jit(fn):
    """`triton.jit` when triton imports, identity otherwise (the kernel is then never called)."""
    return triton.jit(fn) if _TRITON_OK else fn


# The Triton interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest even, like
# torch). Kernels round through `round_to` / `cast_to`, which under the interpreter do the
# round-to-nearest-even by hand, so interpreted and compiled kernels give the same bits.
_SOFT_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1") if _TRITON_OK else False


@jit
def _rtne_bf16(x):
    """fp32 -> nearest-even bf16 value, kept in fp32 (NaN stays NaN)."""
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@jit
def round_to(x, DT: tl.constexpr):
    """fp32 x rounded to dtype DT (round to nearest even), returned as fp32."""
    if _SOFT_BF16:
        if DT == tl.bfloat16:
            return _rtne_bf16(x)
        else:
            return x.to(DT).to(tl.float32)
    else:
        return x.to(DT).to(tl.float32)


@jit
def cast_to(x, DT: tl.constexpr):
    """fp32 x converted to dtype DT (round to nearest even)."""
    if _SOFT_BF16:
        if DT == tl.bfloat16:
            return _rtne_bf16(x).to(DT)
        else:
            return x.to(DT)
    else:
        return x.to(DT)


def triton_available() -> bool:
    return _TRITON_OK


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton_for(t: Optional[torch.Tensor]) -> bool:
    """Would this one tensor take the Triton path? (None counts as yes: nothing to launch on.)"""
    if t is None:
        return True
    if not _TRITON_OK or t.dtype not in KERNEL_DTYPES:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpret_mode()


def use_triton(*tensors: Optional[torch.Tensor]) -> bool:
    """All tensors on one device that the Triton path covers, in fp32/bf16/fp16."""
    dev = None
    for t in tensors:
        if t is None:
            continue
        if not use_triton_for(t):
            return False
        if dev is None:
            dev = t.device
        elif t.device != dev:
            return False
    return dev is not None


def is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_block(n_cols: int, max_block: int = MAX_ROW_BLOCK, min_block: int = 16) -> tuple[int, bool]:
    """(BLOCK, ONE_PASS): the whole row in one block when it fits, else a capped block and a loop."""
    b = max(min_block, next_pow2(n_cols))
    if b <= max_block:
        return b, True
    return max_block, False


def num_warps_for(block: int, max_warps: int = 16) -> int:
    """Warps for a row block; kernels cap it (measured on H200 at 5120 wide: modulate is fastest
    with 4 warps, RoPE and RMSNorm with 8)."""
    if block >= 8192:
        w = 16
    elif block >= 2048:
        w = 8
    elif block >= 512:
        w = 4
    else:
        w = 2
    return min(w, max_warps)


def _is_interpreted(kernel) -> bool:
    if not _TRITON_OK:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def launchable(kernel):
    """The kernel wrapped for tracing (`wrap_triton`) when torch has it, else the kernel itself.

    `wrap_triton` hands interpreted kernels back unchanged and is a plain launch in eager mode.
    """
    wrap = getattr(torch.library, "wrap_triton", None) or getattr(torch.library, "capture_triton", None)
    if wrap is None or _is_interpreted(kernel):
        return kernel
    return wrap(kernel)


def register_op(name: str, kernel, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as the custom op ``wan_kernels::name`` (see module docstring)."""
    def deco(fn):
        if not _TRITON_OK:
            return fn
        qual = f"{OP_NAMESPACE}::{name}"
        triton_op = getattr(torch.library, "triton_op", None)
        custom_op = getattr(torch.library, "custom_op", None)
        try:
            if triton_op is not None and getattr(torch.library, "wrap_triton", None) is not None \
                    and not _is_interpreted(kernel):
                return triton_op(qual, mutates_args=())(fn)
            if custom_op is not None:
                op = custom_op(qual, mutates_args=())(fn)
                op.register_fake(fake)
                return op
        except RuntimeError:
            # already registered (module re-import): use the existing op
            packet = getattr(getattr(torch.ops, OP_NAMESPACE), name, None)
            if packet is not None:
                return packet
            raise
        return fn
    return deco


def broadcast_rows(t: torch.Tensor, shape) -> torch.Tensor:
    """t broadcast to `shape` ([B, L, C]) as a strided view, last stride 1 (copies only if needed):
    per-sample [B, 1, C] modulation rows stay views with a zero token stride."""
    t = t.expand(shape)
    if shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t
