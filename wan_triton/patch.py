"""Swap the reference's named hot ops for the Triton kernels, and put them back.

    import wan_triton
    wan_triton.patch()            # every WanModel / WanT2V in this process
    wan_triton.patch(model)       # only this model's forward
    with wan_triton.patched(): ...
    wan_triton.unpatch()          # the exact original function objects are restored
    wan_triton.kernel_stats()     # per op: kernel launches, fallbacks, the last fallback's reason
    wan_triton.patch(pipe)        # a diffusers WanPipeline / WanTransformer3DModel: wan_triton/diffusers.py

Patching never reloads a module: it rebinds module attributes (`wan.dit.rms_norm`, ...) that
the reference looks up at call time, and remembers the originals. This is the one place that
decides kernel or reference: each bound op asks the kernel's `*_supports(...)` check and runs
the kernel when it covers the call, else the saved reference function (the original `wan.dit` /
`wan.pipeline` object), counting both. `strict=True` (or WAN_TRITON_STRICT=1 in the
environment) turns a fallback into a `KernelFallback` error that carries the reason.

The attention backend is left alone unless `attention=` is given; unpatch()/patched() then
restore the backend that was set before.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from dataclasses import asdict, dataclass

import torch

from . import diffusers as _diffusers

log = logging.getLogger("wan_triton")

STRICT_ENV = "WAN_TRITON_STRICT"

# flag -> [(module name, attribute)]; the kernel op in `kernels` has the attribute's name
_TARGETS = {
    "rms_norm": [("wan.dit", "rms_norm")],
    "rope": [("wan.dit", "rope_apply"), ("wan.dit", "rms_norm_rope")],
    "modulation": [("wan.dit", "modulate")],
    "residual": [("wan.dit", "gated_residual")],
    "cfg": [("wan.pipeline", "cfg_combine")],
}
OPS = tuple(attr for targets in _TARGETS.values() for _, attr in targets)

_originals: dict[tuple[str, str], object] = {}  # (module, attr) -> original, only while patched
_prev_attention: list[str] = []                 # the backend before patch(attention=...), while patched
_state = {"strict": False}
_dispatchers: dict[tuple[str, str], object] = {}


class PatchError(RuntimeError):
    """strict=True and the kernels cannot be used here."""


class KernelFallback(PatchError):
    """Strict mode: a patched op met inputs its kernel does not cover."""


@dataclass
class OpStats:
    launches: int = 0      # calls that ran the Triton kernel
    fallbacks: int = 0     # calls that ran the reference instead
    last_reason: str = ""  # why the last fallback happened


_stats: dict[str, OpStats] = {op: OpStats() for op in OPS}


def kernel_stats() -> dict[str, dict]:
    """Per patched op: {'launches', 'fallbacks', 'last_reason'} since the last reset. Calls made
    while torch.compile traces are not counted (the counters would break the graph)."""
    return {op: asdict(s) for op, s in _stats.items()}


def reset_kernel_stats() -> None:
    for s in _stats.values():
        s.launches, s.fallbacks, s.last_reason = 0, 0, ""


def _strict() -> bool:
    return _state["strict"] or os.environ.get(STRICT_ENV) == "1"


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _module(name):
    return importlib.import_module(name)


def _reference(fn):
    """The reference function behind `fn` (itself unless it is one of our dispatchers)."""
    return getattr(fn, "__wan_triton_reference__", fn)


def _record(name: str, why: str, strict: bool = False) -> None:
    """Count one call of op `name`: a kernel launch when `why` is '', else a fallback for that
    reason, which raises KernelFallback in strict mode (`strict`, patch(strict=True) or the env)."""
    if why == "":
        if not _compiling():
            _stats[name].launches += 1
        return
    if not _compiling():
        _stats[name].fallbacks += 1
        _stats[name].last_reason = why
    if strict or _strict():
        raise KernelFallback(f"wan_triton: {name} fell back to the reference: {why} "
                             f"(strict mode: patch(strict=True) or {STRICT_ENV}=1)")


def _make_dispatcher(name: str, reference):
    from wan_triton import kernels

    kernel = getattr(kernels, name)
    supports = getattr(kernels, f"{name}_supports")

    def op(*args, **kwargs):
        ok, why = supports(*args, **kwargs)
        _record(name, why)
        return kernel(*args, **kwargs) if ok else reference(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"Triton `kernels.{name}` when `kernels.{name}_supports` says yes, else the reference.\n\n" \
                 + (kernel.__doc__ or "")
    op.__wan_triton_reference__ = reference
    op.__wan_triton_kernel__ = kernel
    return op


def _dispatcher(mod_name: str, attr: str):
    """The bound op for (module, attr), around the reference function currently behind it."""
    ref = _reference(getattr(_module(mod_name), attr))
    op = _dispatchers.get((mod_name, attr))
    if op is None or op.__wan_triton_reference__ is not ref:
        op = _dispatchers[(mod_name, attr)] = _make_dispatcher(attr, ref)
    return op


def kernel_support() -> tuple[bool, str]:
    """(usable, reason): Triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    from wan_triton import kernels

    if not kernels.triton_available():
        return False, "Triton is not installed"
    if torch.cuda.is_available():
        return True, "CUDA"
    if kernels.interpret_mode():
        return True, "Triton interpreter on CPU"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"


def _targets(flags):
    for flag in flags:
        for mod_name, attr in _TARGETS[flag]:
            if attr == "rms_norm_rope" and "rms_norm" not in flags:
                continue  # fused q/k kernel only when both halves are wanted
            yield mod_name, attr


def _wanted(rms_norm, rope, modulation, residual, cfg):
    flags = dict(rms_norm=rms_norm, rope=rope, modulation=modulation, residual=residual, cfg=cfg)
    return [f for f, on in flags.items() if on]


def _swap(flags) -> list[str]:
    done = []
    for mod_name, attr in _targets(flags):
        mod = _module(mod_name)
        key = (mod_name, attr)
        if key not in _originals:
            _originals[key] = getattr(mod, attr)
        setattr(mod, attr, _dispatcher(mod_name, attr))
        done.append(f"{mod_name}.{attr}")
    return done


def _set_attention(name: str, saved: list) -> None:
    from wan import attention as att

    from .fp8_attention import ensure_registered

    ensure_registered(name)  # attention="fp8": the opt-in lossy backend (wan_triton/fp8_attention.py)
    prev = att.set_backend(name)
    if not saved:
        saved.append(prev)


def patch(model=None, *, rms_norm=True, rope=True, modulation=True, residual=True, cfg=True,
          attention: str | None = None, strict: bool = False, fp8: bool = False):
    """Use the Triton kernels for the chosen ops. Returns the list of patched names.

    model=None patches globally; a model instance patches only that model's forward (the
    kernels are swapped in for the duration of each call). Calling twice is harmless.
    Falls back to the reference (and logs why) when the kernels cannot run here, unless
    strict=True (or WAN_TRITON_STRICT=1), which raises PatchError instead; in strict mode a
    call the kernel does not cover raises KernelFallback instead of running the reference.
    `attention` (a wan.attention backend name) also sets the attention backend; None leaves
    it alone. `fp8=True` is refused: fp8 replaces weights, which patch() does not own (use
    wan_triton.optimize(pipe, fp8=True) or wan_triton.fp8.quantize_model(model); docs/fp8.md).
    """
    if fp8:
        raise PatchError("patch() swaps functions and never touches weights: switch fp8 on with "
                         "wan_triton.optimize(pipe, fp8=True) or wan_triton.fp8.quantize_model(model)")
    strict = strict or os.environ.get(STRICT_ENV) == "1"
    ok, why = kernel_support()
    flags = _wanted(rms_norm, rope, modulation, residual, cfg)
    if _diffusers.is_wan_diffusers(model):  # checked first: an unsupported version changes nothing
        bad = _diffusers.version_problem()
        if bad and strict:
            raise PatchError(bad)
        if bad:
            log.warning("wan_triton: %s", bad)
            return []
    if attention is not None:
        if model is None:
            _set_attention(attention, _prev_attention)
        else:
            _set_attention(attention, model.__dict__.setdefault("_wan_triton_prev_attention", []))
    if not ok:
        if strict:
            raise PatchError(f"Triton kernels unavailable: {why}")
        log.warning("wan_triton: kernels not patched (%s); the reference ops stay in place", why)
        return []
    if _diffusers.is_wan_diffusers(model):
        return _diffusers.patch(model, flags, strict, _record)
    if model is not None:
        return _patch_instance(model, flags, strict)
    _state["strict"] = _state["strict"] or strict
    done = _swap(flags)
    log.info("wan_triton: patched %s (%s%s)", ", ".join(done) or "nothing", why, ", strict" if strict else "")
    return done


def _patch_instance(model, flags, strict):
    if getattr(model, "_wan_triton_flags", None) is not None:
        model._wan_triton_flags, model._wan_triton_strict = flags, strict
        return flags
    orig_forward = model.forward

    @functools.wraps(orig_forward)
    def forward(*args, **kw):
        with _swapped(model._wan_triton_flags, model._wan_triton_strict):
            return orig_forward(*args, **kw)

    model._wan_triton_flags, model._wan_triton_strict = flags, strict
    # an instance-level forward someone set before us, or None for the class's own
    model._wan_triton_orig_forward = vars(model).get("forward")
    model.forward = forward
    log.info("wan_triton: patched %s on one %s instance", ", ".join(flags), type(model).__name__)
    return flags


@contextlib.contextmanager
def _swapped(flags, strict=False):
    """Swap in for a region, restoring whatever was bound before (nesting-safe)."""
    saved = []
    prev_strict = _state["strict"]
    try:
        _state["strict"] = prev_strict or strict
        for mod_name, attr in _targets(flags):
            mod = _module(mod_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, _dispatcher(mod_name, attr))
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)
        _state["strict"] = prev_strict


def unpatch(model=None) -> None:
    """Restore exactly the original function objects, and the attention backend if patch set it."""
    from wan import attention as att

    if model is not None:
        _diffusers.unpatch(model)
        if getattr(model, "_wan_triton_flags", None) is not None:
            orig = model._wan_triton_orig_forward
            if orig is None:
                del model.forward  # back to the class's forward
            else:
                model.forward = orig
            del model._wan_triton_orig_forward
        model._wan_triton_flags = None
        prev = model.__dict__.pop("_wan_triton_prev_attention", None)
        if prev:
            att.set_backend(prev[0])
        return
    for (mod_name, attr), fn in list(_originals.items()):
        setattr(_module(mod_name), attr, fn)
    _originals.clear()
    _state["strict"] = False
    if _prev_attention:
        att.set_backend(_prev_attention.pop())


def is_patched() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def patched(model=None, **kw):
    """Context manager form of patch()/unpatch(): on exit everything patch changed is restored
    (ops, strict mode, and the attention backend when `attention=` was given)."""
    from wan import attention as att

    was_patched = bool(_originals)
    backend = att.get_backend()
    strict = _state["strict"]
    patch(model, **kw)
    try:
        yield
    finally:
        if model is not None:
            unpatch(model)
        elif not was_patched:
            unpatch()
        _state["strict"] = strict
        if kw.get("attention") is not None:
            att.set_backend(backend)
