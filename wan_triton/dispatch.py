"""Kernel or reference, counted: the one bookkeeping behind every Triton op wan_triton picks per call.

    DISPATCH.use_kernel(op, ok, why)   # True: run the kernel; False: run the reference (counted)

The callers ask the kernel's support check, then this object: `wan_triton.patch` for the bound
reference ops (rms_norm, rope, modulate, ...), `wan_triton.fp8` for the activation quantizers.
It keeps, per op, the kernel launches, the fallbacks and the last fallback's reason
(`kernel_stats()`, `fp8.fp8_stats()` read them); counting is skipped while torch.compile traces
(a Python counter in a traced region would break the graph). Strict mode (the global `patch(strict=True)`
while patched, or WAN_TRITON_STRICT=1 in the environment) turns a fallback into a
`KernelFallback` error carrying the reason. (wan.attention logs its backend choice without
counting; it holds no triton code, so it does not come through here.)
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger("wan_triton")

STRICT_ENV = "WAN_TRITON_STRICT"


class PatchError(RuntimeError):
    """strict=True and the kernels cannot be used here."""


class KernelFallback(PatchError):
    """Strict mode: an op met inputs its kernel does not cover."""


@dataclass
class OpStats:
    launches: int = 0      # calls that ran the Triton kernel
    fallbacks: int = 0     # calls that ran the reference instead
    last_reason: str = ""  # why the last fallback happened


@dataclass
class Dispatcher:
    """Per-op counters, the strict switch and the warn-once memory of the kernel-or-reference choices."""
    stats: dict[str, OpStats] = field(default_factory=dict)
    strict: bool = False                            # the global patch(strict=True), while patched
    warned: set[str] = field(default_factory=set)   # fallback reasons already logged

    def is_strict(self) -> bool:
        return self.strict or os.environ.get(STRICT_ENV) == "1"

    def use_kernel(self, op: str, ok: bool, why: str, *, warn: bool = False, strict: bool = False) -> bool:
        """Count the choice for `op` ((ok, why) from its support check) and return `ok`. A fallback
        raises KernelFallback in strict mode (global, or `strict` for one patched model); `warn` logs
        each new fallback reason once."""
        if not torch.compiler.is_compiling():
            st = self.stats.setdefault(op, OpStats())
            if ok:
                st.launches += 1
            else:
                st.fallbacks += 1
                st.last_reason = why
        if ok:
            return True
        if strict or self.is_strict():
            raise KernelFallback(f"wan_triton: {op} fell back to the reference: {why} "
                                 f"(strict mode: patch(strict=True) or {STRICT_ENV}=1)")
        if warn and why not in self.warned:
            self.warned.add(why)
            log.warning("wan_triton: %s runs the reference in torch ops (%s)", op, why)
        return False

    def snapshot(self, ops) -> dict[str, dict]:
        """{op: {'launches', 'fallbacks', 'last_reason'}} for `ops` since their last reset."""
        return {op: asdict(self.stats.get(op) or OpStats()) for op in ops}

    def reset(self, ops) -> None:
        for op in ops:
            self.stats.pop(op, None)


DISPATCH = Dispatcher()
