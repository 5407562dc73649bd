"""Hand-written Triton kernels for the hot element-wise ops of the Wan 2.2 DiT.

Each public function has exactly the signature and output dtype of the reference it replaces,
so `wan_triton.patch()` can swap module attributes:

    rms_norm, rope_apply, rms_norm_rope, modulate, gated_residual   (wan.dit)
    cfg_combine                                                      (wan.pipeline)

Triton runs for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1); anything else uses a
pure-torch fallback with the reference math. GPU paths are torch custom ops in the
`wan_kernels` namespace (see kernels._utils).
"""
from ._utils import triton_available, use_triton, use_triton_for
from .cfg import cfg_combine
from .modulate import modulate
from .residual import gated_residual
from .rms_norm import rms_norm
from .rope import rms_norm_rope, rope_apply, rope_cos_sin

__all__ = [
    "rms_norm", "rope_apply", "rms_norm_rope", "modulate", "gated_residual", "cfg_combine",
    "rope_cos_sin", "triton_available", "use_triton", "use_triton_for",
]
