"""Wan 2.2 DiT (`WanModel`): an expert of T2V-A14B / I2V-A14B, or the TI2V-5B model, in pure PyTorch.

Computes what the official `wan/modules/model.py` computes, op by op in the same precision
(docs/precision.md; RoPE: docs/rope.md; weights: docs/checkpoint.md), with two waste cuts that cannot change the result beyond the
last ulp of an fp32 GEMM row: one time embedding per sample instead of one per token, and
no Python loop over the batch (RoPE positions are built for the whole batch at once).

The hot element-wise ops are module-level functions looked up at call time, so
`wan_triton.patch()` can swap them and `unpatch()` can put them back:

    rms_norm, rope_apply, rms_norm_rope, modulate, gated_residual, modulate_rows, gated_residual_rows

(`attention` lives in `wan.attention`, `cfg_combine` in `wan.pipeline`.) Per-token timesteps (the
TI2V image mode) are embedded once per distinct value (wan/tokens.py); `modulate_rows` and
`gated_residual_rows` then take [K, C] tables and a token index instead of [B, L, C] tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as _attention
from .checkpoint import dit_weight_files, load_weights_into, read_dit_config, save_dit
from .configs import ROPE_POSITIONS, DiTConfig
from .tokens import TokenRows, timesteps_to_embed

__all__ = [
    "WanModel", "rms_norm", "rope_apply", "rms_norm_rope", "modulate", "gated_residual", "modulate_rows",
    "gated_residual_rows",
    "rope_params", "rope_split", "rope_freqs", "rope_table", "sinusoidal_embedding_1d",
]


# --------------------------------------------------------------------------------------
# Hot ops (reference versions). Every one of them is swappable by wan_triton.patch().
# --------------------------------------------------------------------------------------

def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 for the math, but keep float64 (so float64 inputs give a float64 reference)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, official rounding order.

    y = cast_to(x.dtype)( x32 * rsqrt(mean(x32^2) + eps) ) * weight, x32 = x.float().
    The product with `weight` follows type promotion (bf16 x, fp32 weight -> fp32).
    (float64 inputs stay float64 throughout: that is the parity tests' reference.)
    """
    xf = _f32(x)
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """complex128 table [max_seq_len, dim/2]: exp(i * pos * theta^(-2j/dim)), float64 math."""
    assert dim % 2 == 0
    omega = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), omega)
    return torch.polar(torch.ones_like(angles), angles)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs for the (frame, height, width) axes: c-2(c//3), c//3, c//3, c = head_dim/2."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_freqs(head_dim: int, max_pos: int = ROPE_POSITIONS, theta: float = 10000.0) -> torch.Tensor:
    """The model's RoPE table, complex128 [max_pos, head_dim/2] (docs/rope.md).

    Columns are three per-axis ladders side by side, each normalised by its own sub-dimension:
    frames 2*cf, height 2*ch, width 2*cw pairs' worth, (cf, ch, cw) = rope_split(head_dim).
    """
    cf, ch, cw = rope_split(head_dim)
    return torch.cat([rope_params(max_pos, 2 * cf, theta), rope_params(max_pos, 2 * ch, theta),
                      rope_params(max_pos, 2 * cw, theta)], dim=1)


def rope_table(grid_sizes: torch.Tensor, seq_len: int, freqs: torch.Tensor, token_offset: int = 0) -> torch.Tensor:
    """Per-token rotation multipliers for a batch: complex [B, seq_len, head_dim/2].

    Local token n has global index g = n + token_offset (a sequence-parallel rank holds the slice
    starting at token_offset). Token g of sample b sits at (f, h, w) with g = f*H*W + h*W + w for
    its grid (F, H, W); its multiplier is concat(freqs_f[f], freqs_h[h], freqs_w[w]). Tokens with
    g >= F*H*W (padding) get 1+0i, i.e. pass through unrotated. No loop over the batch.
    """
    if token_offset < 0:
        raise ValueError(f"token_offset must be >= 0, got {token_offset}")
    device = freqs.device
    g = grid_sizes.to(device=device, dtype=torch.long).reshape(-1, 3)
    cf, ch, cw = rope_split(2 * freqs.shape[1])
    fr_f, fr_h, fr_w = freqs.split([cf, ch, cw], dim=1)
    n = torch.arange(seq_len, device=device)[None, :] + int(token_offset)
    gf, gh, gw = g[:, 0:1], g[:, 1:2], g[:, 2:3]
    hw = gh * gw
    valid = n < gf * hw
    fi = torch.where(valid, n // hw, 0)
    hi = torch.where(valid, (n % hw) // gw, 0)
    wi = torch.where(valid, n % gw, 0)
    table = torch.cat([fr_f[fi], fr_h[hi], fr_w[wi]], dim=-1)
    return torch.where(valid[..., None], table, torch.ones((), dtype=table.dtype, device=device))


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor, token_offset: int = 0) -> torch.Tensor:
    """Wan 3-D RoPE on x [B, L, heads, head_dim]; adjacent pairs (x[2j], x[2j+1]) = re, im.

    out = x * exp(i*theta(token, j)) computed in float64/complex128, returned as float32,
    same for every head; padding tokens unchanged; local token n is global token
    n + token_offset (docs/rope.md).
    """
    B, L, H, D = x.shape
    table = rope_table(grid_sizes, L, freqs.to(x.device), token_offset)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(B, L, H, D // 2, 2))
    return torch.view_as_real(xc * table[:, :, None, :]).flatten(3).float()


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, num_heads: int,
                  grid_sizes: torch.Tensor, freqs: torch.Tensor,
                  out_dtype: torch.dtype | None = None, token_offset: int = 0) -> torch.Tensor:
    """q/k path of self-attention: RMSNorm over the full width, split heads, RoPE.

    x [B, L, C] -> [B, L, num_heads, C/num_heads] in float32, or in `out_dtype` (the
    dtype attention casts to anyway). `weight=None` skips the norm. `token_offset` as in
    rope_apply.
    """
    if weight is not None:
        x = rms_norm(x, weight, eps)
    out = rope_apply(x.unflatten(-1, (num_heads, -1)), grid_sizes, freqs, token_offset)
    return out if out_dtype is None else out.to(out_dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """adaLN: LayerNorm without affine (fp32 stats, output cast back to x's dtype, as the
    official WanLayerNorm does), then float32 `n * (1 + scale) + shift`.

    shift/scale broadcast against x: [B, 1, C] per sample or [B, L, C] per token.
    Returns float32, or `out_dtype` (the dtype the next matrix product casts to anyway).
    """
    n = _f32(F.layer_norm(_f32(x), (x.shape[-1],), eps=eps).to(x.dtype))
    out = n * (1 + scale) + shift
    return out if out_dtype is None else out.to(out_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.layer_norm of x.float() with the fp32 weight and bias (official WanLayerNorm), cast to
    `out_dtype` (default x's dtype). norm3 hands the cross-attention's q Linear its input in the
    matmul dtype: the value autocast's cast of the fp32 output would give."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(out_dtype if out_dtype is not None else x.dtype)


def modulate_into(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None):
    """modulate() for the input of `layer`; a layer with a `modulate_input` method (the fp8
    linears of wan_triton.fp8) builds its own input form from the same arguments instead."""
    own = getattr(layer, "modulate_input", None)
    return modulate(x, shift, scale, eps, out_dtype) if own is None else own(x, shift, scale, eps, out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate with type promotion (bf16 y, fp32 gate -> fp32 result)."""
    return x + y * gate


def modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """modulate() with per-token rows: token (b, l) takes shift[index[b, l]] and scale[index[b, l]]
    (tables [K, C], index [B, L] int); the same values as modulate() with the rows gathered."""
    i = index.long()
    return modulate(x, shift[i], scale[i], eps, out_dtype)


def gated_residual_rows(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gated_residual() with per-token rows: token (b, l) takes gate[index[b, l]] (table [K, C])."""
    return gated_residual(x, y, gate[index.long()])


def modulate_rows_into(layer: nn.Module, x, shift, scale, index, eps: float, out_dtype=None):
    """modulate_into() with per-token rows (an fp8 linear gets the rows gathered to [B, L, C])."""
    own = getattr(layer, "modulate_input", None)
    if own is None:
        return modulate_rows(x, shift, scale, index, eps, out_dtype)
    i = index.long()
    return own(x, shift[i], scale[i], eps, out_dtype)


def _modulated(layer, x, m, i: int, eps: float, out_dtype, index):
    """The input of `layer`: x modulated by shift m[:, i] and scale m[:, i + 1], one row per
    sample (index None, m [B, 6, C]) or per token (m [K, 6, C] rows selected by index)."""
    if index is None:
        return modulate_into(layer, x, m[:, i:i + 1], m[:, i + 1:i + 2], eps, out_dtype)
    return modulate_rows_into(layer, x, m[:, i], m[:, i + 1], index, eps, out_dtype)


def _gated(x, y, m, i: int, index):
    """x + y * m[:, i], the gate per sample (index None) or per token."""
    return gated_residual(x, y, m[:, i:i + 1]) if index is None else gated_residual_rows(x, y, m[:, i], index)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] -> float64 [N, dim]: concat(cos(t*w), sin(t*w)), w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    position = position.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    s = torch.outer(position, omega)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1)


# --------------------------------------------------------------------------------------
# Precision helpers
# --------------------------------------------------------------------------------------

@torch.no_grad()
def init_linears_and_norms_(root: nn.Module, gen: torch.Generator) -> None:
    """The official init of every Linear / LayerNorm / RMSNorm under `root`: Xavier-uniform
    weights (a = sqrt(6 / (fan_in + fan_out))) from `gen`, zero biases, unit norm weights."""
    for mod in root.modules():
        if isinstance(mod, nn.Linear):
            a = math.sqrt(6.0 / (mod.in_features + mod.out_features))
            mod.weight.uniform_(-a, a, generator=gen)
            mod.bias.zero_()
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.weight.fill_(1.0)
            mod.bias.zero_()
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an enclosing autocast casts matmul inputs to, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An fp32 GEMM whatever the weight dtype and whatever autocast encloses the call (the
    official `autocast(dtype=float32)` regions: time embedding, time projection, head)."""
    b = None if layer.bias is None else layer.bias.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), layer.weight.float(), b)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32, output cast back to the input dtype (official WanLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x, out_dtype=None):
        """`out_dtype`: the output's dtype (default x's): the same values as casting it afterwards."""
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype)


class SelfAttention(nn.Module):
    sp = None  # wan.parallel.Ulysses while sequence parallel is on (x is then this rank's token shard)

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_heads, self.head_dim, self.eps = dim, num_heads, dim // num_heads, eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _w(self, norm):
        return getattr(norm, "weight", None)

    def forward(self, x, seq_lens, grid_sizes, freqs, out_dtype):
        sp = self.sp
        off = 0 if sp is None else sp.token_offset(x.shape[1])  # global index of this shard's first token
        q = rms_norm_rope(self.q(x), self._w(self.norm_q), self.eps, self.num_heads, grid_sizes, freqs, out_dtype,
                          token_offset=off)
        k = rms_norm_rope(self.k(x), self._w(self.norm_k), self.eps, self.num_heads, grid_sizes, freqs, out_dtype,
                          token_offset=off)
        v = self.v(x).unflatten(-1, (self.num_heads, self.head_dim))
        if sp is None:
            o = _attention.attention(q, k, v, k_lens=seq_lens, out_dtype=out_dtype)
        else:  # all-to-all to all tokens x heads/U, attention, all-to-all back
            o = sp.attention(q, k, v, k_lens=seq_lens, out_dtype=out_dtype)
        return self.o(o.flatten(2))


class CrossAttention(SelfAttention):
    def forward(self, x, context, out_dtype):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.v(context).unflatten(-1, (self.num_heads, self.head_dim))
        o = _attention.attention(q, k, v, out_dtype=out_dtype)
        return self.o(o.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, qk_norm=True, cross_attn_norm=True, eps=1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, seq_lens, grid_sizes, freqs, context, mm_dtype=None):
        """x [B, L, C] (bf16 into block 0, fp32 after); e0 [B, 6, C] fp32, or TokenRows of [K, 6, C]
        (per-token timesteps)."""
        index = e0.index if isinstance(e0, TokenRows) else None
        # [B or K, 6, C] fp32: shift, scale, gate (attn); shift, scale, gate (ffn)
        m = self.modulation + (e0 if index is None else e0.rows)
        # attention casts q/k to the matmul dtype and its output is re-cast by the `o` Linear:
        # hand tensors over in that dtype directly (identical values, fewer bytes)
        attn_out = mm_dtype
        y = self.self_attn(_modulated(self.self_attn.q, x, m, 0, self.eps, mm_dtype, index), seq_lens, grid_sizes,
                           freqs, attn_out)
        x = _gated(x, y, m, 2, index)
        x = x + self.cross_attn(self._norm3(x, mm_dtype), context, attn_out)
        y = self.ffn(_modulated(self.ffn[0], x, m, 3, self.eps, mm_dtype, index))
        return _gated(x, y, m, 5, index)

    def _norm3(self, x, mm_dtype):
        """The cross-attention's input: norm3(x), in the matmul dtype where its q is a plain Linear (whose
        autocast would cast it so: the same values, without the fp32 tensor); in fp32 for any other q
        (wan_triton.fp8's linears quantize the fp32 output)."""
        if isinstance(self.norm3, LayerNorm) and type(self.cross_attn.q) is nn.Linear:
            return self.norm3(x, mm_dtype)
        return self.norm3(x)


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x [B, L, C] fp32; e [B, C] fp32 (time_embedding output), or TokenRows of [K, C]. fp32 GEMM out."""
        if isinstance(e, TokenRows):
            hm = self.modulation + e.rows[:, None, :]  # [K, 2, C]
            u = modulate_rows(x, hm[:, 0], hm[:, 1], e.index, self.eps)
        else:
            hm = self.modulation + e[:, None, :]  # [B, 2, C]: shift, scale (same e for both)
            u = modulate(x, hm[:, 0:1], hm[:, 1:2], self.eps)
        return _linear_fp32(self.head, u)


MODEL_TYPES = ("t2v", "i2v", "ti2v")  # the official config.json's model_type values of the Wan 2.2 family


class WanModel(nn.Module):
    """One Wan 2.2 DiT, built from a `DiTConfig` (fields = the official config.json keys): an expert of
    t2v-A14B (model_type 't2v') or i2v-A14B ('i2v', 36 input channels), or the ti2v-5B model ('ti2v')."""

    sp = None  # wan.parallel.Ulysses: set by wan.parallel.enable_sequence_parallel
    step_cache = None  # wan.step_cache's run while a cached generation runs (it runs the blocks)

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"WanModel takes a DiTConfig, got {type(config).__name__} "
                            "(WanModel.from_kwargs(**official) accepts the official keyword arguments)")
        c = config
        if c.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {c.model_type!r}")
        if tuple(c.window_size) != (-1, -1):
            raise ValueError("only global attention (window_size=(-1, -1)) is supported")
        if c.dim % c.num_heads or (c.dim // c.num_heads) % 2:
            raise ValueError(f"dim {c.dim} must split into {c.num_heads} heads of even size")
        self.config = c
        self.patch_size, self.text_len, self.dim, self.freq_dim = tuple(c.patch_size), c.text_len, c.dim, c.freq_dim
        self.out_dim, self.num_heads, self.eps = c.out_dim, c.num_heads, c.eps
        dim, eps = c.dim, c.eps

        self.patch_embedding = nn.Conv3d(c.in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(dim, c.ffn_dim, c.num_heads, c.qk_norm, c.cross_attn_norm, eps)
            for _ in range(c.num_layers)
        ])
        self.head = Head(dim, c.out_dim, self.patch_size, eps)

        # RoPE table: plain attribute (not a buffer) so .to(dtype) never touches it; complex128, CPU.
        with torch.device("cpu"):
            self.freqs = rope_freqs(c.head_dim)
        self._freqs_on: dict = {}

    # ----- construction helpers -----
    @classmethod
    def from_kwargs(cls, **official) -> "WanModel":
        """The official constructor's keyword arguments (config.json keys; unknown keys are ignored)."""
        return cls(DiTConfig.from_dict(official))

    @classmethod
    def from_config(cls, config: DiTConfig, device="cpu", dtype=torch.float32, seed: int | None = 0,
                    zero_head: bool = True) -> "WanModel":
        """Random weights with the official init, materialised directly on `device` in `dtype`."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights(seed=seed, zero_head=zero_head)
        return model.to(dtype).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", progress: bool = False) -> "WanModel":
        """The model of an official expert folder (config.json + safetensors, sharded or not), built on
        `meta` and filled tensor by tensor (wan.checkpoint.load_weights_into). dtype None keeps the
        stored dtype. `progress` shows a byte-counting bar over the shards (an A14B expert is tens
        of GB). Raises CheckpointError naming the file and key."""
        cfg = DiTConfig.from_dict(read_dit_config(folder))
        files = dit_weight_files(folder)
        with torch.device("meta"):
            model = cls(cfg)
        return load_weights_into(model, folder, files, device, dtype, progress)

    def save_pretrained(self, folder, max_shard_bytes: int = 5 * 2 ** 30):
        save_dit(self, folder, max_shard_bytes=max_shard_bytes)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0, zero_head: bool = True):
        """Official init (docs/checkpoint.md). `zero_head=False` randomises the head so outputs are non-zero."""
        dev = next(self.parameters()).device
        gen = torch.Generator(device=dev)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)

        def xavier_(w, fan_in, fan_out):
            a = math.sqrt(6.0 / (fan_in + fan_out))
            w.uniform_(-a, a, generator=gen)

        init_linears_and_norms_(self, gen)
        pe = self.patch_embedding
        xavier_(pe.weight, math.prod(pe.weight.shape[1:]), pe.weight.shape[0])
        bound = 1.0 / math.sqrt(math.prod(pe.weight.shape[1:]))
        pe.bias.uniform_(-bound, bound, generator=gen)
        for seq in (self.text_embedding, self.time_embedding):
            for mod in seq:
                if isinstance(mod, nn.Linear):
                    mod.weight.normal_(0.0, 0.02, generator=gen)
        for blk in self.blocks:
            blk.modulation.normal_(generator=gen).div_(self.dim ** 0.5)
        self.head.modulation.normal_(generator=gen).div_(self.dim ** 0.5)
        if zero_head:
            self.head.head.weight.zero_()
        else:
            xavier_(self.head.head.weight, self.head.head.in_features, self.head.head.out_features)
            self.head.head.bias.uniform_(-0.02, 0.02, generator=gen)

    # ----- forward -----
    def _freqs(self, device) -> torch.Tensor:
        key = str(device)
        f = self._freqs_on.get(key)
        if f is None:
            f = self._freqs_on[key] = self.freqs.to(device)
        return f

    def _embed_text(self, context, batch: int, device) -> torch.Tensor:
        if isinstance(context, torch.Tensor):
            if context.dim() != 3:
                raise ValueError(f"context tensor must be [B, L, {self.config.text_dim}], got {tuple(context.shape)}")
            ctx = context
        else:
            ctx = torch.nn.utils.rnn.pad_sequence([c.reshape(-1, c.shape[-1]) for c in context], batch_first=True)
        if ctx.shape[0] != batch:
            raise ValueError(f"got {ctx.shape[0]} contexts for a batch of {batch}")
        if ctx.shape[1] > self.text_len:
            raise ValueError(f"context has {ctx.shape[1]} tokens, more than text_len={self.text_len}")
        ctx = F.pad(ctx.to(device), (0, 0, 0, self.text_len - ctx.shape[1]))  # exact zero rows
        return self.text_embedding(ctx)

    def _embed_video(self, x):
        """-> tokens [B, seq, C], grid_sizes LongTensor [B, 3], seq_lens LongTensor [B]."""
        if isinstance(x, torch.Tensor):
            if x.dim() != 5:
                raise ValueError(f"x must be [B, {self.config.in_dim}, F, H, W], got {tuple(x.shape)}")
            u = self.patch_embedding(x)
            B = u.shape[0]
            grid = torch.tensor(u.shape[2:], dtype=torch.long).expand(B, 3)
            toks = u.flatten(2).transpose(1, 2)
            lens = torch.full((B,), toks.shape[1], dtype=torch.long)
            return toks, grid, lens
        shapes = {tuple(u.shape) for u in x}
        if len(shapes) == 1:  # one batched conv
            return self._embed_video(torch.stack(list(x)))
        embs = [self.patch_embedding(u.unsqueeze(0)) for u in x]  # mixed sizes: list boundary
        grid = torch.tensor([list(u.shape[2:]) for u in embs], dtype=torch.long)
        toks = [u.flatten(2).transpose(1, 2)[0] for u in embs]
        lens = torch.tensor([t.shape[0] for t in toks], dtype=torch.long)
        return torch.nn.utils.rnn.pad_sequence(toks, batch_first=True), grid, lens

    def _unpatchify(self, x, grid_sizes):
        """x [B, seq, prod(patch)*out] -> list of [out, F*pt, H*ph, W*pw] (per-sample grid)."""
        pt, ph, pw = self.patch_size
        c = self.out_dim
        outs = []
        uniq = {tuple(g) for g in grid_sizes.tolist()}
        if len(uniq) == 1:
            f, h, w = next(iter(uniq))
            u = x[:, : f * h * w].reshape(x.shape[0], f, h, w, pt, ph, pw, c)
            u = u.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)
            return list(u.unbind(0))
        for b, (f, h, w) in enumerate(grid_sizes.tolist()):
            u = x[b, : f * h * w].reshape(f, h, w, pt, ph, pw, c)
            outs.append(u.permute(6, 0, 3, 1, 4, 2, 5).reshape(c, f * pt, h * ph, w * pw))
        return outs

    def time_embed(self, t: torch.Tensor):
        """t [N] -> (e [N, C], e0 [N, 6, C]), fp32 GEMMs, sinusoid in float64 (N = B samples, or the
        K distinct values of per-token timesteps)."""
        with torch.autocast(device_type=t.device.type, enabled=False):
            s = sinusoidal_embedding_1d(self.freq_dim, t.reshape(-1)).float()
            lin1, act, lin2 = self.time_embedding
            e = _linear_fp32(lin2, act(_linear_fp32(lin1, s)))
            e0 = _linear_fp32(self.time_projection[1], self.time_projection[0](e)).unflatten(1, (6, self.dim))
        return e, e0

    def forward(self, x, t, context, seq_len: int | None = None, y=None):
        """x: Tensor [B, in_dim, F, H, W] or list of [in_dim, F, H, W]; t: [B] timesteps, or per token:
        [B, seq] (official) or a TokenTimesteps; context: list of [L_i, text_dim] or Tensor [B, L, text_dim];
        y: conditioning channels concatenated after x's (official i2v: mask + image latent).
        Returns float32 in x's container type."""
        is_list = not isinstance(x, torch.Tensor)
        device = self.patch_embedding.weight.device
        if is_list:
            x = [u.to(device) if v is None else torch.cat([u, v]).to(device)
                 for u, v in zip(x, [None] * len(x) if y is None else y)]
        else:
            x = x.to(device) if y is None else torch.cat([x, y], dim=1).to(device)
        mm_dtype = autocast_dtype(device.type)

        tokens, grid_sizes, seq_lens = self._embed_video(x)
        B, L = tokens.shape[:2]
        if seq_len is not None:
            if seq_len < L:
                raise ValueError(f"seq_len={seq_len} is shorter than the {L} video tokens")
            tokens = F.pad(tokens, (0, 0, 0, seq_len - L))
        sp = self.sp
        if sp is not None:  # Ulysses: pad to a multiple of U; this rank keeps its chunk of tokens
            tokens = sp.pad(tokens)
        seq_lens = seq_lens.to(device)

        values, index = timesteps_to_embed(t, B, L if seq_len is None else seq_len, device)
        e, e0 = self.time_embed(values)
        if index is not None:  # per-token rows; Ulysses: this rank's tokens only
            index = index.expand(B, -1)
            if sp is not None:
                index = sp.shard(F.pad(index, (0, tokens.shape[1] - index.shape[1])))
            e, e0 = TokenRows(e, index), TokenRows(e0, index)
        ctx = self._embed_text(context, B, device)
        freqs = self._freqs(device)
        _attention.resolve_backend(device)  # choose (and log) outside any compiled block

        # mask padded keys only when a sample actually has padding
        k_lens = seq_lens if bool((seq_lens < tokens.shape[1]).any()) else None
        h = tokens if sp is None else sp.shard(tokens)
        cache = self.step_cache
        if cache is None:
            for block in self.blocks:
                h = block(h, e0, k_lens, grid_sizes, freqs, ctx, mm_dtype)
        else:  # wan.step_cache: a block range runs, or the residual it added at a computed step is added again
            h = cache.run_blocks(self.blocks, h,
                                 lambda block, x: block(x, e0, k_lens, grid_sizes, freqs, ctx, mm_dtype))
        out = self.head(h, e)
        if sp is not None:
            out = sp.gather(out)
        outs = [u.float() for u in self._unpatchify(out, grid_sizes)]
        return outs if is_list else torch.stack(outs)
