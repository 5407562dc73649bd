"""wan-triton: Triton kernels and acceleration switches for the `wan` reference stack.

    import wan_triton
    wan_triton.patch()                 # fused kernels in every WanModel of this process
    wan_triton.optimize(pipe, "auto")  # + TF32, batched CFG, regional compile, by GPU preset

Importing has no side effects and imports nothing heavy: each name below loads its module (and
torch, triton, the kernels) when first used, so that the console scripts (wan_triton.console)
start, and can be interrupted, before those seconds of imports. Nothing is patched until you call
patch() or optimize().
"""
import importlib
import sys
import types

_EXPORTS = {
    **dict.fromkeys(("patch", "unpatch", "patched", "is_patched", "kernel_stats", "reset_kernel_stats",
                     "KernelFallback"), "wan_triton.patch"),
    **dict.fromkeys(("enable_tf32", "restore_tf32", "compile_blocks", "optimize", "PRESETS", "get_preset",
                     "detect_preset"), "wan_triton.accel"),
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'wan_triton' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`wan_triton.patch` is the function, also once the submodule of that name is imported: the
    import system then sets the package's attribute to the submodule, which this refuses (the
    submodule stays importable as `wan_triton.patch` through sys.modules, as before)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
