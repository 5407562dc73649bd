"""wan-triton: Triton kernels and acceleration switches for the `wan` reference stack.

    import wan_triton
    wan_triton.patch()                 # fused kernels in every WanModel of this process
    wan_triton.optimize(pipe, "auto")  # + TF32, batched CFG, regional compile, by GPU preset

Importing has no side effects: nothing is patched until you call patch() or optimize().
"""
from .accel import PRESETS, compile_blocks, detect_preset, enable_tf32, get_preset, optimize, restore_tf32
from .patch import KernelFallback, is_patched, kernel_stats, patch, patched, reset_kernel_stats, unpatch

__all__ = ["patch", "unpatch", "patched", "is_patched", "kernel_stats", "reset_kernel_stats", "KernelFallback",
           "enable_tf32", "restore_tf32", "compile_blocks",
           "optimize", "PRESETS", "get_preset", "detect_preset"]
__version__ = "0.1.0"
