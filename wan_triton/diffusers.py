"""`wan_triton.patch(obj)` for diffusers' Wan transformers, alone or inside a pipeline.

    pipe = diffusers.WanPipeline.from_pretrained(".../Wan2.2-T2V-A14B-Diffusers", torch_dtype=torch.bfloat16)
    wan_triton.patch(pipe)        # pipe.transformer and pipe.transformer_2 (or one WanTransformer3DModel)
    wan_triton.unpatch(pipe)      # diffusers' own forward functions and processor objects, identical

Per model instance, nothing global and nothing inside diffusers' modules is changed:

    WanTransformerBlock.forward    the same steps in the same order, with
        norm1/norm3 + modulation     kernels.modulate(round_norm=False)      LayerNorm of x.float() (FP32LayerNorm),
                                     * (1 + scale) + shift in fp32, cast to x's dtype
        the two gated residuals      kernels.gated_residual(out_dtype=x.dtype)   (x.float() + y * gate).type_as(x)
        norm2 and the cross-attention residual stay diffusers' ops (affine LayerNorm, plain add)
    WanAttnProcessor (attn1, attn2) -> _Processor, the same steps with
        self-attention q/k           kernels.rms_norm_rope: nn.RMSNorm across heads in torch's order, then
                                     diffusers' RoPE (adjacent pairs) from the model's own cos/sin table
        cross-attention q/k          kernels.rms_norm
        attention                    wan.attention.attention (FA4 when installed) for bf16/fp16 q/k/v;
                                     diffusers' dispatch_attention_fn otherwise (fp32 keeps fp32 attention)
    WanRotaryPosEmbed.forward        also records the (F, H, W) token grid the RoPE kernel indexes by

A kernel runs only where it reproduces diffusers' rounding; every other call runs diffusers' own
expression (counted as a fallback with its reason in kernel_stats(); strict mode raises instead).
torch's `rms_norm` rounding changed between releases (normalised value rounded before the weight,
or one fp32 product and one rounding): the order this torch uses is probed once per device.
Calls with an attention mask, image keys (I2V `add_k_proj`) or context parallelism go to
diffusers' own processor. Classifier-free guidance is computed inline by WanPipeline: not patched.

Supported diffusers: SUPPORTED (the numerics of WanTransformerBlock, WanAttnProcessor,
WanRotaryPosEmbed and FP32LayerNorm are the same in the sources of 0.35.0, 0.36.0, 0.38.0, 0.40.0
and 0.42.1; 0.42.1 is the tested one). Outside it, patch() warns in one line and changes nothing.
This module never imports diffusers: objects are recognised by class name and module.
"""
from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan import attention as _attention

from . import kernels
from .dispatch import DISPATCH
from .kernels._utils import KERNEL_DTYPES

log = logging.getLogger("wan_triton")

SUPPORTED = ">=0.35.0,<0.43"
_LOWEST, _BELOW = (0, 35, 0), (0, 43, 0)
_ATTR = "_wan_triton_diffusers"  # the patch record on a patched WanTransformer3DModel
_HALF = (torch.float16, torch.bfloat16)
_MISSING = object()

__all__ = ["SUPPORTED", "installed_version", "version_problem", "is_wan_diffusers", "wan_transformers",
           "patch", "unpatch", "torch_rms_order", "cast_like_from_pretrained"]


# ------------------------------------------------------------------ what we patch, and when

def installed_version() -> str | None:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem() -> str:
    """'' when the installed diffusers is in SUPPORTED, else the one-line reason."""
    v = installed_version()
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v or "")
    got = tuple(int(g or 0) for g in m.groups()) if m else None
    if got is not None and _LOWEST <= got < _BELOW:
        return ""
    return (f"diffusers {v} is outside the supported range {SUPPORTED} (tested: 0.42.1); "
            "the diffusers model is left unpatched")


def _is_class(obj, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def wan_transformers(obj) -> list[tuple[str, nn.Module]]:
    """(name, model) for each diffusers WanTransformer3DModel in `obj`: obj itself, or a
    pipeline's `transformer` and `transformer_2`."""
    if obj is None:
        return []
    if _is_class(obj, "WanTransformer3DModel"):
        return [("transformer", obj)]
    found = []
    for name in ("transformer", "transformer_2"):
        m = getattr(obj, name, None)
        if m is not None and _is_class(m, "WanTransformer3DModel"):
            found.append((name, m))
    return found


def is_wan_diffusers(obj) -> bool:
    return bool(wan_transformers(obj))


_RMS_ORDER: dict[tuple, tuple | None] = {}  # (device, x dtype, weight dtype) -> (round_norm, out dtype)


def torch_rms_order(device, x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[bool, torch.dtype] | None:
    """How this torch's F.rms_norm rounds on `device` for these dtypes, as (round_norm, output
    dtype): round_norm True = the normalised value is rounded to x's dtype before the weight
    (composite order of older torch), False = one fp32 product x * rstd * weight and one
    rounding (fused order of newer torch); None = neither (then no kernel). fp32 needs no probe;
    otherwise probed once, autocast off, on a seeded sample (the order matching >= 99 %)."""
    if x_dtype == torch.float32 and w_dtype == torch.float32:
        return True, torch.float32
    key = (str(torch.device(device)), x_dtype, w_dtype)
    if key not in _RMS_ORDER:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 256, generator=g).to(device=device, dtype=x_dtype)
        w = (1 + 0.25 * torch.randn(256, generator=g)).to(device=device, dtype=w_dtype)
        with torch.autocast(torch.device(device).type, enabled=False):
            y = F.rms_norm(x, (256,), w, 1e-6)
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        found = None
        for round_norm, want in ((False, (x32 * rstd * w.float()).to(x_dtype)), (True, (x32 * rstd).to(x_dtype) * w)):
            if want.dtype == y.dtype and int((want != y).sum()) * 100 <= y.numel():
                found = (round_norm, y.dtype)
                break
        _RMS_ORDER[key] = found
    return _RMS_ORDER[key]


# ------------------------------------------------------------------ the per-model state

@dataclass(eq=False)
class _State:
    """One patched WanTransformer3DModel: options, the token grid of the current forward, and
    what to put back."""
    flags: frozenset
    strict: bool
    rope: nn.Module
    grid: torch.Tensor | None = None      # int32 [B, 3] (F, H, W) on the latents' device
    grid_shape: tuple = ()                # (B, F*H*W), to check a call belongs to that forward
    freqs: torch.Tensor | None = None     # complex128 [positions, head_dim/2] from the rope buffers
    processors: list = field(default_factory=list)  # (attention module, diffusers' processor)
    overrides: list = field(default_factory=list)   # (module, previous instance `forward` or _MISSING)

    def run(self, op: str, why: str, kernel: Callable, fallback: Callable):
        DISPATCH.use_kernel(op, not why, why, strict=self.strict)
        return kernel() if not why else fallback()

    # --- block ops
    def modulate(self, norm, x, shift, scale):
        def theirs():
            return (norm(x.float()) * (1 + scale) + shift).type_as(x)

        if "modulation" not in self.flags:
            return theirs()
        why = "" if _plain_layer_norm(norm) else f"{type(norm).__name__} is not a LayerNorm without affine"
        if not why:
            why = kernels.modulate_supports(x, shift, scale, norm.eps, x.dtype, False)[1]
        return self.run("modulate", why, lambda: kernels.modulate(x, shift, scale, norm.eps, x.dtype, False),
                        theirs)

    def residual(self, x, y, gate):
        def theirs():
            return (x.float() + y.float() * gate).type_as(x)

        if "residual" not in self.flags:
            return theirs()
        why = kernels.gated_residual_supports(x, y, gate, x.dtype)[1]
        return self.run("gated_residual", why, lambda: kernels.gated_residual(x, y, gate, x.dtype), theirs)

    # --- attention ops
    def _norm_problem(self, norm, x) -> tuple[str, bool, torch.dtype]:
        """('' or why the kernel cannot reproduce `norm(x)`, round_norm, torch's output dtype)."""
        if not isinstance(norm, nn.RMSNorm) or norm.weight is None or norm.eps is None \
                or len(norm.normalized_shape) != 1:
            return f"{type(norm).__name__} is not an nn.RMSNorm with a weight and an eps", True, x.dtype
        order = None
        if x.dtype in KERNEL_DTYPES and norm.weight.dtype in KERNEL_DTYPES:
            order = torch_rms_order(x.device, x.dtype, norm.weight.dtype)
        if order is None:
            return (f"torch's rms_norm rounding on {x.device} for {x.dtype} x {norm.weight.dtype} "
                    "is not one the kernel has"), True, x.dtype
        return "", order[0], order[1]

    def norm(self, norm, x):
        if "rms_norm" not in self.flags:
            return norm(x)
        why, rn, out = self._norm_problem(norm, x)
        if not why:
            why = kernels.rms_norm_supports(x, norm.weight, norm.eps, rn)[1]
        return self.run("rms_norm", why, lambda: kernels.rms_norm(x, norm.weight, norm.eps, rn).to(out),
                        lambda: norm(x))

    def _rope_problem(self, x, cos) -> str:
        if self.grid is None or self.grid_shape != (x.shape[0], x.shape[1]):
            return f"no token grid for {x.shape[0]} x {x.shape[1]} tokens (rope not run in this forward)"
        if cos.dtype not in (torch.float32, torch.float64):
            return f"RoPE table in {cos.dtype} (diffusers then rotates in that dtype)"
        if self.freqs is None:
            r = self.rope
            self.freqs = torch.complex(r.freqs_cos[:, 0::2].double().cpu(), r.freqs_sin[:, 1::2].double().cpu())
        return ""

    def norm_rope(self, norm, x, heads: int, rotary_emb):
        cos, sin = rotary_emb
        use_norm, use_rope = "rms_norm" in self.flags, "rope" in self.flags
        if not use_rope:
            return _rotate(self.norm(norm, x).unflatten(2, (heads, -1)), cos, sin)
        why = self._rope_problem(x, cos)
        if not use_norm:
            n = norm(x).unflatten(2, (heads, -1))
            why = why or kernels.rope_apply_supports(n, self.grid, self.freqs)[1]
            return self.run("rope_apply", why, lambda: kernels.rope_apply(n, self.grid, self.freqs).to(x.dtype),
                            lambda: _rotate(n, cos, sin))
        rn, out = True, x.dtype
        if not why:
            why, rn, out = self._norm_problem(norm, x)
        if not why:
            why = kernels.rms_norm_rope_supports(x, norm.weight, norm.eps, heads, self.grid, self.freqs, out,
                                                 0, rn)[1]
        return self.run("rms_norm_rope", why,
                        lambda: kernels.rms_norm_rope(x, norm.weight, norm.eps, heads, self.grid, self.freqs,
                                                      out, 0, rn),
                        lambda: _rotate(norm(x).unflatten(2, (heads, -1)), cos, sin))


def _plain_layer_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None \
        and len(norm.normalized_shape) == 1


def _rotate(x, freqs_cos, freqs_sin):
    """diffusers' RoPE of x [B, L, heads, D] (adjacent pairs), in its order and dtypes."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v as diffusers' WanAttention computes them (fused projections included)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        k, v = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), k, v
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


class _Processor:
    """Stands in for one diffusers WanAttnProcessor: same call, same result up to the kernels'
    rounding; what it cannot cover it hands to the original processor."""

    def __init__(self, original, state: _State):
        self.original = original
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        orig = self.original
        if kwargs or attention_mask is not None or attn.add_k_proj is not None \
                or getattr(orig, "_parallel_config", None) is not None:
            return orig(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        st, heads = self.state, attn.heads
        q, k, v = _projections(attn, hidden_states, encoder_hidden_states)
        if rotary_emb is None:
            q = st.norm(attn.norm_q, q).unflatten(2, (heads, -1))
            k = st.norm(attn.norm_k, k).unflatten(2, (heads, -1))
        else:
            q = st.norm_rope(attn.norm_q, q, heads, rotary_emb)
            k = st.norm_rope(attn.norm_k, k, heads, rotary_emb)
        v = v.unflatten(2, (heads, -1))
        if q.dtype in _HALF and k.dtype == q.dtype and v.dtype == q.dtype:
            o = _attention.attention(q, k, v)
        else:  # fp32: diffusers' own dispatch (wan.attention computes in bf16, as the official code does)
            dispatch = sys.modules[type(orig).__module__].dispatch_attention_fn
            o = dispatch(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                         backend=getattr(orig, "_attention_backend", None))
        o = o.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](o))


def _block_forward(block, st: _State, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """diffusers' WanTransformerBlock.forward, step for step, with the state's ops."""
    if temb.ndim == 4:  # per-token modulation [B, L, 6, C] (Wan 2.2 TI2V)
        mods = [m.squeeze(2) for m in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:               # [B, 6, C]
        mods = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mods
    x = hidden_states
    h = st.modulate(block.norm1, x, shift_msa, scale_msa)
    x = st.residual(x, block.attn1(h, None, None, rotary_emb), gate_msa)
    h = block.norm2(x.float()).type_as(x)
    x = x + block.attn2(h, encoder_hidden_states, None, None)
    h = st.modulate(block.norm3, x, c_shift, c_scale)
    return st.residual(x, block.ffn(h), c_gate)


# ------------------------------------------------------------------ patch / unpatch

def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a diffusers model built from a config the way `from_pretrained(torch_dtype=dtype)`
    loads it: parameters to `dtype` except those under the class's `_keep_in_fp32_modules`
    (for Wan: rope, time_embedder, scale_shift_table, norm1/2/3), buffers untouched (the RoPE
    cos/sin table keeps its dtype). `model.to(dtype)` instead also casts those, and that table."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not keep.intersection(name.split(".")):
                p.data = p.data.to(dtype)
    return model


def _override_forward(st: _State, module: nn.Module, fn) -> None:
    st.overrides.append((module, module.__dict__.get("forward", _MISSING)))
    module.forward = fn


def _block_fn(block, st):
    def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
        return _block_forward(block, st, hidden_states, encoder_hidden_states, temb, rotary_emb)
    return forward


def _rope_fn(rope, st):
    inner = rope.forward

    def forward(hidden_states):
        B, _, f, h, w = hidden_states.shape
        pt, ph, pw = rope.patch_size
        grid = (f // pt, h // ph, w // pw)
        st.grid = torch.tensor([grid], dtype=torch.int32, device=hidden_states.device).repeat(B, 1)
        st.grid_shape = (B, grid[0] * grid[1] * grid[2])
        return inner(hidden_states)
    return forward


def _ops(flags) -> list[str]:
    ops = [op for flag, op in (("modulation", "modulate"), ("residual", "gated_residual")) if flag in flags]
    if "rope" in flags:
        ops.append("rms_norm_rope" if "rms_norm" in flags else "rope_apply")
    if "rms_norm" in flags:
        ops.append("rms_norm")
    return ops + ["attention"]


def patch(obj, flags, strict: bool) -> list[str]:
    """Patch every WanTransformer3DModel in `obj` (see the module docstring); patching again
    only updates the options. Returns one 'name: op, op, ...' entry per model."""
    done = []
    for name, model in wan_transformers(obj):
        st = model.__dict__.get(_ATTR)
        if st is not None:
            st.flags, st.strict = frozenset(flags), strict
        else:
            st = _State(frozenset(flags), strict, model.rope)
            for block in model.blocks:
                if not _is_class(block, "WanTransformerBlock"):
                    continue
                _override_forward(st, block, _block_fn(block, st))
                for attn in (block.attn1, block.attn2):
                    if _is_class(attn.processor, "WanAttnProcessor"):
                        st.processors.append((attn, attn.processor))
                        attn.processor = _Processor(attn.processor, st)
            _override_forward(st, model.rope, _rope_fn(model.rope, st))
            model.__dict__[_ATTR] = st
        done.append(f"{name}: {', '.join(_ops(flags))}")
    log.info("wan_triton: patched diffusers %s", "; ".join(done))
    return done


def unpatch(obj) -> None:
    """Put back diffusers' processors (the same objects) and drop our forward overrides."""
    for _, model in wan_transformers(obj):
        st = model.__dict__.pop(_ATTR, None)
        if st is None:
            continue
        for attn, proc in st.processors:
            attn.processor = proc
        for module, prev in reversed(st.overrides):
            if prev is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev
