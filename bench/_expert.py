"""Shared setup of the DiT benchmarks: one A14B expert with random weights and the inputs of one
forward, shapes derived from the config (VAE stride, patch size, latent channels, text width)."""
from __future__ import annotations

import dataclasses
import math

import torch


def build_expert(device, layers: int | None = None, config=None):
    """A14B expert (or `config`'s T2V preset) with random bf16 weights; `layers` shortens it."""
    from wan.configs import T2V_A14B
    from wan.dit import WanModel

    cfg = (config or T2V_A14B).dit
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    return WanModel.from_config(cfg, device=device, dtype=torch.bfloat16, seed=0, zero_head=False)


def expert_inputs(width: int, height: int, frame_num: int, device, generator, config=None):
    """(x [1, z, F, H, W] fp32 noise, cond context [1, 60, text_dim], uncond context [1, 120, text_dim]
    bf16 (token counts capped at text_len), t = [900], seq_len) for one forward at that video size."""
    from wan.configs import T2V_A14B

    cfg = config or T2V_A14B
    st, sh, sw = cfg.vae_stride
    pt, ph, pw = cfg.dit.patch_size
    lat = (cfg.vae.z_dim, (frame_num - 1) // st + 1, height // sh, width // sw)
    seq_len = math.ceil(lat[2] * lat[3] / (ph * pw) * lat[1] / pt)  # as WanT2V.seq_len
    x = torch.randn(1, *lat, device=device, generator=generator)
    n_c, n_u = min(60, cfg.dit.text_len), min(120, cfg.dit.text_len)
    ctx_c = torch.randn(1, n_c, cfg.dit.text_dim, device=device, generator=generator).bfloat16()
    ctx_u = torch.randn(1, n_u, cfg.dit.text_dim, device=device, generator=generator).bfloat16()
    t = torch.tensor([900], device=device)
    return x, ctx_c, ctx_u, t, seq_len
