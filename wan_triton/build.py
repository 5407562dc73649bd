"""One build, for wan-generate and wan-benchmark: a checked Request and its RunPlan in, a ready
pipeline out.

    lora check -> parallel start -> T5 placement -> load (streamed from load) or build random
    -> merge LoRAs -> parallel hooks / sharding -> optimize (the plan, applied)

LoRAs merge right after loading, before fp8, kernels, compile and block streaming see the
experts (the plan streams from load only without LoRAs and fp8). The process group that
`wan.parallel.start` creates is destroyed by the caller's ExitStack (`cleanup`), so it is torn
down however the run ends, after the error is reported.
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

from .accel import Optimized, optimize_options
from .lora_flags import lora_specs
from .plan import RunPlan

__all__ = ["Built", "build_pipeline", "optimize_built"]

log = logging.getLogger("wan_triton")


@dataclass(frozen=True)
class Built:
    """A built pipeline and how it was built. `state`: the wan.parallel state under torchrun (None
    in one process); `applied`: what optimize() applied (None when the caller optimizes later)."""
    pipe: object
    plan: RunPlan
    device: object
    state: object = None
    loras: tuple = ()
    weights: str = "random"          # 'checkpoint' or 'random'
    t5_cpu: bool = False
    build_s: float = 0.0             # load or build, seconds
    lora_s: float = 0.0              # LoRA merge, seconds
    applied: Optimized | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that decodes, writes and reports."""
        return self.state is None or self.state.is_main


def build_pipeline(req, cleanup: ExitStack, *, stream: bool, t5_cpu: bool | None = None, optimize: bool = True,
                   progress: bool = True) -> Built:
    """Build the pipeline `req` (a wan_triton.cli.Request with its plan) asks for.

    stream: start block streaming while loading (checkpoint) or building (random weights) -- the
    caller's choice among the plan's `stream_from_load` runs (a benchmark that also runs the
    unstreamed reference cannot). t5_cpu: the text encoder's placement (default: the plan's).
    optimize: apply the plan now (False: the caller applies it later with `optimize_built`)."""
    run = req.plan
    loras = tuple(lora_specs(req))  # keys and shapes checked before any model is built
    state = parallel.start(run.parallel, req.device)  # torchrun: one GPU per process
    cleanup.callback(parallel.destroy, state)
    device = state.device if state is not None else req.device
    t5_cpu = run.t5_cpu if t5_cpu is None else t5_cpu
    t0 = time.perf_counter()
    pipeline = pipeline_class(req.config)  # WanT2V, WanI2V or WanTI2V (wan.tasks)
    if req.ckpt_dir is None:
        pipe = pipeline.from_preset(req.config, device=device, t5_cpu=t5_cpu, offload="blocks" if stream else None)
    else:  # with host RAM low the low-noise expert is read at the switch only
        pipe = pipeline.from_pretrained(req.ckpt_dir, req.config, device=device, t5_cpu=t5_cpu,
                                      convert_model_dtype=req.convert_model_dtype, progress=progress,
                                      offload="blocks" if stream else None, host_ram=run.host_ram)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_loras(pipe, list(loras))  # merged first: kernels, fp8, compile, streaming and FSDP see the merged weights
    lora_s = time.perf_counter() - t0
    if state is not None:
        par = run.parallel
        parallel.apply_to_pipeline(pipe, state, dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)
        log.info("%s", par.summary())
    built = Built(pipe=pipe, plan=run, device=device, state=state, loras=loras,
                  weights="random" if req.ckpt_dir is None else "checkpoint", t5_cpu=t5_cpu, build_s=build_s,
                  lora_s=lora_s)
    return optimize_built(built) if optimize else built


def optimize_built(built: Built) -> Built:
    """Apply the plan to the built pipeline (wan_triton.accel.optimize_options: re-planned with
    the pipeline's state, e.g. whether its weights fit the GPU resident)."""
    run = built.plan
    applied = optimize_options(built.pipe, run.preset, run.options)
    return dataclasses.replace(built, applied=applied)
