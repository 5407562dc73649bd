"""Swap the reference's named hot ops for the Triton kernels, and put them back.

    import wan_triton
    wan_triton.patch()            # every WanModel / WanT2V in this process
    wan_triton.patch(model)       # only this model's forward
    with wan_triton.patched(): ...
    wan_triton.unpatch()          # the exact original function objects are restored

Patching never reloads a module: it rebinds module attributes (`wan.dit.rms_norm`, ...)
that the reference looks up at call time, and remembers the originals.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("wan_triton")

# flag -> [(module name, attribute, kernel attribute in `kernels`)]
_TARGETS = {
    "rms_norm": [("wan.dit", "rms_norm", "rms_norm")],
    "rope": [("wan.dit", "rope_apply", "rope_apply"), ("wan.dit", "rms_norm_rope", "rms_norm_rope")],
    "modulation": [("wan.dit", "modulate", "modulate")],
    "residual": [("wan.dit", "gated_residual", "gated_residual")],
    "cfg": [("wan.pipeline", "cfg_combine", "cfg_combine")],
}

_originals: dict[tuple[str, str], object] = {}  # (module, attr) -> original, only while patched
_prev_attention: list[str] = []


class PatchError(RuntimeError):
    """strict=True and a kernel cannot be used here."""


def _module(name):
    import importlib
    return importlib.import_module(name)


def kernel_support() -> tuple[bool, str]:
    """(usable, reason): Triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    from kernels import _utils

    if not _utils.triton_available():
        return False, "Triton is not installed"
    if torch.cuda.is_available():
        return True, "CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter on CPU"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"


def _wanted(rms_norm, rope, modulation, residual, cfg):
    flags = dict(rms_norm=rms_norm, rope=rope, modulation=modulation, residual=residual, cfg=cfg)
    return [f for f, on in flags.items() if on]


def _swap(flags) -> list[str]:
    import kernels

    done = []
    for flag in flags:
        for mod_name, attr, kname in _TARGETS[flag]:
            if flag == "rope" and kname == "rms_norm_rope" and "rms_norm" not in flags:
                continue  # fused q/k kernel only when both halves are wanted
            mod = _module(mod_name)
            key = (mod_name, attr)
            if key not in _originals:
                _originals[key] = getattr(mod, attr)
            setattr(mod, attr, getattr(kernels, kname))
            done.append(f"{mod_name}.{attr}")
    return done


def patch(model=None, *, rms_norm=True, rope=True, modulation=True, residual=True, cfg=True,
          attention: str | None = "auto", strict: bool = False):
    """Use the Triton kernels for the chosen ops. Returns the list of patched names.

    model=None patches globally; a model instance patches only that model's forward (the
    kernels are swapped in for the duration of each call). Calling twice is harmless.
    Falls back to the reference (and logs why) when the kernels cannot run here, unless
    strict=True, which raises PatchError instead.
    """
    ok, why = kernel_support()
    flags = _wanted(rms_norm, rope, modulation, residual, cfg)
    if attention is not None:
        from wan import attention as att

        if not _prev_attention:
            _prev_attention.append(att.get_backend())
        att.set_backend(attention)
    if not ok:
        if strict:
            raise PatchError(f"Triton kernels unavailable: {why}")
        log.warning("wan_triton: kernels not patched (%s); the reference ops stay in place", why)
        return []
    if model is not None:
        return _patch_instance(model, flags)
    done = _swap(flags)
    log.info("wan_triton: patched %s (%s)", ", ".join(done) or "nothing", why)
    return done


def _patch_instance(model, flags):
    if getattr(model, "_wan_triton_flags", None) is not None:
        model._wan_triton_flags = flags
        return flags
    orig_forward = model.forward

    @functools.wraps(orig_forward)
    def forward(*args, **kw):
        with _swapped(model._wan_triton_flags):
            return orig_forward(*args, **kw)

    model._wan_triton_flags = flags
    # an instance-level forward someone set before us, or None for the class's own
    model._wan_triton_orig_forward = vars(model).get("forward")
    model.forward = forward
    log.info("wan_triton: patched %s on one %s instance", ", ".join(flags), type(model).__name__)
    return flags


@contextlib.contextmanager
def _swapped(flags):
    """Swap in for a region, restoring whatever was bound before (nesting-safe)."""
    import kernels

    saved = []
    try:
        for flag in flags:
            for mod_name, attr, kname in _TARGETS[flag]:
                if flag == "rope" and kname == "rms_norm_rope" and "rms_norm" not in flags:
                    continue
                mod = _module(mod_name)
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, getattr(kernels, kname))
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


def unpatch(model=None) -> None:
    """Restore exactly the original function objects (and the attention choice)."""
    if model is not None:
        if getattr(model, "_wan_triton_flags", None) is not None:
            orig = model._wan_triton_orig_forward
            if orig is None:
                del model.forward  # back to the class's forward
            else:
                model.forward = orig
            del model._wan_triton_orig_forward
        model._wan_triton_flags = None
        return
    for (mod_name, attr), fn in list(_originals.items()):
        setattr(_module(mod_name), attr, fn)
    _originals.clear()
    if _prev_attention:
        from wan import attention as att

        att.set_backend(_prev_attention.pop())


def is_patched() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def patched(model=None, **kw):
    """Context manager form of patch()/unpatch(); the attention choice is restored too."""
    from wan import attention as att

    was_patched = bool(_originals)
    backend = att.get_backend()
    patch(model, **kw)
    try:
        yield
    finally:
        if model is not None:
            unpatch(model)
        elif not was_patched:
            unpatch()
        att.set_backend(backend)
