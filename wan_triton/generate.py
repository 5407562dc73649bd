"""Generate a video: `python -m wan_triton.generate` / `wan-generate`.

With no --ckpt_dir it runs the built-in demo model (a toy trained here on coloured shapes, not
Wan's weights: docs/demo_model.md; fixed seed, CPU or GPU) and writes a short MP4; `--task tiny`
builds the smoke-test task with random weights; another task without --ckpt_dir needs
--random-weights. With --ckpt_dir it loads the official layout of the task (t2v-A14B, ti2v-5B,
i2v-A14B: docs/models.md); --image gives the first frame (required by i2v-A14B, ti2v-5B's image mode).
Official flags keep their names and defaults; the acceleration flags come from wan_triton.
Bad input is reported as one line on stderr with exit code 2, before any model is built, and
no file is written.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from contextlib import ExitStack
from pathlib import Path

from wan.requests import SEED_MAX, InputError
from wan.video import check_output_path, check_video_suffix, check_video_writer, save_video

from .build import build_pipeline
from .exits import CLIError, run_main, setup_logging
from .flags import (add_accel_flags, add_cache_flags, add_image_flags, add_model_flags, add_no_offload_flag,
                    add_offload_flags, add_parallel_flags, add_preset_flags, add_request_flags)
from .lora_flags import add_lora_flags
from .parser import OneLineParser, parse_bool
from .request import Request, default_output_name, implied_task, parse_request

PROG = "wan-generate"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1])
    add_model_flags(p, task_help="model: t2v-A14B (default with --ckpt_dir) or demo (default without: the built-in "
                                 "toy model trained on coloured shapes); tiny (random weights, a smoke test); ti2v-5B, "
                                 "i2v-A14B (docs/models.md) and their toy-width tasks ti2v-tiny, i2v-tiny",
                    ckpt_help="official folder of the task, e.g. Wan2.2-T2V-A14B (default: none, the built-in demo "
                              "model)")
    add_request_flags(p, seed_default=-1, seed_help="default: -1, a random seed (the demo uses its fixed seed, 42)")
    add_image_flags(p)
    a = p.add_argument
    a("--save_file", default=None, help="output .mp4 path (default: <task>_<W>x<H>_1_<prompt>_<time>.mp4 in the "
                                        "current folder)")
    # acceleration (wan_triton)
    add_preset_flags(p, default="none")
    a("--offload_model", type=parse_bool, default=None,
      help="True/False: move the idle expert to CPU memory (CUDA only; default: the preset's, on with CUDA "
           "without a preset)")
    add_no_offload_flag(p)
    add_offload_flags(p)
    add_accel_flags(p, triton_help="keep the reference ops (no kernels)")
    add_parallel_flags(p)
    a("--quiet", action="store_true", help="no progress bars")
    add_lora_flags(p)
    add_cache_flags(p)
    return p


def output_path(req: Request, save_file: str | None) -> Path:
    ulysses = req.plan.parallel.ulysses_size  # the official name carries it
    save = Path(save_file) if save_file else Path(default_output_name(req.task, req.size, req.prompt, ulysses=ulysses))
    try:
        return check_video_suffix(save)
    except InputError:
        raise CLIError(f"--save_file must end in .mp4, got {save}") from None


def resolve_seed(req: Request, demo: bool) -> int:
    """The noise seed the run will use, never -1: the given one; the demo's fixed seed; else one
    drawn now (so the start-up log can name it)."""

    if req.seed >= 0:
        return req.seed
    if demo:
        return req.config.seed
    return random.randint(0, SEED_MAX)


def run(args, cleanup: ExitStack) -> Path | None:
    """Check, build (wan_triton.build), generate, write. `cleanup` tears down what the build
    started (the process group under torchrun) when main() is done."""
    req = parse_request(args, implied_task(args))
    demo = args.ckpt_dir is None and not args.random_weights  # demo or tiny (check_weights refused the rest)
    save = output_path(req, args.save_file)
    check_output_path(save)  # before any model is built: no long run that ends without its file
    check_video_writer()

    seed = resolve_seed(req, demo)
    prompt_note = "" if req.prompt_given else "; the task's default prompt"
    if req.weights == "built-in":
        logging.info("no --ckpt_dir: loading the built-in demo model (a toy trained on coloured shapes, not Wan's "
                     "weights: docs/demo_model.md) on %s", req.device)
    elif demo:
        logging.info("no --ckpt_dir: building the smoke-test task %s with random weights (its video is noise) on %s",
                     req.task, req.device)
    elif req.ckpt_dir is None:
        logging.info("--random-weights: building %s at its real shapes with random weights on %s", req.task,
                     req.device)
    else:
        logging.info("loading %s from %s on %s", req.task, req.ckpt_dir, req.device)
    logging.info("generating %s%s", req.summary(seed), prompt_note)
    built = build_pipeline(req, cleanup, progress=not req.quiet)  # as the plan says, then applied
    pipe = built.pipe
    logging.info("%s %s in %.1fs on %s", "built" if req.ckpt_dir is None else "loaded", req.task, built.build_s,
                 built.device)
    video = pipe.generate(req.prompt, **dict(req.generate_kwargs(), seed=seed), progress=not req.quiet)
    if not built.is_main:
        return None  # rank 0 decodes and writes
    save_video(video, save, fps=req.config.sample_fps)
    logging.info("seed %d | %s", pipe.last_seed, pipe.last_timings.summary())
    logging.info("saved %s (%d frames, %dx%d)", save, video.shape[1], video.shape[3], video.shape[2])
    return save


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    with ExitStack() as cleanup:  # the parallel state the build starts is destroyed after the error is said
        return run_main(PROG, lambda: run(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
