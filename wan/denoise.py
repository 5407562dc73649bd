"""The denoising loop of `WanT2V.generate`, as one function the run's parts attach to.

    for each step of the schedule:
        expert      pipe._expert: high-noise while t >= boundary * 1000, then low-noise; the
                    idle expert leaves the GPU (offload_model) or its blocks stop streaming
                    (wan.offload.switch_experts)
        velocity    pipe._guided: the CFG-combined velocity (two batch-1 calls, one batch-2
                    call, or one branch per half of the ranks under CFG-parallel, wan.parallel)
        solver      one step of the flow solver (wan.schedulers)
    then the streamed or offloaded experts leave the GPU for the decode.

Where each part hooks in: multi-GPU through `pipe.parallel` (velocity), block streaming and
offloading through the expert switch and the parking after the loop, the step cache
(`pipe.step_cache`, wan.step_cache) through a run that is told each `Step` before and after
its velocity and that runs the experts' blocks; LoRAs are merged into the experts' weights
before the loop (wan.lora) and need nothing here. Without a step cache the loop computes
exactly what the official loop computes, op for op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Conditioned
from .configs import T2VConfig
from .offload import park_all
from .parking import to_host
from .step_cache import start_run

__all__ = ["Step", "Conditioning", "expert_of", "schedule_steps", "denoise"]


def expert_of(config: T2VConfig, t: int) -> str:
    """The expert of timestep `t`: 'high' (noise) while t >= boundary * num_train_timesteps, else 'low'."""
    return "high" if t >= config.boundary * config.num_train_timesteps else "low"


@dataclass(frozen=True)
class Step:
    """One step of the schedule, as the loop and its hooks see it."""
    index: int            # 0-based
    count: int            # steps in the schedule
    t: torch.Tensor       # the timestep (0-dim, as the scheduler holds it)
    expert: str           # 'high' or 'low'
    expert_start: bool    # the first step of its expert (the first step, or the first after the switch)

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def schedule_steps(config: T2VConfig, timesteps) -> tuple[Step, ...]:
    """The steps of a scheduler's timesteps, each with its expert."""
    ts = list(timesteps)
    experts = [expert_of(config, int(t.item())) for t in ts]
    return tuple(Step(i, len(ts), t, e, i == 0 or experts[i - 1] != e) for i, (t, e) in enumerate(zip(ts, experts)))


@dataclass(frozen=True)
class Conditioning:
    """What every step's velocity is conditioned on."""
    context: list                 # the prompt's umT5 states
    context_null: list | None     # the negative prompt's (None when neither expert uses guidance)
    seq_len: int                  # tokens per sample (padded as the official code pads)
    guide_scale: tuple            # (low-noise, high-noise)
    y: torch.Tensor | None = None  # channels after the latent's in every call (I2V: mask + image latent)


def denoise(pipe, latent: torch.Tensor, scheduler, steps: tuple[Step, ...], cond: Conditioning, *, generator,
            offload_model: bool, timings, progress: bool, solver: str, shift: float) -> torch.Tensor:
    """Run `steps` from `latent` (fp32 noise) and return the final latent. `offload_model` is the
    caller's resolved choice (generate(offload_model=None) follows `pipe.offload`: 'model' -> True),
    never re-decided here. `timings` gets one
    entry per step (and the step cache's counts); `solver` and `shift` name the schedule for the
    step cache's magnitude ratios. The caller holds the autocast region."""
    cache = start_run(pipe, steps, solver=solver, shift=shift)  # None without a step cache
    try:
        for step in _progress(steps, progress, desc="denoise"):
            with timings.measure("moves"):  # the expert's placement is no step's work (Timings.offload)
                model, gi = pipe._expert(int(step.t.item()), offload_model)
            with timings.measure("steps"):
                model = model if cond.y is None else Conditioned(model, y=cond.y)
                timings.experts.append(step.expert)
                scale = cond.guide_scale[gi]
                if cache is None:
                    v = pipe._guided(model, latent, step.t, cond.context, cond.context_null, cond.seq_len, scale)
                else:
                    cache.begin(step, latent)
                    v = pipe._guided(model, latent, step.t, cond.context, cond.context_null, cond.seq_len, scale,
                                     cache=cache)
                    cache.end(step, latent, v)
                latent = scheduler.step(v.unsqueeze(0), step.t, latent.unsqueeze(0), return_dict=False,
                                        generator=generator)[0].squeeze(0)
    finally:
        if cache is not None:
            timings.cache = cache.finish()
    with timings.measure("moves"):
        if pipe.offload == "blocks":  # the rings free their memory for the decode
            park_all(pipe.low_noise_model, pipe.high_noise_model)
        if offload_model and pipe.device.type == "cuda":  # the decode gets the memory (wan.parking)
            to_host(pipe.low_noise_model)
            to_host(pipe.high_noise_model)
    return latent


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
