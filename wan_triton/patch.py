"""Swap the reference's named hot ops for the Triton kernels, and put them back.

    import wan_triton
    wan_triton.patch()            # every WanModel / WanT2V in this process
    wan_triton.patch(model)       # only this wan.dit.WanModel's forward
    with wan_triton.patched(): ...
    wan_triton.unpatch()          # the exact original function objects are restored
    wan_triton.kernel_stats()     # per op: kernel launches, fallbacks, the last fallback's reason
    wan_triton.patch(pipe)        # a diffusers WanPipeline / WanTransformer3DModel: wan_triton/diffusers.py

Three mechanisms, one function each, every one given `strict` explicitly:

    _patch_globals(flags, strict)          rebinds the module attributes (`wan.dit.rms_norm`, ...)
                                           that the reference looks up at call time, for the process
    _patch_instance(model, flags, strict)  wraps one WanModel's forward: the same attributes are
                                           rebound for the duration of each of its calls, then put back
    wan_triton.diffusers.patch(obj, flags, strict)   diffusers' Wan transformers (their own block
                                           forward and attention processor, per model instance)

Patching never reloads a module and never touches weights. Each bound op asks the kernel's
`*_supports(...)` check per call and runs the kernel when it covers the call, else the saved
reference function (the original `wan.dit` / `wan.pipeline` object), counting both. `strict=True`
(or WAN_TRITON_STRICT=1 in the environment) turns a fallback into a `KernelFallback` error that
carries the reason. The global patch's strict mode is also the process's (`DISPATCH.strict`,
which the fp8 activation kernels obey too) until unpatch(); a model's strict mode covers its own
patched ops.

The attention backend is left alone unless `attention=` is given; unpatch()/patched() then
restore the backend that was set before. The counters and the strict switch live in
`wan_triton.dispatch.DISPATCH`, shared with the fp8 activation kernels.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from wan import attention as att
from wan.dit import WanModel

from . import diffusers as _diffusers

from .dispatch import DISPATCH, STRICT_ENV, KernelFallback, PatchError  # noqa: F401 - the errors patch() raises
from .fp8_attention import ensure_registered

log = logging.getLogger("wan_triton")

# flag -> [(module name, attribute)]; the kernel op in `kernels` has the attribute's name
_TARGETS = {
    "rms_norm": [("wan.dit", "rms_norm"), ("wan.vae", "rms_norm_silu")],
    "rope": [("wan.dit", "rope_apply"), ("wan.dit", "rms_norm_rope")],
    "modulation": [("wan.dit", "modulate"), ("wan.dit", "modulate_rows"), ("wan.dit", "layer_norm")],  # the blocks' LayerNorms
    "residual": [("wan.dit", "gated_residual"), ("wan.dit", "gated_residual_rows")],
    "cfg": [("wan.pipeline", "cfg_combine")],
}
OPS = tuple(attr for targets in _TARGETS.values() for _, attr in targets)

ACCEPTS = ("None (every WanModel and WanT2V of this process), one wan.dit.WanModel, or a diffusers "
           "WanTransformer3DModel or pipeline (WanPipeline: its transformer and transformer_2)")


@dataclass(frozen=True, eq=False)
class BoundOp:
    """What a patched name is bound to: the Triton `kernel` when its `supports` check covers the
    call, else the saved `reference` function, the choice counted by DISPATCH (a fallback raises
    when `strict`, or in the process's strict mode)."""
    name: str
    kernel: Callable
    supports: Callable
    reference: Callable
    strict: bool = False

    def __call__(self, *args, **kwargs):
        ok, why = self.supports(*args, **kwargs)
        if DISPATCH.use_kernel(self.name, ok, why, strict=self.strict):
            return self.kernel(*args, **kwargs)
        return self.reference(*args, **kwargs)

    @property
    def __wan_triton_kernel__(self) -> Callable:  # how tests and tools tell a bound op from a reference
        return self.kernel

    @property
    def __wan_triton_reference__(self) -> Callable:
        return self.reference


@dataclass
class InstancePatch:
    """patch(model): what one model's wrapped forward needs, and what unpatch(model) restores."""
    flags: list | None = None            # the patched op flags while the forward is wrapped
    strict: bool = False
    own_forward: Callable | None = None  # an instance-level forward set before patch(model); None: the class's
    prev_attention: list = field(default_factory=list)  # [the backend before patch(model, attention=...)]


_originals: dict[tuple[str, str], object] = {}  # (module, attr) -> original, only while patched
_prev_attention: list[str] = []                 # the backend before patch(attention=...), while patched
_bound: dict[tuple[str, str, bool], BoundOp] = {}  # (module, attr, strict) -> its op, around the current reference
_instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> InstancePatch


def kernel_stats() -> dict[str, dict]:
    """Per patched op: {'launches', 'fallbacks', 'last_reason'} since the last reset. Calls made
    while torch.compile traces are not counted (the counters would break the graph)."""
    return DISPATCH.snapshot(OPS)


def reset_kernel_stats() -> None:
    DISPATCH.reset(OPS)


def _module(name):
    return importlib.import_module(name)


def _reference(fn):
    """The reference function behind `fn` (itself unless it is one of our bound ops)."""
    return fn.reference if isinstance(fn, BoundOp) else fn


def _dispatcher(mod_name: str, attr: str, strict: bool) -> BoundOp:
    """The bound op for (module, attr), around the reference function currently behind it."""
    from wan_triton import kernels  # here, not at the top: `import wan_triton` does not import triton

    ref = _reference(getattr(_module(mod_name), attr))
    key = (mod_name, attr, strict)
    op = _bound.get(key)
    if op is None or op.reference is not ref:
        op = _bound[key] = BoundOp(attr, getattr(kernels, attr), getattr(kernels, f"{attr}_supports"), ref, strict)
    return op


def kernel_support() -> tuple[bool, str]:
    """(usable, reason): Triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    from wan_triton import kernels

    if not kernels.triton_available():
        return False, "Triton is not installed"
    if kernels.interpreter_problem():  # '' unless interpreted by a Triton that cannot run the kernels' loops
        return False, kernels.interpreter_problem()
    if torch.cuda.is_available():  # under the interpreter, kernels on CUDA tensors run through the host
        return True, "CUDA under the Triton interpreter (TRITON_INTERPRET=1: slow)" if kernels.interpret_mode() \
            else "CUDA"
    if kernels.interpret_mode():
        return True, "Triton interpreter on CPU"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"


def _targets(flags, one_model: bool = False):
    for flag in flags:
        for mod_name, attr in _TARGETS[flag]:
            if attr == "rms_norm_rope" and "rms_norm" not in flags:
                continue  # fused q/k kernel only when both halves are wanted
            if one_model and mod_name == "wan.vae":
                continue  # patch(model) swaps ops inside a WanModel's forward, where no VAE runs
            yield mod_name, attr


def _wanted(rms_norm, rope, modulation, residual, cfg):
    flags = dict(rms_norm=rms_norm, rope=rope, modulation=modulation, residual=residual, cfg=cfg)
    return [f for f, on in flags.items() if on]


def _set_attention(name: str, saved: list) -> None:
    ensure_registered(name)  # attention="fp8": the opt-in lossy backend (wan_triton/fp8_attention.py)
    prev = att.set_backend(name)
    if not saved:
        saved.append(prev)


def _check_target(model) -> None:
    """TypeError naming what patch() takes, for anything else (before anything is changed)."""
    if model is None or isinstance(model, WanModel) or _diffusers.is_wan_diffusers(model):
        return
    hint = ""
    if all(hasattr(model, a) for a in ("high_noise_model", "low_noise_model")):  # a wan.pipeline.WanT2V
        hint = "; for a WanT2V, patch() with no argument (or patch each of pipe.high_noise_model, pipe.low_noise_model)"
    raise TypeError(f"patch() takes {ACCEPTS}; got {type(model).__name__}{hint}")


def patch(model=None, *, rms_norm=True, rope=True, modulation=True, residual=True, cfg=True,
          attention: str | None = None, strict: bool = False):
    """Use the Triton kernels for the chosen ops. Returns the list of patched names.

    model: None patches globally (every WanModel and WanT2V of the process); a wan.dit.WanModel
    patches only that model's forward (the kernels are swapped in for the duration of each call);
    a diffusers WanTransformer3DModel or pipeline patches those models (wan_triton/diffusers.py).
    Anything else is a TypeError saying so. Calling twice is harmless.
    Falls back to the reference (and logs why) when the kernels cannot run here, unless
    strict=True (or WAN_TRITON_STRICT=1), which raises PatchError instead; in strict mode a
    call the kernel does not cover raises KernelFallback instead of running the reference.
    `rms_norm` also covers the VAE's RMSNorm + SiLU (wan.vae.rms_norm_silu) in a global patch;
    `modulation` also norm3's affine LayerNorm (wan.dit.layer_norm).
    `attention` (a wan.attention backend name) also sets the attention backend; None leaves
    it alone. patch() swaps functions and never touches weights: fp8 linears are
    wan_triton.optimize(pipe, fp8=True) or wan_triton.fp8.quantize_model(model) (docs/fp8.md).
    """
    _check_target(model)
    strict = strict or os.environ.get(STRICT_ENV) == "1"
    flags = _wanted(rms_norm, rope, modulation, residual, cfg)
    diffusers = _diffusers.is_wan_diffusers(model)
    if diffusers:  # checked first: an unsupported version changes nothing
        bad = _diffusers.version_problem()
        if bad and strict:
            raise PatchError(bad)
        if bad:
            log.warning("wan_triton: %s", bad)
            return []
    if attention is not None:
        saved = _prev_attention if model is None else _instances.setdefault(model, InstancePatch()).prev_attention
        _set_attention(attention, saved)
    ok, why = kernel_support()
    if not ok:
        if strict:
            raise PatchError(f"Triton kernels unavailable: {why}")
        log.warning("wan_triton: kernels not patched (%s); the reference ops stay in place", why)
        return []
    if diffusers:
        return _diffusers.patch(model, flags, strict)
    if model is not None:
        return _patch_instance(model, flags, strict)
    done = _patch_globals(flags, strict)
    log.info("wan_triton: patched %s (%s%s)", ", ".join(done) or "nothing", why, ", strict" if strict else "")
    return done


# ------------------------------------------------------------------ the process: module attributes

def _patch_globals(flags, strict: bool) -> list[str]:
    """Rebind the module attributes for the process (the originals remembered once); strict mode
    becomes the process's until unpatch()."""
    done = []
    for mod_name, attr in _targets(flags):
        mod = _module(mod_name)
        _originals.setdefault((mod_name, attr), getattr(mod, attr))
        setattr(mod, attr, _dispatcher(mod_name, attr, strict))
        done.append(f"{mod_name}.{attr}")
    DISPATCH.strict = DISPATCH.strict or strict
    return done


def _unpatch_globals() -> None:
    for (mod_name, attr), fn in list(_originals.items()):
        setattr(_module(mod_name), attr, fn)
    _originals.clear()
    DISPATCH.strict = False
    if _prev_attention:
        att.set_backend(_prev_attention.pop())


# ------------------------------------------------------------------ one model: its forward

def _patch_instance(model, flags, strict: bool) -> list[str]:
    """Wrap `model.forward` (once; patching again only changes the flags and strict mode)."""
    inst = _instances.setdefault(model, InstancePatch())
    wrapped = inst.flags is not None
    inst.flags, inst.strict = flags, strict
    names = [f"{mod_name}.{attr}" for mod_name, attr in _targets(flags, one_model=True)]
    if wrapped:
        return names
    orig_forward = model.forward

    @functools.wraps(orig_forward)
    def forward(*args, **kw):
        with _swapped(inst.flags, inst.strict):
            return orig_forward(*args, **kw)

    inst.own_forward = vars(model).get("forward")
    model.forward = forward
    log.info("wan_triton: patched %s on one %s instance", ", ".join(names), type(model).__name__)
    return names


@contextlib.contextmanager
def _swapped(flags, strict: bool):
    """Bind the ops for a region, restoring whatever was bound before (nesting-safe)."""
    saved = []
    try:
        for mod_name, attr in _targets(flags, one_model=True):
            mod = _module(mod_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, _dispatcher(mod_name, attr, strict))
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


def _unpatch_instance(model) -> None:
    inst = _instances.pop(model, None)
    if inst is None:
        return
    if inst.flags is not None:
        if inst.own_forward is None:
            del model.forward  # back to the class's forward
        else:
            model.forward = inst.own_forward
    if inst.prev_attention:
        att.set_backend(inst.prev_attention[0])


# ------------------------------------------------------------------ undo

def unpatch(model=None) -> None:
    """Restore exactly the original function objects, and the attention backend if patch set it."""
    if model is None:
        _unpatch_globals()
        return
    _diffusers.unpatch(model)
    _unpatch_instance(model)


def is_patched() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def patched(model=None, **kw):
    """Context manager form of patch()/unpatch(): on exit everything patch changed is restored
    (ops, strict mode, and the attention backend when `attention=` was given)."""
    was_patched = bool(_originals)
    backend = att.get_backend()
    strict = DISPATCH.strict
    patch(model, **kw)
    try:
        yield
    finally:
        if model is not None:
            unpatch(model)
        elif not was_patched:
            unpatch()
        else:
            DISPATCH.strict = strict  # patched inside a global patch: its strict mode only for the block
        if kw.get("attention") is not None:
            att.set_backend(backend)
