"""Wan2.1 video VAE (z_dim 16, stride 4x8x8) in pure PyTorch (checkpoint layout: docs/checkpoint.md).

Same module tree and state-dict keys as the official `wan/modules/vae2_1.py`, so the official
`Wan2.1_VAE.pth` loads strictly (194 tensors, 126,892,531 parameters at dim=96).

Time is causal everywhere: every temporal convolution only looks at the current and the two
previous frames (zero frames before the start). The official code runs the network chunk by
chunk (encode: frame 0, then 4 frames at a time; decode: one latent frame at a time) and keeps
the last frames of every temporal conv's input in a feature cache (`FeatureCache`, CACHE_T = 2),
which makes the chunked run equal to one causal run over the whole sequence while bounding
memory. Both paths are implemented: `cache=None` means "whole sequence in one pass" (used by
the tests as the reference), a `FeatureCache` means "this is one chunk of a longer sequence".

Latent normalisation (per channel, fp32): encode `z = (mu - mean) * (1/std)`,
decode `mu = z / (1/std) + mean` (division by the stored reciprocal, as the official code).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .configs import VAEConfig

__all__ = ["WanVAE", "FeatureCache", "CausalConv3d", "RMSNorm", "ResidualBlock", "AttentionBlock",
           "Resample", "Encoder3d", "Decoder3d", "CACHE_T"]

CACHE_T = 2                      # frames of conv input remembered between chunks
# the dtypes a VAE may run in (its parameters' dtype is its compute dtype): fp32 is the official
# decode; bf16 halves its memory and runs ~1.8x faster at 720p on Hopper (bench/RESULTS.md section
# 4), lossy (the quality gate's "VAE decode in bf16" row, section 16)
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SKIPPED = "Rep"                 # upsample3d slot marker: "first chunk seen, time_conv skipped"


# --------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------

class FeatureCache:
    """One slot per temporal conv, visited in the same order for every chunk.

    Call `rewind()` before each chunk; each conv then `read()`s its slot (the frames kept by
    the previous chunk, or None on the first chunk) and `write()`s the new value, which moves
    on to the next slot. Slots are created lazily on the first chunk.
    """

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def rewind(self) -> None:
        self.index = 0

    def read(self):
        return self.slots[self.index] if self.index < len(self.slots) else None

    def write(self, value) -> None:
        if self.index == len(self.slots):
            self.slots.append(value)
        else:
            self.slots[self.index] = value
        self.index += 1


def _cached_conv(conv: "CausalConv3d", x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    """Run a causal conv (temporal kernel 3, pad 1) on one chunk, keeping its cache slot.

    new cache = last CACHE_T frames of x; when x has a single frame and a previous cache exists,
    new cache = [last frame of the previous cache, x]. The conv sees [previous cache, x] with the
    remaining front frames zero-padded, which equals the whole-sequence causal conv.
    """
    if cache is None:
        return conv(x)
    past = cache.read()
    keep = x[:, :, -CACHE_T:]
    if keep.shape[2] < CACHE_T and past is not None:
        keep = torch.cat([past[:, :, -1:], keep], dim=2)
    else:
        keep = keep.clone()  # a slice would pin the whole chunk in memory
    cache.write(keep)  # the slot lets go of the previous frames before the conv runs
    x = conv.causal_input(x, past)  # [zeros, past, x]; the chunk and `past` are no longer held here
    del past
    return nn.Conv3d.forward(conv, x)  # a module call would keep its arguments alive during the conv


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d with causal time padding.

    padding=(pt, ph, pw): H and W are zero-padded by ph, pw on both sides (done by the conv
    itself), time by 2*pt frames at the front only. With `past` (c cached frames of the previous
    chunk) the input is [past, x] and only 2*pt - c zero frames are added in front.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.front_pad = 2 * pt
        self.padding = (0, ph, pw)  # spatial padding inside the conv: no padded copy

    def causal_input(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """What the conv sees: [zeros, past, x] (2*pt frames in front of x), built in one
        allocation (a cat then a pad would hold two copies of the chunk at once)."""
        front, parts = self.front_pad, [x]
        if past is not None and front > 0:
            parts.insert(0, past.to(x.device, x.dtype))
            front -= past.shape[2]
        if front > 0:
            parts.insert(0, x.new_zeros(*x.shape[:2], front, *x.shape[3:]))
        return torch.cat(parts, dim=2) if len(parts) > 1 else x

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(self.causal_input(x, past))


class RMSNorm(nn.Module):
    """y = x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma  (channel-first, no bias).

    gamma has shape [C,1,1,1] for 5-D inputs (`images=False`) and [C,1,1] for 4-D ones.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the channels of x [B, C, T, H, W]: exactly `nn.SiLU()(norm(x))` for an
    RMSNorm `norm` with this gamma and scale (the pair every residual block and head applies).
    A module-level name so that wan_triton can put its one-pass kernel in its place."""
    return F.silu(F.normalize(x, dim=1) * scale * gamma)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B,C,T,H,W] -> [B*T,C,H,W]."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B*T,C,H,W] -> [B,C,T,H,W]."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


class ResidualBlock(nn.Module):
    """out = residual(x) + shortcut(x).

    residual = RMSNorm, SiLU, CausalConv3d(in,out,3,pad 1), RMSNorm, SiLU, Dropout,
    CausalConv3d(out,out,3,pad 1) (Sequential indices 0..6, the official key names);
    shortcut = CausalConv3d(in,out,1) when in != out, else identity (no cache needed).
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        norm1, _act1, conv1, norm2, _act2, drop, conv2 = self.residual  # the SiLUs: inside rms_norm_silu
        h = self.shortcut(x)
        x = _cached_conv(conv1, rms_norm_silu(x, norm1.gamma, norm1.scale), cache)  # = act1(norm1(x))
        x = _cached_conv(conv2, drop(rms_norm_silu(x, norm2.gamma, norm2.scale)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention inside each frame (frames folded into the batch).

    y = RMSNorm(x); [q|k|v] = to_qkv(y) (1x1 conv, C -> 3C), tokens = the H*W positions;
    out = x + proj(softmax(q k^T / sqrt(C)) v). Needs no cache (nothing crosses frames).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_batch(x))
        qkv = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)                      # each [B*T, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v)
        del qkv, q, k, v
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        return _batch_to_frames(self.proj(y), t) + x


class NearestUpsample2x(nn.Module):
    """Nearest-exact x2 in H and W: every pixel copied into a 2 x 2 block, in x's own dtype and
    memory format.

    The official `Upsample` casts a bf16 input to fp32 and back around the interpolation (older
    torch had no bf16 nearest kernel). Nearest copies values, so both give the same bits
    (tests/test_vae.py checks it); in x's dtype a bf16 decode moves 5 bytes per input byte here
    instead of 25 (cast, interpolate in fp32, cast back).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")


class Resample(nn.Module):
    """Spatial x2 down/up-sampling, frame-wise, optionally with a temporal conv.

    downsample2d: ZeroPad2d(0,1,0,1) (right/bottom only) + Conv2d(C,C,3,stride 2).
    downsample3d: the same, then `time_conv` = conv (3,1,1), stride 2 in time, no padding,
        over frames [x0, x1, ...]; frame 0 is kept as is:  T = 1+2k frames -> 1+k.
    upsample2d: nearest-exact x2 + Conv2d(C, up_dim, 3, pad 1); up_dim = C/2 (Wan2.1) unless given
        (the Wan2.2 VAE keeps C).
    upsample3d: first `time_conv` = causal conv (3,1,1) C -> 2C over frames 1.. (frame 0 never
        enters it), the two C-halves interleaved in time (T = 1+k frames -> 1+2k), then as
        upsample2d.
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown Resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            out = dim // 2 if up_dim is None else up_dim
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, out, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        t = x.shape[2]
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), t)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    @staticmethod
    def _interleave(y: torch.Tensor) -> torch.Tensor:
        """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: frame 2t from channels [:C], 2t+1 from [C:]."""
        b, c2, t, h, w = y.shape
        return y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _time_upsample(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if cache is None:  # whole sequence: frame 0 as is, causal time_conv over frames 1..
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self._interleave(self.time_conv(x[:, :, 1:]))], dim=2)
        past = cache.read()
        if past is None:  # first chunk (latent frame 0): skip time_conv, remember that
            cache.write(_SKIPPED)
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            before = torch.zeros_like(keep) if past is _SKIPPED else past[:, :, -1:]
            keep = torch.cat([before, keep], dim=2)
        y = self.time_conv(x, None if past is _SKIPPED else past)
        cache.write(keep)
        return self._interleave(y)

    def _time_downsample(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if cache is None:  # whole sequence: frame 0 as is, then windows (0,1,2), (2,3,4), ...
            if x.shape[2] < 3:
                return x[:, :, :1]
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        past = cache.read()
        if past is None:  # first chunk (frame 0): kept as is
            cache.write(x.clone())
            return x
        keep = x[:, :, -1:].clone()
        y = self.time_conv(torch.cat([past[:, :, -1:], x], dim=2))
        cache.write(keep)
        return y


# --------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------

class Encoder3d(nn.Module):
    """conv1 -> downsamples (res blocks [+attn], Resample between stages) -> middle -> head."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample,
                 dropout=0.0):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        norm, _act, conv = self.head  # _act (SiLU) is inside rms_norm_silu
        return _cached_conv(conv, rms_norm_silu(x, norm.gamma, norm.scale), cache)


class Decoder3d(nn.Module):
    """conv1 -> middle -> upsamples (res blocks [+attn], Resample between stages) -> head.

    Stage i > 0 starts from C/2 channels because each Resample up-conv halves the width.
    """

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_upsample,
                 dropout=0.0):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        norm, _act, conv = self.head  # _act (SiLU) is inside rms_norm_silu
        return _cached_conv(conv, rms_norm_silu(x, norm.gamma, norm.scale), cache)


# --------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------

def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encode` video -> normalised latents, `decode` latents -> video in [-1, 1].

    Runs in its own parameter dtype with autocast disabled (the official decode is fp32);
    inputs are cast to the parameter dtype and device, outputs are float32. `use_channels_last()`
    lays the 3-D convolutions' weights and the decoder's input out channels-last
    (`torch.channels_last_3d`), which cuDNN may run faster; same math, other kernels (not bit for
    bit: bench/bench_vae.py measures time and PSNR against the default layout).
    The Wan2.2 VAE (wan.vae2_2.Wan22VAE) is this class with its own encoder, decoder, config
    and file name (the hooks `_make_encoder`, `_make_decoder`, `config_class`, `checkpoint_name`).
    """

    config_class = VAEConfig
    checkpoint_name = "Wan2.1_VAE.pth"   # the file `from_pretrained` reads in a checkpoint folder

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or self.config_class()
        self.config = cfg
        self.z_dim = cfg.z_dim
        self.encoder = self._make_encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = self._make_decoder(cfg)
        self.channels_last = False

    @property
    def dtype_name(self) -> str:
        """The VAE_DTYPES name of the dtype it runs in ('fp32', 'bf16')."""
        dtype = next(self.parameters()).dtype
        return next((n for n, d in VAE_DTYPES.items() if d == dtype), str(dtype).replace("torch.", ""))

    def use_channels_last(self, on: bool = True) -> "WanVAE":
        """Lay the 5-D (conv) weights out channels-last, and the decoder's input with them (or back)."""
        fmt = torch.channels_last_3d if on else torch.contiguous_format
        for p in self.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=fmt)
        self.channels_last = on
        return self

    @staticmethod
    def _make_encoder(cfg) -> nn.Module:
        return Encoder3d(cfg.dim, cfg.z_dim * 2, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales,
                         cfg.temperal_downsample)

    @staticmethod
    def _make_decoder(cfg) -> nn.Module:
        return Decoder3d(cfg.dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales,
                         tuple(cfg.temperal_downsample)[::-1])

    # ---- geometry -------------------------------------------------------------------
    @property
    def time_stride(self) -> int:
        return 2 ** sum(bool(v) for v in self.config.temperal_downsample)

    @property
    def space_stride(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1)

    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    def _scale(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as fp32 [1, z_dim, 1, 1, 1]; the reciprocal is computed in fp32."""
        mean = torch.tensor(self.config.mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.config.std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    # ---- encode ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B,3,F,H,W] in [-1,1] -> normalised latents [B,z,(F-1)//ts+1,H/ss,W/ss] (fp32),
        ts, ss = time_stride, space_stride (4, 8 for Wan2.1).

        Chunks: frame 0, then frames [1+4(i-1), 1+4i) (trailing frames beyond 1+4k are dropped,
        as officially). latents = (mu - mean) * (1/std), mu = first z channels of conv1(enc).
        """
        return self._encode(video, chunked=True)

    def _encode_full(self, video: torch.Tensor) -> torch.Tensor:
        """Reference: the same encoder as one causal pass over all frames (tests only)."""
        with torch.no_grad():
            return self._encode(video, chunked=False)

    def _encode(self, video: torch.Tensor, chunked: bool) -> torch.Tensor:
        ts, ss = self.time_stride, self.space_stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B,3,F,H,W], got {tuple(video.shape)}")
        if video.shape[3] % ss or video.shape[4] % ss:
            raise ValueError(f"encode needs H and W divisible by {ss}, got {tuple(video.shape[3:])}")
        p = self._param()
        n_chunks = 1 + (video.shape[2] - 1) // ts
        x = video[:, :, :1 + ts * (n_chunks - 1)].to(p.device, p.dtype)
        with _no_autocast(p.device):
            if chunked:
                cache, outs = FeatureCache(), []
                for i in range(n_chunks):
                    cache.rewind()
                    chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + ts * (i - 1):1 + ts * i]
                    outs.append(self.encoder(chunk, cache))
                del cache
                h = torch.cat(outs, dim=2)
                del outs
            else:
                h = self.encoder(x)
            mu = self.conv1(h)[:, :self.z_dim]
        mean, inv_std = self._scale(mu.device)
        return (mu.float() - mean) * inv_std

    # ---- decode ---------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """latents [B,z,T,h,w] -> video [B,3,1+ts(T-1),ss*h,ss*w], float32, clamped to [-1,1].

        mu = z / (1/std) + mean in fp32; conv2 on all frames; then the decoder runs one latent
        frame at a time with the feature cache; each chunk is written straight into the
        preallocated output (memory stays bounded by one chunk's features plus the caches).
        """
        return self._decode(z, chunked=True, progress=progress)

    def _decode_full(self, z: torch.Tensor) -> torch.Tensor:
        """Reference: the same decoder as one causal pass over all frames (tests only)."""
        with torch.no_grad():
            return self._decode(z, chunked=False, progress=False)

    def _decode(self, z: torch.Tensor, chunked: bool, progress: bool) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"decode expects latents [B,{self.z_dim},T,h,w], got {tuple(z.shape)}")
        p = self._param()
        b, _, t, h, w = z.shape
        ts, ss = self.time_stride, self.space_stride
        mean, inv_std = self._scale(p.device)
        x = (z.to(p.device, torch.float32) / inv_std + mean).to(p.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = torch.empty(b, 3, 1 + ts * (t - 1), ss * h, ss * w, dtype=torch.float32, device=p.device)
        with _no_autocast(p.device):
            x = self.conv2(x)
            if not chunked:
                out.copy_(self.decoder(x))
            else:
                # the bar counts video frames (1, then 4 per latent frame), as "decoding N frames" says
                bar = tqdm(total=out.shape[2], desc="VAE decode", unit="frame", disable=not progress)
                cache, t0 = FeatureCache(), 0
                for i in range(t):
                    cache.rewind()
                    y = self.decoder(x[:, :, i:i + 1], cache)
                    out[:, :, t0:t0 + y.shape[2]].copy_(y)
                    t0 += y.shape[2]
                    bar.update(y.shape[2])
                    del y
                bar.close()
                del cache
        return out.clamp_(-1.0, 1.0)

    # ---- construction / IO ----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: VAEConfig | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> "WanVAE":
        """Random weights, deterministic given `seed` (independent of the global RNG).

        conv weights ~ N(0, 1/fan_in) (variance preserving), biases ~ N(0, 0.05^2),
        RMSNorm gamma ~ 1 + N(0, 0.1^2). Unlike the official init, attention `proj` is not
        zeroed, so every block contributes and the decoded video is far from constant.
        """
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gamma"):
                    p.normal_(0.0, 0.1, generator=gen).add_(1.0)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.05, generator=gen)
                else:
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32,
                        cfg: VAEConfig | None = None) -> "WanVAE":
        """Load the official `Wan2.1_VAE.pth` (`checkpoint_name`; plain state dict, official keys).

        `path` is the .pth file or a folder holding it. The model is built on
        `meta` and the (memory-mapped) tensors are assigned, cast to `dtype`, on `device`.
        Raises CheckpointError for a missing/unreadable file, missing/unexpected keys or shapes.
        """
        from .checkpoint import load_pth, load_state_dict_into

        path = Path(path)
        if path.is_dir():
            path = path / cls.checkpoint_name
        sd = load_pth(path, device="cpu")
        with torch.device("meta"):
            model = cls(cfg)
        load_state_dict_into(model, sd, f"VAE checkpoint {path}", dtype=dtype, device=device)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def save_pretrained(self, path) -> None:
        """torch.save of the plain state dict (official key names), tensors on CPU."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path)
