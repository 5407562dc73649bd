"""Wan2.2 video VAE (official `vae2_2`: z_dim 48, stride 4x16x16) in pure PyTorch (docs/models.md).

Same module tree and state-dict keys as the official module, so `Wan2.2_VAE.pth` loads strictly
(`encoder.downsamples.{i}.downsamples.{j}...`, `decoder.upsamples.{i}.upsamples.{j}...`; the key
table is checked by tests/test_vae2_2.py). It is the Wan2.1 VAE (wan/vae.py, whose blocks, feature
cache, chunking, normalisation and loading it reuses) with these differences:

* Pixels are folded into channels before the encoder and unfolded after the decoder (2x2):
  input channel `4c + 2*dx + dy` holds colour c at pixel offset (dy, dx) of each 2x2 cell, so
  the encoder sees 12 channels and the decoder head makes 12.
* Encoder and decoder are stages: stage i of the encoder is `downsamples` = [ResidualBlock x
  num_res_blocks, Resample (down, when not the last stage)] plus a parameter-free shortcut, the
  mean over groups of channels after folding (ft, 2, 2) cells into channels (`AvgDown`); stage i
  of the decoder is `upsamples` = [ResidualBlock x (num_res_blocks + 1), Resample (up, C -> C)]
  plus the shortcut that repeats channels and unfolds them into (ft, 2, 2) cells (`DupUp`),
  whose first ft - 1 frames are dropped on the first chunk (frame 0 is not doubled in time).
* The decoder has its own width (`dec_dim` 256, the encoder `dim` 160); no attention outside the
  middle blocks.

Latents are normalised with the Wan2.2 statistics (`VAE22_MEAN`, `VAE22_STD`), as in Wan2.1:
encode `(mu - mean) * (1/std)`, decode `z / (1/std) + mean`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import VAE22Config
from .vae import (AttentionBlock, CausalConv3d, FeatureCache, Resample, ResidualBlock, RMSNorm, WanVAE,
                  _cached_conv)

__all__ = ["Wan22VAE", "AvgDown", "DupUp", "DownStage", "UpStage", "Encoder22", "Decoder22", "fold_pixels",
           "unfold_pixels"]


def fold_pixels(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel (c*p + dx)*p + dy holds offset (dy, dx)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)                # (b, c, t, h', dy, w', dx)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unfold_pixels(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `fold_pixels`: [B, C*p*p, T, h, w] -> [B, C, T, h*p, w*p]."""
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)              # (b, c, dx, dy, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


class AvgDown(nn.Module):
    """Parameter-free down-sampling shortcut: [B, Cin, T, H, W] -> [B, Cout, T/ft, H/fs, W/fs].

    Front-pad time with zero frames to a multiple of ft, fold each (ft, fs, fs) cell into
    channels (channel c*f + (dt*fs + dy)*fs + dx, f = ft*fs*fs), then average consecutive groups
    of Cin*f/Cout channels. With the chunking (frame 0 alone, then 4 frames) the padding frame is
    only ever added in front of frame 0, as in one pass over the whole sequence.
    """

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, ft, fs
        f = ft * fs * fs
        if (in_dim * f) % out_dim:
            raise ValueError(f"AvgDown: {in_dim} x {f} channels do not split into {out_dim} groups")
        self.group = in_dim * f // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp(nn.Module):
    """Parameter-free up-sampling shortcut: [B, Cin, T, H, W] -> [B, Cout, T*ft, H*fs, W*fs].

    Each channel is repeated Cout*f/Cin times (f = ft*fs*fs), then each group of f channels
    becomes an (ft, fs, fs) cell (inverse of AvgDown's folding). On the first chunk the first
    ft - 1 frames are dropped: latent frame 0 becomes one frame.
    """

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, ft, fs
        f = ft * fs * fs
        if (out_dim * f) % in_dim:
            raise ValueError(f"DupUp: {out_dim} x {f} channels are not a multiple of {in_dim}")
        self.repeats = out_dim * f // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownStage(nn.Module):
    """Encoder stage: `downsamples` (residual blocks, then a Resample unless `down` is False) plus
    the AvgDown shortcut of the stage's input."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, down_time: bool, down: bool):
        super().__init__()
        layers, first_in = [], in_dim
        for _ in range(num_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if down_time else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.skip = AvgDown(first_in, out_dim, 2 if down_time else 1, 2 if down else 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.skip(x)


class UpStage(nn.Module):
    """Decoder stage: `upsamples` (residual blocks, then a C -> C Resample when `up`) plus, when
    `up`, the DupUp shortcut of the stage's input."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, up_time: bool, up: bool):
        super().__init__()
        layers, first_in = [], in_dim
        for _ in range(num_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(Resample(out_dim, "upsample3d" if up_time else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)
        self.skip = DupUp(first_in, out_dim, 2 if up_time else 1, 2) if up else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None, first_chunk: bool = False) -> torch.Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return h if self.skip is None else h + self.skip(x, first_chunk)


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder22(nn.Module):
    """fold pixels -> conv1 -> stages -> middle -> head (the folding is per frame, so it runs per chunk)."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        self.patch = cfg.patch_size
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3 * self.patch ** 2, dims[0], 3, padding=1)
        last = len(cfg.dim_mult) - 1
        self.downsamples = nn.Sequential(*(
            DownStage(a, b, cfg.num_res_blocks, i < len(cfg.temperal_downsample) and cfg.temperal_downsample[i],
                      down=i != last)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, fold_pixels(x, self.patch), cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        norm, act, conv = self.head
        return _cached_conv(conv, act(norm(x)), cache)


class Decoder22(nn.Module):
    """conv1 -> middle -> stages -> head -> unfold pixels. The first chunk (a cache without slots
    yet, or no cache: the whole sequence) drops the shortcuts' doubled first frame."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        self.patch = cfg.patch_size
        mult = cfg.dim_mult
        dims = [cfg.dec_dim * u for u in (mult[-1], *mult[::-1])]
        up_time = tuple(cfg.temperal_downsample)[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        last = len(mult) - 1
        self.upsamples = nn.Sequential(*(
            UpStage(a, b, cfg.num_res_blocks + 1, i < len(up_time) and up_time[i], up=i != last)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))))
        self.head = _head(dims[-1], 3 * self.patch ** 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        first = cache is None or not cache.slots  # read before this chunk fills any slot
        x = _cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        for stage in self.upsamples:
            x = stage(x, cache, first)
        norm, act, conv = self.head
        return unfold_pixels(_cached_conv(conv, act(norm(x)), cache), self.patch)


class Wan22VAE(WanVAE):
    """Wan2.2 VAE: `encode` video [B,3,F,H,W] -> latents [B,48,1+(F-1)//4,H/16,W/16], `decode`
    back, float32 out, clamped to [-1, 1]. Construction, chunking, normalisation, loading
    (`Wan2.2_VAE.pth`) and dtypes as `wan.vae.WanVAE`."""

    config_class = VAE22Config
    checkpoint_name = "Wan2.2_VAE.pth"

    @staticmethod
    def _make_encoder(cfg) -> nn.Module:
        return Encoder22(cfg)

    @staticmethod
    def _make_decoder(cfg) -> nn.Module:
        return Decoder22(cfg)

    @property
    def space_stride(self) -> int:
        return self.config.patch_size * 2 ** (len(self.config.dim_mult) - 1)


def vae_class(cfg) -> type:
    """The VAE class of a VAE config: Wan22VAE for a VAE22Config, else the Wan2.1 WanVAE."""
    return Wan22VAE if isinstance(cfg, VAE22Config) else WanVAE
