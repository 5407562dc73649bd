"""Generate a video: `python -m wan_triton.generate` / `wan-generate`.

With no --ckpt_dir it runs the built-in tiny demo model (random weights, fixed seed, CPU or
GPU) and writes a short MP4. With --ckpt_dir it loads the official Wan2.2-T2V-A14B layout.
Official flags keep their names and defaults; the acceleration flags come from wan_triton.
Bad input is reported as one line on stderr with exit code 2, and no file is written.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

DEMO_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


class CLIError(Exception):
    """Bad command line or request: reported as one line with exit code 2."""


def parse_bool(v: str) -> bool:
    """argparse type for True/False flags (the official CLI's `--offload_model True`)."""
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line on stderr, exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .accel import PRESETS

    p = OneLineParser(prog="wan-generate", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--task", default=None, help="preset: t2v-A14B (default with --ckpt_dir) or tiny (default without)")
    a("--ckpt_dir", default=None, help="official Wan2.2-T2V-A14B folder; omit for the built-in tiny demo")
    a("--prompt", default=None, help="text prompt")
    a("--n_prompt", default="", help="negative prompt (default: the official one)")
    a("--size", default=None, help="WIDTH*HEIGHT, e.g. 1280*720 (default: the preset's)")
    a("--frame_num", type=int, default=None, help="number of frames, 4n+1 (default: the preset's)")
    a("--sample_steps", type=int, default=None)
    a("--sample_shift", type=float, default=None)
    a("--sample_guide_scale", type=float, default=None, help="one value for both experts")
    a("--sample_solver", default="unipc", help="unipc or dpm++")
    a("--base_seed", type=int, default=-1, help="-1: random (the demo uses its fixed seed)")
    a("--offload_model", type=parse_bool, default=None, help="move the idle expert to CPU (CUDA only)")
    a("--t5_cpu", action="store_true", help="run the text encoder on CPU")
    a("--convert_model_dtype", action="store_true", help="convert DiT weights to bf16 (official flag)")
    a("--save_file", default=None, help="output .mp4 path")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    # acceleration (wan_triton)
    a("--preset", default=None, choices=["auto", *PRESETS],
      help="hardware preset: offloading and T5 placement by GPU memory")
    a("--no-offload", dest="no_offload", action="store_true", help="keep both experts on the GPU")
    add_accel_flags(p, triton_help="keep the reference ops (no kernels)")
    from wan.parallel import add_parallel_flags
    add_parallel_flags(p)
    a("--quiet", action="store_true", help="no progress bars")
    return p


def add_accel_flags(p: argparse.ArgumentParser, triton_help: str) -> None:
    """The opt-in switches shared by wan-generate and wan-benchmark."""
    from wan.attention import BACKENDS

    from .accel import COMPILE_MODES

    a = p.add_argument
    a("--use_batched_cfg", action="store_true", help="cond and uncond in one batch-2 forward")
    a("--tf32", action="store_true", help="allow TF32 in fp32 matmuls/convs (CUDA)")
    a("--compile", dest="compile", action="store_true", default=None, help="torch.compile each DiT block (CUDA)")
    a("--no-compile", dest="compile", action="store_false")
    a("--compile_mode", default="default", choices=COMPILE_MODES)
    a("--attention", default="auto", choices=BACKENDS)
    a("--no-triton", dest="no_triton", action="store_true", help=triton_help)


def _default_name(task, size, prompt):
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    text = prompt[:50].replace(" ", "_").replace("/", "_")
    return f"{task}_{size}_1_{text}_{stamp}.mp4"


def check_common(args, default_task: str):
    """The checks wan-generate and wan-benchmark share, made before anything is built:
    preset name, device, size, frame count, solver, steps, CUDA-only flags.
    Returns (task, config, device, size 'W*H', frame_num, steps); raises CLIError."""
    import torch

    from wan.configs import get_config
    from wan.pipeline import check_request

    try:
        config = get_config(args.task or default_task)
    except KeyError as err:
        raise CLIError(str(err.args[0])) from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    size = args.size or config.default_size
    frame_num = config.frame_num if args.frame_num is None else args.frame_num
    try:
        w, h = check_request(config, size, frame_num, args.sample_solver)
    except ValueError as err:  # InputError, or parse_size's ValueError
        raise CLIError(str(err)) from None
    steps = config.sample_steps if args.sample_steps is None else args.sample_steps
    if steps < 1:
        raise CLIError(f"--sample_steps must be >= 1, got {steps}")
    cuda_only = [f for f, on in (("--offload_model True", args.offload_model), ("--tf32", args.tf32),
                                 ("--compile", args.compile), ("--no-offload", getattr(args, "no_offload", False)))
                 if on]
    if args.preset not in (None, "auto", "none", "cpu"):
        cuda_only.append(f"--preset {args.preset}")
    if device.type != "cuda" and cuda_only:
        raise CLIError(f"{', '.join(cuda_only)} needs a CUDA GPU, and none is in use (device {device})")
    return config.name, config, device, f"{w}*{h}", frame_num, steps


def run(args) -> Path | None:
    from wan import parallel
    from wan.pipeline import WanT2V, check_output_path, check_video_writer, save_video
    from wan_triton import accel

    demo = args.ckpt_dir is None
    task, config, device, size, frame_num, _ = check_common(args, "tiny" if demo else "t2v-A14B")
    par = parallel.check_parallel_args(args, config.dit.num_heads, device, args.offload_model, args.t5_cpu)
    save = Path(args.save_file) if args.save_file else Path(_default_name(task, size, args.prompt or DEMO_PROMPT))
    if save.suffix.lower() != ".mp4":
        raise CLIError(f"--save_file must end in .mp4, got {save}")
    check_output_path(save)  # before any model is built: no long run that ends without its file
    check_video_writer()

    prompt = args.prompt or DEMO_PROMPT
    seed = args.base_seed if args.base_seed >= 0 or not demo else config.seed
    if args.preset is not None:
        preset = accel.get_preset(args.preset, device)
    else:
        preset = accel.flags_preset(device)
    t5_cpu = (args.t5_cpu or preset.t5_cpu) and not par.t5_fsdp
    state = None
    if par.world > 1:  # under torchrun: join the group, one GPU per process
        state = args._parallel_state = parallel.init_from_env(par.ulysses_size, par.cfg_parallel, par.timeout,
                                                               device=device.type)
        device = state.device
    t0 = time.perf_counter()
    if demo:
        logging.info("no --ckpt_dir: running the built-in tiny demo model (random weights, seed %d)", seed)
        pipe = WanT2V.from_preset(config, device=device, t5_cpu=t5_cpu)
    else:
        pipe = WanT2V.from_pretrained(args.ckpt_dir, config, device=device, t5_cpu=t5_cpu,
                                      convert_model_dtype=args.convert_model_dtype, progress=not args.quiet)
    logging.info("loaded %s in %.1fs on %s", task, time.perf_counter() - t0, device)
    if state is not None:
        parallel.apply_to_pipeline(pipe, state, dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)
        logging.info("%d processes: ulysses %d x cfg %d%s%s", state.world, par.ulysses_size,
                     2 if par.cfg_parallel else 1, ", dit_fsdp" if par.dit_fsdp else "",
                     ", t5_fsdp" if par.t5_fsdp else "")
    applied = accel.optimize(pipe, preset, triton=False if args.no_triton else None, compile=args.compile,
                             compile_mode=args.compile_mode, tf32=True if args.tf32 else None,
                             use_batched_cfg=True if args.use_batched_cfg else None, attention=args.attention)
    offload = applied["offload_model"] if args.offload_model is None else args.offload_model
    if args.no_offload or par.dit_fsdp:
        offload = False

    video = pipe.generate(prompt, size=size, frame_num=frame_num, shift=args.sample_shift,
                          sample_solver=args.sample_solver, sampling_steps=args.sample_steps,
                          guide_scale=args.sample_guide_scale, n_prompt=args.n_prompt, seed=seed,
                          offload_model=offload, progress=not args.quiet)
    if state is not None and not state.is_main:
        return None  # rank 0 decodes and writes
    save_video(video, save, fps=config.sample_fps)
    tm = pipe.last_timings
    logging.info("seed %d | %s", pipe.last_seed, tm.summary())
    logging.info("saved %s (%d frames, %s)", save, video.shape[1], size)
    return save


def main(argv=None) -> int:
    import os

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 logs
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from wan.checkpoint import CheckpointError
    from wan.parallel import ParallelError, destroy
    from wan.pipeline import InputError
    from wan_triton.accel import AccelError

    import torch

    try:
        run(args)
    except (CLIError, InputError, CheckpointError, AccelError, ParallelError) as err:
        if rank == 0 or getattr(args, "_parallel_state", None) is not None:
            print(f"wan-generate: error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 2
    except torch.distributed.DistError as err:  # a peer failed or a collective timed out
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"wan-generate: error (rank {rank}): distributed run failed: {first[:300]}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print("wan-generate: error: out of GPU memory; try --preset auto, --offload_model True or --t5_cpu",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wan-generate: interrupted", file=sys.stderr)
        return 130
    finally:
        destroy(getattr(args, "_parallel_state", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
