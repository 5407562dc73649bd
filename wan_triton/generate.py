"""Generate a video: `python -m wan_triton.generate` / `wan-generate`.

With no --ckpt_dir it runs the built-in tiny demo model (random weights, fixed seed, CPU or
GPU) and writes a short MP4; another task without --ckpt_dir needs --random-weights. With
--ckpt_dir it loads the official Wan2.2-T2V-A14B layout.
Official flags keep their names and defaults; the acceleration flags come from wan_triton.
Bad input is reported as one line on stderr with exit code 2, before any model is built, and
no file is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from .cli import (DEMO_PROMPT, CLIError, Request, add_accel_flags, add_model_flags,  # noqa: F401
                  add_offload_flags, add_parallel_flags, add_preset_flags, add_request_flags, default_output_name,
                  implied_task, parse_request, run_main, setup_logging)
from .parser import OneLineParser, parse_bool

PROG = "wan-generate"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1])
    add_model_flags(p, task_help="model: t2v-A14B (default with --ckpt_dir) or tiny (default without)",
                    ckpt_help="official Wan2.2-T2V-A14B folder (default: none, the built-in tiny demo)")
    add_request_flags(p, seed_default=-1, seed_help="default: -1, a random seed (the demo uses its fixed seed, 42)")
    a = p.add_argument
    a("--save_file", default=None, help="output .mp4 path (default: <task>_<W>x<H>_1_<prompt>_<time>.mp4 in the "
                                        "current folder)")
    # acceleration (wan_triton)
    add_preset_flags(p, default="none")
    a("--offload_model", type=parse_bool, default=None,
      help="True/False: move the idle expert to CPU memory (CUDA only; default: the preset's, on with CUDA "
           "without a preset)")
    a("--no-offload", dest="no_offload", action="store_true", help="keep both experts on the GPU")
    add_offload_flags(p)
    add_accel_flags(p, triton_help="keep the reference ops (no kernels)")
    add_parallel_flags(p)
    a("--quiet", action="store_true", help="no progress bars")
    from .lora_flags import add_lora_flags
    add_lora_flags(p)
    return p


def output_path(req: Request, save_file: str | None) -> Path:
    from wan.requests import InputError
    from wan.video import check_video_suffix

    ulysses = getattr(req.extra.get("parallel"), "ulysses_size", 1)  # the official name carries it
    save = Path(save_file) if save_file else Path(default_output_name(req.task, req.size, req.prompt, ulysses=ulysses))
    try:
        return check_video_suffix(save)
    except InputError:
        raise CLIError(f"--save_file must end in .mp4, got {save}") from None


def resolve_seed(req: Request, demo: bool) -> int:
    """The noise seed the run will use, never -1: the given one; the demo's fixed seed; else one
    drawn now (so the start-up log can name it)."""
    import random

    from wan.requests import SEED_MAX

    if req.seed >= 0:
        return req.seed
    if demo:
        return req.config.seed
    return random.randint(0, SEED_MAX)


def run(args) -> Path | None:
    from wan import parallel
    from wan.lora import apply_loras
    from wan.pipeline import WanT2V
    from wan.video import check_output_path, check_video_writer, save_video
    from wan_triton import accel

    from .lora_flags import lora_specs

    req = parse_request(args, implied_task(args))
    demo = args.ckpt_dir is None and not args.random_weights  # the tiny demo (check_weights refused the rest)
    save = output_path(req, args.save_file)
    check_output_path(save)  # before any model is built: no long run that ends without its file
    check_video_writer()
    loras = lora_specs(req)  # keys and shapes checked before any model is built

    seed = resolve_seed(req, demo)
    preset = accel.get_preset(req.preset, req.device)
    par = req.extra["parallel"]
    t5_cpu = (req.t5_cpu or preset.t5_cpu) and not par.t5_fsdp
    state = args._parallel_state = parallel.start(par, req.device)  # torchrun: one GPU per process
    if state is not None:
        req = dataclasses.replace(req, device=state.device)
    t0 = time.perf_counter()
    prompt_note = "" if req.prompt_given else "; the demo prompt"
    if demo:
        logging.info("no --ckpt_dir: building the built-in tiny demo model (%s, random weights) on %s", req.task,
                     req.device)
    elif req.ckpt_dir is None:
        logging.info("--random-weights: building %s at its real shapes with random weights on %s", req.task,
                     req.device)
    else:
        logging.info("loading %s from %s on %s", req.task, req.ckpt_dir, req.device)
    logging.info("generating %s%s", req.summary(seed), prompt_note)
    if req.ckpt_dir is None:
        pipe = WanT2V.from_preset(req.config, device=req.device, t5_cpu=t5_cpu)
    else:
        # block streaming (asked, or the preset's) starts at load: with host RAM low the low-noise expert is
        # read at the switch only. LoRAs merge first and --fp8 quantizes first, so with either optimize() turns
        # streaming on after them.
        stream = (req.device.type == "cuda" and not par.dit_fsdp and not loras and not req.accel.fp8
                  and (req.extra["offload"] or accel.preset_offload(preset)) == "blocks")
        pipe = WanT2V.from_pretrained(req.ckpt_dir, req.config, device=req.device, t5_cpu=t5_cpu,
                                      convert_model_dtype=req.convert_model_dtype, progress=not req.quiet,
                                      offload="blocks" if stream else None,
                                      host_ram=req.extra.get("host_ram") or "auto")
    logging.info("%s %s in %.1fs on %s", "built" if req.ckpt_dir is None else "loaded", req.task,
                 time.perf_counter() - t0, req.device)
    apply_loras(pipe, loras)  # merged before optimize: kernels, compile and block streaming see the merged weights
    if state is not None:
        parallel.apply_to_pipeline(pipe, state, dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)
        logging.info("%s", par.summary())
    # the offload flags, checked and made one mode by parse_request, win over the preset's
    offload_mode = "none" if par.dit_fsdp else req.extra["offload"]  # sharded experts stay on the GPUs
    applied = accel.optimize(pipe, preset, offload=offload_mode, **req.optimize_kwargs())
    offload = applied.offload_model  # False when the blocks stream (optimize() turned that on)

    video = pipe.generate(req.prompt, **dict(req.generate_kwargs(), seed=seed), offload_model=offload,
                          progress=not req.quiet)
    if state is not None and not state.is_main:
        return None  # rank 0 decodes and writes
    save_video(video, save, fps=req.config.sample_fps)
    logging.info("seed %d | %s", pipe.last_seed, pipe.last_timings.summary())
    logging.info("saved %s (%d frames, %s)", save, video.shape[1], req.size)
    return save


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return run_main(PROG, lambda: run(args))
    finally:
        from wan.parallel import destroy

        destroy(getattr(args, "_parallel_state", None))


if __name__ == "__main__":
    sys.exit(main())
