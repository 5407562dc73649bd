"""Hand-written Triton kernels for the hot element-wise ops of the Wan 2.2 DiT (and the VAE's norm).

A leaf package: it imports nothing of `wan` and holds no reference math. Each op has exactly the
signature and output dtype of the reference function it replaces, plus a support check that says
whether the kernel covers a call (device or interpreter, dtype, shapes, strides, broadcast):

    op               support check                  replaces
    rms_norm         rms_norm_supports              wan.dit.rms_norm
    rope_apply       rope_apply_supports            wan.dit.rope_apply
    rms_norm_rope    rms_norm_rope_supports         wan.dit.rms_norm_rope
    modulate         modulate_supports              wan.dit.modulate
    layer_norm       layer_norm_supports            wan.dit.layer_norm          (norm3, affine, bf16 out)
    gated_residual   gated_residual_supports        wan.dit.gated_residual
    modulate_rows    modulate_rows_supports         wan.dit.modulate_rows       (per-token rows)
    gated_residual_rows  gated_residual_rows_supports  wan.dit.gated_residual_rows
    cfg_combine      cfg_combine_supports           wan.pipeline.cfg_combine
    rms_norm_silu    rms_norm_silu_supports         wan.vae.rms_norm_silu       (the VAE's norm + SiLU)

`*_supports(...)` returns (True, '') or (False, reason). Calling an op on inputs its check
rejects is an error; `wan_triton.patch()` is the one place that picks "kernel when supported,
else the reference", and counts both. Triton runs for CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1). GPU paths are torch custom ops in the `wan_kernels` namespace (see
wan_triton.kernels._utils), so torch.compile traces them without graph breaks.
"""
from ._utils import interpret_mode, interpreter_problem, triton_available, unsupported_tensors
from .cfg import cfg_combine, cfg_combine_supports
from .modulate import layer_norm, layer_norm_supports, modulate, modulate_rows, modulate_rows_supports, \
    modulate_supports
from .residual import gated_residual, gated_residual_rows, gated_residual_rows_supports, gated_residual_supports
from .rms_norm import rms_norm, rms_norm_supports
from .rope import rms_norm_rope, rms_norm_rope_supports, rope_apply, rope_apply_supports, rope_cos_sin, rope_split
from .vae_norm import rms_norm_silu, rms_norm_silu_supports

OPS = ("rms_norm", "rope_apply", "rms_norm_rope", "modulate", "layer_norm", "gated_residual", "cfg_combine",
       "modulate_rows", "gated_residual_rows", "rms_norm_silu")

__all__ = [*OPS, *(f"{op}_supports" for op in OPS), "OPS", "rope_cos_sin", "rope_split", "triton_available",
           "interpret_mode", "interpreter_problem", "unsupported_tensors"]
