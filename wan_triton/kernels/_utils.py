"""Shared helpers for the Triton kernels: guarded imports, support checks, block-size rules, op registration.

Support rule (per call, per tensor): a kernel covers a tensor when triton imports and the tensor
is on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the CPU
test suite), in float32 / bfloat16 / float16, all tensors of a call on one device. Each kernel
module adds its own shape/stride/broadcast conditions in a ``*_supports(...) -> (ok, reason)``
function. The kernels hold no reference math: choosing the reference when a kernel does not
cover a call is ``wan_triton.patch``'s job.

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
    "triton", "tl", "jit", "round_to", "cast_to", "triton_available", "interpret_mode", "unsupported_tensors",
    "KERNEL_DTYPES", "KERNEL_OUT_DTYPES", "cdiv", "next_pow2", "row_block", "num_warps_for", "launchable",
    "register_op", "is_compiling", "interpreter_problem", "OP_NAMESPACE", "broadcast_rows", "broadcasts_to", "verdict", "rows_problem",
]

OP_NAMESPACE = "wan_kernels"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_OUT_DTYPES = (None,) + KERNEL_DTYPES  # `out_dtype` arguments the kernels can store
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


@jit
def _loop_probe_kernel(OUT, n):
    """OUT[0] = n, counted by a loop over the runtime bound n (what the kernels' looped paths do)."""
    acc = 0.0
    for _ in range(0, n, 1):
        acc += 1.0
    tl.store(OUT, acc)


_INTERPRETER_PROBLEM: Optional[str] = None  # interpreter_problem's answer once known (a plain global: Dynamo
# reads it as a constant inside a traced support check, where it would trace into a functools.cache)


def interpreter_problem() -> str:
    """'' when this Triton's interpreter runs the kernels, else why not (one line). Triton 3.6's interpreter
    turns a runtime loop bound into a Python int with int() of a one-element NumPy array, which NumPy 2.4
    refuses ("only 0-dimensional arrays can be converted"): every kernel that loops over a runtime bound
    (the wide-row paths, the fp8 attention statistics) dies there. Later Triton takes the scalar first.
    Checked once, by running a one-program probe kernel; compiled kernels are not affected."""
    global _INTERPRETER_PROBLEM
    if not (_TRITON_OK and interpret_mode() and _is_interpreted(_loop_probe_kernel)):
        return ""
    if _INTERPRETER_PROBLEM is None:
        _INTERPRETER_PROBLEM = _probe_interpreter()
    return _INTERPRETER_PROBLEM


def _probe_interpreter() -> str:
    out = torch.zeros(1)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception as err:  # the defect above, or any other: the kernels cannot run interpreted here
        import numpy
        return (f"this Triton interpreter cannot run the kernels' loops (triton {triton.__version__}, numpy "
                f"{numpy.__version__}: {type(err).__name__}: {str(err)[:80]}); pip install -U triton, or 'numpy<2.4'")
    return "" if out.item() == 3 else f"this Triton interpreter counts a 3-step loop as {out.item():g}"


def unsupported_tensors(*tensors: Optional[torch.Tensor]) -> str:
    """'' when the Triton path covers these tensors (None entries skipped), else why not:
    triton missing, a device other than CUDA (or CPU under TRITON_INTERPRET=1), a dtype other
    than fp32/bf16/fp16, or tensors on different devices."""
    if not _TRITON_OK:
        return "Triton is not installed"
    dev = None
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            return f"dtype {t.dtype} (the kernels cover float32, bfloat16, float16)"
        if t.device.type == "cpu":
            if not interpret_mode():
                return "CPU tensor and TRITON_INTERPRET is not 1"
        elif t.device.type != "cuda":
            return f"device {t.device} (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
        if dev is None:
            dev = t.device
        elif t.device != dev:
            return f"tensors on {dev} and {t.device}"
    if dev is None:
        return "no tensor to launch on"
    return interpreter_problem()  # '' unless interpreted by a Triton that cannot run the kernels' loops


def verdict(reason: str) -> tuple[bool, str]:
    """(ok, reason) from a reason string ('' = supported)."""
    return (not reason), reason


def broadcasts_to(t: torch.Tensor, shape) -> bool:
    """t broadcasts to `shape` (no more dims; each trailing dim 1 or equal)."""
    if t.dim() > len(shape):
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(t.shape), reversed(shape)))


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


def rows_problem(x: torch.Tensor, tables, index: torch.Tensor) -> str:
    """'' when x [B, L, C], the [K, C] `tables` and index [B or 1, L] (int32 / int64, on x's device)
    fit together, else why not (the per-token rows kernels)."""
    if x.dim() != 3:
        return f"x {tuple(x.shape)} is not [B, L, C]"
    for t in tables:
        if t.dim() != 2 or t.shape[1] != x.shape[-1]:
            return f"table {tuple(t.shape)} is not [K, {x.shape[-1]}]"
    if index.dtype not in (torch.int32, torch.int64):
        return f"index dtype {index.dtype} (int32 or int64)"
    if index.device != x.device:
        return f"index on {index.device}, x on {x.device}"
    if index.dim() != 2 or index.shape[0] not in (1, x.shape[0]) or index.shape[1] != x.shape[1]:
        return f"index {tuple(index.shape)} does not cover x {tuple(x.shape[:2])}"
    return ""
