"""One build, for wan-generate and wan-benchmark: a checked Request and its RunPlan in, a ready
pipeline out. It carries the plan out and decides nothing:

    lora check -> parallel start -> load (checkpoint) or build (random weights), the T5 where the
    plan puts it, the experts where `plan.build_offload` puts them -> merge LoRAs -> parallel
    hooks / sharding -> apply the plan (wan_triton.accel.apply)

`build_offload` 'blocks' streams from load (the blocks go to host memory as they are read or
built, never a whole expert on the GPU), 'model' keeps the idle expert on the host (never both
on the GPU). LoRAs merge right after loading, before fp8, kernels, compile and block streaming
see the experts. The process group that `wan.parallel.start` creates is destroyed by the caller's
ExitStack (`cleanup`), so it is torn down however the run ends, after the error is reported.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

from wan import parallel
from wan.lora import apply_loras
from wan.tasks import pipeline_class

from .accel import Optimized, apply
from .flag_words import flag_of
from .fp8_files import fp8_expert_files
from .lora_flags import lora_specs
from .plan import RunPlan

__all__ = ["Built", "build_pipeline", "apply_built"]

log = logging.getLogger("wan_triton")


@dataclass(frozen=True)
class Built:
    """A built pipeline and how it was built. `state`: the wan.parallel state under torchrun (None
    in one process); `applied`: what apply() carried out (None when the caller applies later)."""
    pipe: object
    plan: RunPlan
    device: object
    state: object = None
    loras: tuple = ()
    weights: str = "random"          # 'checkpoint', 'built-in' (the demo model's) or 'random' (Request.weights)
    build_s: float = 0.0             # load or build, seconds
    lora_s: float = 0.0              # LoRA merge, seconds
    applied: Optimized | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that decodes, writes and reports."""
        return self.state is None or self.state.is_main


def build_pipeline(req, cleanup: ExitStack, *, apply_plan: bool = True, progress: bool = True) -> Built:
    """Build the pipeline `req` (a wan_triton.request.Request with its plan) asks for, as its plan
    says. apply_plan: apply the plan now (False: the caller applies it later with `apply_built`,
    e.g. the benchmark after its reference mode)."""
    run = req.plan
    loras = tuple(lora_specs(req))  # keys and shapes checked before any model is built
    state = parallel.start(run.parallel, req.device)  # torchrun: one GPU per process
    cleanup.callback(parallel.destroy, state)
    device = state.device if state is not None else req.device
    t0 = time.perf_counter()
    pipeline = pipeline_class(req.config)  # WanT2V, WanI2V or WanTI2V (wan.tasks)
    if req.ckpt_dir is None:
        pipe = pipeline.from_config(req.config, device=device, t5_cpu=run.t5_cpu, offload=run.build_offload)
    else:  # with host RAM low the low-noise expert is read at the switch only
        files = None
        if req.fp8_dir:  # fp8 expert files, converted once from the checkpoint's experts
            files = fp8_expert_files(req.ckpt_dir, req.fp8_dir, req.config, progress=progress,
                                     dtype=req.config.param_dtype if req.convert_model_dtype else None)
        pipe = pipeline.from_pretrained(req.ckpt_dir, req.config, device=device, t5_cpu=run.t5_cpu,
                                        convert_model_dtype=req.convert_model_dtype, progress=progress,
                                        offload=run.build_offload, host_ram=run.host_ram, expert_files=files)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_loras(pipe, list(loras))  # merged first: kernels, fp8, compile, streaming and FSDP see the merged weights
    lora_s = time.perf_counter() - t0
    if state is not None:
        par = run.parallel
        parallel.apply_to_pipeline(pipe, state, dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)
        log.info("%s", par.summary())
    built = Built(pipe=pipe, plan=run, device=device, state=state, loras=loras,
                  weights=req.weights, build_s=build_s, lora_s=lora_s)
    return apply_built(built) if apply_plan else built


def apply_built(built: Built) -> Built:
    """Apply the plan to the built pipeline (wan_triton.accel.apply, its warnings in flag words)."""
    return dataclasses.replace(built, applied=apply(built.pipe, built.plan, say=flag_of))
