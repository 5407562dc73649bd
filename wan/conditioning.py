"""What the image-conditioned pipelines add to each DiT call, and the start of a generation they
share with the T2V pipeline's rules (guidance and prompt warnings, the negative prompt, the seed).

`Conditioned(model, timesteps=..., y=...)` is called exactly as a WanModel is (by the CFG logic of
`WanT2V._guided`: two batch-1 calls, one batch-2 call, or one branch per CFG-parallel half), and
adds the generation's conditioning to every call: per-token timesteps in place of the step's one
(TI2V image mode: the given first frame at t = 0), conditioning channels `y` after the latent's
(I2V: 4 mask channels + the image's 16 latent channels).
"""
from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass

import torch

from .tokens import TokenTimesteps

__all__ = ["Conditioned", "begin_generation", "encode_prompts"]

log = logging.getLogger("wan.pipeline")


@dataclass(frozen=True)
class Conditioned:
    """A DiT call with this generation's conditioning (see the module docstring)."""
    model: torch.nn.Module
    timesteps: TokenTimesteps | None = None   # replaces the step's t (its values include that t)
    y: torch.Tensor | None = None             # [C_y, F, H, W], concatenated after each sample's channels

    def __call__(self, x, t, context, seq_len=None):
        t = t if self.timesteps is None else self.timesteps
        y = None
        if self.y is not None:
            y = [self.y] * len(x) if isinstance(x, list) else self.y[None].expand(x.shape[0], *self.y.shape)
        return self.model(x, t, context, seq_len=seq_len, y=y)


def begin_generation(pipe, prompt: str, n_prompt: str, seed, scales, progress: bool) -> tuple[str, int, bool]:
    """(negative prompt, seed, progress) of a generation, as WanT2V.generate decides them: warnings for
    a negative guidance scale and for prompts longer than the text encoder keeps; the config's
    negative prompt when none is given; a drawn seed when seed < 0; under torchrun rank 0's seed
    and progress on rank 0 only."""
    if any(g < 0 for g in scales):
        log.warning("guidance scale %s is negative: each step is pushed away from the prompt, towards the "
                    "negative prompt", "/".join(f"{g:g}" for g in scales))
    pipe._warn_if_cut("prompt", prompt)
    if n_prompt:
        pipe._warn_if_cut("negative prompt", n_prompt)
    n_prompt = n_prompt or pipe.config.sample_neg_prompt
    if seed is None or seed < 0:
        seed = random.randint(0, sys.maxsize)
    par = pipe.parallel
    if par is not None:
        seed = par.broadcast_seed(seed)
        progress = progress and par.is_main
    return n_prompt, seed, progress


def encode_prompts(pipe, prompt: str, n_prompt: str, scales) -> tuple[list, list | None]:
    """(context, context_null): two batch-1 calls as officially; no negative prompt when every
    guidance scale is exactly 1 (uncond + 1 * (cond - uncond) is cond). Then the text encoder is
    freed under `pipe.t5_release`, as in WanT2V.generate."""
    context = pipe.encode_text([prompt])
    context_null = None if all(g == 1.0 for g in scales) else pipe.encode_text([n_prompt])
    if pipe.t5_release:  # the text encoder's weights are read again by its next call
        pipe.release_text_encoder()
    return context, context_null
