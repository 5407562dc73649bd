"""Measure a model's magnitude ratios for `--cache mag`: `python -m wan_triton.calibrate`.

    python -m wan_triton.calibrate --ckpt_dir ./Wan2.2-T2V-A14B --size 832*480 --sample_steps 40

One exact generation (nothing reused) with the flags' schedule records, for each step and CFG
branch, the ratio of the mean norm of the residual the DiT blocks add to that of the step before
(wan.step_cache.calibrate), and writes them as JSON beside the checkpoint,
<ckpt_dir>/mag_ratios/<solver>_<steps>steps_shift<shift>.json, where `--cache mag` finds them
(or to --out). The ratios depend on the model and the schedule (solver, steps, shift), which the
file names and `--cache mag` checks; the size, frames, prompt and seed are recorded (a smaller
size measures faster: the ratios change little with it, docs/caching.md). Bad input: one line,
exit code 2, no file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from wan.mag_ratios import ratios_dir, ratios_file_name
from wan.step_cache import calibrate
from wan.video import check_output_path

from .build import build_pipeline
from .exits import CLIError, run_main, setup_logging
from .flags import add_model_flags, add_offload_flags, add_preset_flags, add_request_flags
from .parser import OneLineParser, parse_bool
from .request import implied_task, parse_request

PROG = "python -m wan_triton.calibrate"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_model_flags(p, task_help="model: t2v-A14B (default with --ckpt_dir) or demo (default without: the built-in "
                                 "demo model)",
                    ckpt_help="the checkpoint folder; the ratios are written beside it (default: none, the built-in "
                              "demo model)")
    add_request_flags(p, seed_default=0, seed_help="the noise seed of the measured generation")
    add_preset_flags(p, default="auto")
    p.add_argument("--offload_model", type=parse_bool, default=None,
                   help="True/False: move the idle expert to CPU memory (CUDA only; default: the preset's)")
    add_offload_flags(p)
    p.add_argument("--out", default=None,
                   help="the JSON file to write (default: <ckpt_dir>/mag_ratios/<solver>_<steps>steps_shift<shift>"
                        ".json; needed without --ckpt_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def output_file(req, out: str | None) -> Path:
    """--out, else the file beside the checkpoint that `--cache mag` reads for this schedule."""
    if out is not None:
        return Path(out)
    if req.ckpt_dir is None:
        raise CLIError("random weights have no checkpoint folder to write the ratios beside: give --out FILE")
    shift = req.config.sample_shift if req.shift is None else req.shift
    return ratios_dir(req.ckpt_dir) / ratios_file_name(req.solver, req.steps, shift)


def run(args, cleanup: ExitStack) -> Path:
    req = parse_request(args, implied_task(args))
    out = output_file(req, args.out)
    if out.suffix != ".json":
        raise CLIError(f"--out must end in .json, got {out}")
    check_output_path(out)  # before any model is built
    built = build_pipeline(req, cleanup, progress=not req.quiet)  # as the plan says, then applied
    shift = req.config.sample_shift if req.shift is None else req.shift
    logging.info("measuring the magnitude ratios of %s: %s", req.task, req.summary())
    ratios = calibrate(built.pipe, [req.prompt], steps=req.steps, shift=shift, solver=req.solver,
                       size=req.width_height, frame_num=req.frame_num, guide_scale=req.guide_scale,
                       seeds=(req.seed,), progress=not req.quiet)  # the offload mode: the applied plan's
    ratios.save(out)
    logging.info("wrote %s (%d steps x %d branches; model %s)", out, ratios.steps, len(ratios.ratios),
                 ratios.fingerprint[:19])
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    with ExitStack() as cleanup:
        return run_main(PROG, lambda: run(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
