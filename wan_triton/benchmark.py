"""End-to-end Wan 2.2 T2V benchmark: reference vs optimized, same pipeline, same seed.

    python -m wan_triton.benchmark                                  # the built-in demo model, CPU-friendly
    python -m wan_triton.benchmark --task tiny                      # random toy weights, the fastest
    python -m wan_triton.benchmark --random-weights --size 1280*720 --sample_steps 4 --no-decode
    wan-benchmark --ckpt_dir ./Wan2.2-T2V-A14B --preset h200 --num_runs 3

Method
------
The pipeline is built once. The reference mode runs first, in the state `wan_triton.unpatch()`
leaves: reference ops, no torch.compile, TF32 off, CFG as two batch-1 calls. Then
`wan_triton.accel.optimize()` is applied once and the optimized mode runs (compile cannot be
undone, hence this order). Each mode makes `--warmup` untimed generations and `--num_runs`
timed ones, all with the same seed, and reports the median of each stage over the timed runs.

Every generation calls `generate(..., return_latents=True)` and then decodes the latents here
with `pipe.vae.decode` (exactly what `generate` does), timing the decode device-synchronised
and adding it to the run's total. That way each timed run both counts the decode and yields
the final latents, so parity needs no extra generation: the last timed run of each mode gives
the latents (relative error) and the decoded frames (PSNR over all uint8 frames).

Every choice is the run's one plan (wan_triton.plan, made before the build with the modes that
run): unless `--offload_model`, `--no-offload` or `--offload none|model` is given (then it
applies to both modes), the reference uses the official single-GPU default (offload on CUDA) and
the optimized mode the preset's choice. `--offload blocks` (or a preset that streams) makes only
the optimized mode stream the DiT blocks from CPU memory; the reference keeps the official
default. The text encoder placement (`--t5_cpu` or, when the optimized mode runs, the preset's)
is shared by both modes. The build keeps the idle expert on the host whenever the first mode offloads.

Outputs, written only at the very end (temporary names, then renamed): `<out_dir>/<name>.json`,
`<name>.md` and `<name>.png` (the chart is skipped, with one warning, when matplotlib is not
installed). Bad input: one line on stderr, exit code 2, no file.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import wan_triton
from wan import attention as att
from wan.requests import InputError
from wan.video import check_output_path, video_to_uint8
from wan_triton import restore_tf32, unpatch
from wan_triton.accel import official_tf32
from wan_triton.build import apply_built, build_pipeline
from wan_triton.exits import CLIError, CLIOutputError, run_main, setup_logging
from wan_triton.flags import (add_accel_flags, add_cache_flags, add_image_flags, add_model_flags, add_no_offload_flag,
                              add_offload_flags, add_parallel_flags, add_preset_flags, add_request_flags)
from wan_triton.lora_flags import add_lora_flags
from wan_triton.metrics import band, psnr_uint8, rel_err
from wan_triton.parser import OneLineParser, parse_bool
from wan_triton.report import MIN_RUNS, markdown, plot
from wan_triton.request import implied_task, parse_request

PROG = "wan-benchmark"
MODES = ("reference", "optimized")
DEFAULT_OUT_DIR = "bench/out"
log = logging.getLogger("wan.benchmark")


# ------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--mode", default="both", choices=["reference", "optimized", "both"],
      help="which modes to run: the reference (official state), the optimized one, or both and compare")
    a("--num_runs", type=int, default=3, help="timed generations per mode (median reported)")
    a("--warmup", type=int, default=1, help="untimed generations per mode before timing")
    # what to generate
    add_model_flags(p, task_help="model: t2v-A14B (default with --ckpt_dir / --random-weights) or demo (default "
                                 "without: the built-in toy model); tiny (random weights)",
                    ckpt_help="official Wan2.2-T2V-A14B folder (default: none: the built-in demo model)")
    add_request_flags(p, seed_default=42, seed_help="one seed for every run of both modes")
    # optimization (wan_triton), as in wan-generate
    add_preset_flags(p, default="auto")
    add_accel_flags(p, triton_help="optimized mode keeps the reference ops")
    a("--offload_model", type=parse_bool, default=None,
      help="True/False: move the idle expert to CPU, in both modes (CUDA only; default: official for "
           "reference, preset for optimized)")
    add_no_offload_flag(p, ", in both modes")
    add_offload_flags(p)
    add_parallel_flags(p)  # both modes run on all ranks (torchrun); rank 0 reports
    # output
    a("--no-decode", dest="no_decode", action="store_true", help="skip the VAE decode (per-step timing at full size)")
    a("--out_dir", default=DEFAULT_OUT_DIR,
      help=f"folder for <name>.json/.md/.png (default: {DEFAULT_OUT_DIR}, relative to the current directory)")
    a("--name", default=None, help="file stem (default: benchmark_<task>_<W>x<H>_<timestamp>)")
    a("--quiet", action="store_true", help="no progress bars")
    a("--save_frames", action="store_true",
      help="also write <out_dir>/<name>.frames.pt: each mode's final latents and uint8 frames, to compare "
           "runs made in different processes or on different GPUs (python -m bench.compare_frames A B)")
    add_lora_flags(p)
    add_cache_flags(p)
    add_image_flags(p)
    return p


# ------------------------------------------------------------------ results

@dataclass
class ModeResult:
    """Everything measured for one mode. Times in seconds; `runs` holds one Timings dict per
    timed run (decode measured by the benchmark, see the module docstring)."""
    mode: str
    settings: dict
    runs: list = field(default_factory=list)
    warmup_totals: list = field(default_factory=list)
    text_encode: float = 0.0      # median over runs
    step_mean: float = 0.0        # median over runs of the mean step time
    denoise: float = 0.0          # median over runs of the summed step times
    offload: float = 0.0          # median over runs of the expert placements' seconds (Timings.offload)
    decode: float = 0.0
    total: float = 0.0            # the median run's total (the lower median: a real run, the one the chart shows)
    peak_mem_gb: float | None = None  # max over runs (CUDA; None elsewhere)
    median_run: int = 0           # index of the median run (by total)
    steps: list = field(default_factory=list)    # per-step times of that run
    experts: list = field(default_factory=list)  # "high"/"low" per step
    extrapolated_s: float = 0.0
    extrapolated: bool = False
    full_steps: int = 0
    repeat_max_rel_err: float = 0.0  # timed runs vs the first timed run (0.0: deterministic)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(res: ModeResult, full_steps: int, decoded: bool) -> ModeResult:
    """Fill the medians, the median run's step list and the extrapolated full-length time."""
    runs = res.runs
    res.text_encode = statistics.median(r["text_encode"] for r in runs)
    res.step_mean = statistics.median(statistics.fmean(r["steps"]) for r in runs)
    res.denoise = statistics.median(sum(r["steps"]) for r in runs)
    res.offload = statistics.median(sum(r["moves"]) for r in runs)
    res.decode = statistics.median(r["decode"] for r in runs) if decoded else 0.0
    totals = [r["total"] for r in runs]
    res.total = statistics.median_low(totals)  # a real run's total: the table and the chart show the same run
    res.median_run = totals.index(res.total)
    peaks = [r["peak_mem_gb"] for r in runs if r.get("peak_mem_gb") is not None]
    res.peak_mem_gb = max(peaks) if peaks else None
    res.steps = list(runs[res.median_run]["steps"])
    res.experts = list(runs[res.median_run]["experts"])
    res.full_steps = full_steps
    res.extrapolated = len(res.steps) < full_steps
    res.extrapolated_s = res.text_encode + res.step_mean * full_steps + res.offload + res.decode
    return res


# ------------------------------------------------------------------ running

def _one_run(pipe, req: dict, decode: bool):
    """One generation: latents from generate(), decoded here (timed, synchronised).
    Returns (Timings, latents on CPU, decoded video or None)."""

    latents = pipe.generate(**req, return_latents=True)
    tm = pipe.last_timings
    video = None
    if decode:
        dev = pipe.device
        with torch.no_grad(), tm.measure("decode"):
            video = pipe.vae.decode(latents.unsqueeze(0))[0]
        tm.total += tm.decode
        if dev.type == "cuda":  # generate reset the peak at its start; include the decode
            tm.peak_mem_gb = max(tm.peak_mem_gb or 0.0, torch.cuda.max_memory_allocated(dev) / 1e9)
    return tm, latents.float().cpu(), video


def run_mode(pipe, mode: str, settings: dict, req: dict, num_runs: int, warmup: int, decode: bool):
    """Warm up, then time `num_runs` generations. Returns (ModeResult, latents, uint8 frames)."""

    res = ModeResult(mode=mode, settings=settings)
    if warmup == 0:  # no warm-up generation: at least the first calls (kernel JIT, cuDNN plans) stay untimed
        sec = pipe.warm_up(req["size"], req["frame_num"], decode)
        log.info("[%s] first calls (kernel compilation, cuDNN plans) made outside the timed runs: %.1f s", mode, sec)
    for i in range(warmup):
        tm, _, _ = _one_run(pipe, req, decode)
        res.warmup_totals.append(tm.total)
        log.info("[%s] warmup %d/%d: total %.2f s", mode, i + 1, warmup, tm.total)
    first = latents = video = None
    for i in range(num_runs):
        tm, latents, video = _one_run(pipe, req, decode)
        res.runs.append(asdict(tm))
        if first is None:
            first = latents
        else:
            res.repeat_max_rel_err = max(res.repeat_max_rel_err, rel_err(latents, first))
        log.info("[%s] run %d/%d: total %.2f s (text %.2f, %d steps %.3f s/step, offload %.2f, decode %.2f)", mode,
                 i + 1, num_runs, tm.total, tm.text_encode, len(tm.steps), statistics.fmean(tm.steps), tm.offload,
                 tm.decode)
    frames = video_to_uint8(video) if video is not None else None
    return res, latents, frames


def to_reference(pipe, offload: str) -> dict:
    """The official state: reference ops, two-call CFG, the reference mode's offload (the plan's
    `reference_offload`), PyTorch's default TF32 settings (fp32 matmuls exact, cuDNN convolutions
    with TF32, as the official code runs). Returns the previous TF32 settings."""

    wan_triton.unpatch()
    for m in pipe.dit_models():
        wan_triton.unpatch(m)
    pipe.use_batched_cfg = False
    if pipe.offload != "blocks":  # a pipeline streamed from load runs the optimized mode only
        pipe.offload = offload

    return official_tf32()


def _attention_in_use(device) -> str:
    return f"{att.get_backend()} -> {att.resolve_backend(device)}"


# ------------------------------------------------------------------ environment

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device, argv) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain") if commit else None  # no commit: a copy without history
    return dict(torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                python=platform.python_version(), platform=platform.platform(), device=str(device),
                device_name=dev_name, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
                date=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                git_commit=commit, git_dirty=bool(status) if status is not None else None,
                command=" ".join([PROG] + [shlex.quote(a) for a in argv]))


# ------------------------------------------------------------------ comparison and outputs

def _psnr_json(p):
    if p is None:
        return None
    return "inf" if math.isinf(p) else p


# settings that change what is computed or where it runs; with none of them different and nothing
# patched or compiled, the two modes run the same computation and a "speed-up" is run-to-run noise
_SAME_FLAGS = ("use_batched_cfg", "offload", "t5_cpu", "attention", "vae_dtype", "cache")


def same_computation(ref: dict, opt: dict) -> bool:
    """True when the optimized settings change nothing: no kernel patched, no compile, no TF32,
    and the same CFG batching, offloading, T5 placement and attention backend as the reference."""
    nothing_patched = not opt.get("triton") or not opt.get("patched")
    return (nothing_patched and not opt.get("compile") and not opt.get("tf32")
            and all(ref.get(k) == opt.get(k) for k in _SAME_FLAGS))


_QUANTITY = {"total": "run totals", "step": "per-run mean step times"}


def _per_run(mode: dict, quantity: str) -> list:
    return [r["total"] if quantity == "total" else statistics.fmean(r["steps"]) for r in mode["runs"]]


def run_spread(mode: dict, quantity: str = "total") -> dict:
    """The run-to-run band of one quantity of one mode (a ModeResult dict): min-max over the timed
    runs of their totals ("total") or of their mean step times ("step"). A ratio of that quantity is
    compared with this band of the same quantity, never another's. `rel` = band width / median,
    `n` = the number of runs behind it."""
    vals = _per_run(mode, quantity)
    lo, hi = band(vals)
    mid = statistics.median(vals)
    return dict(basis=f"min-max of {len(vals)} {_QUANTITY[quantity]}", lo=lo, hi=hi,
                rel=(hi - lo) / mid if mid > 0 else 0.0, n=len(vals))


def _apart(ref: dict, opt: dict) -> bool:
    return ref["lo"] > opt["hi"] or opt["lo"] > ref["hi"]


def timing_verdict(ref: dict, opt: dict) -> dict:
    """Whether the two modes' times differ measurably. verdict (of the totals; step_verdict, of the
    mean step times): 'same' (same computation: no speed-up to report), 'too_few' (fewer than
    MIN_RUNS timed runs in a mode: no ratio claimed), 'noise' (the run-to-run bands overlap: no
    measurable difference), 'measured' (disjoint bands: the ratio means something)."""
    spread = {q: dict(reference=run_spread(ref, q), optimized=run_spread(opt, q)) for q in _QUANTITY}
    runs = min(len(ref["runs"]), len(opt["runs"]))
    verdicts = {}
    for q, sp in spread.items():
        if same_computation(ref["settings"], opt["settings"]):
            verdicts[q] = "same"
        elif runs < MIN_RUNS:
            verdicts[q] = "too_few"
        else:
            verdicts[q] = "measured" if _apart(sp["reference"], sp["optimized"]) else "noise"
    return dict(verdict=verdicts["total"], step_verdict=verdicts["step"], same_computation=verdicts["total"] == "same",
                runs_per_mode=runs, min_runs=MIN_RUNS, spread=spread["total"], step_spread=spread["step"])


def output_paths(out_dir: Path, name: str) -> dict:
    return {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}


def check_out_dir(out_dir: Path, name: str) -> None:
    """Before any model is built: the files <out_dir>/<name>.json/.md/.png can be created."""

    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out_dir is not a directory: {out_dir}")
    for path in output_paths(out_dir, name).values():
        try:
            check_output_path(path)
        except InputError as err:
            raise CLIError(f"--out_dir: {err}") from None


def write_outputs(report: dict, out_dir: Path, name: str) -> dict:
    """Write <name>.json/.md/.png under temporary names, then rename them all; returns the paths
    written. Without matplotlib the chart is skipped with one warning: the figures are in the
    JSON and the Markdown."""
    final = output_paths(out_dir, name)
    tmp = {ext: out_dir / f".{name}.partial.{ext}" for ext in final}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp["md"].write_text(markdown(report), encoding="utf-8")
        try:
            plot(report, tmp["png"])
        except ImportError:
            log.warning("matplotlib is not installed: %s skipped (pip install matplotlib, or the [bench] extra)",
                        final["png"].name)
            del final["png"]
        for ext in final:
            tmp[ext].replace(final[ext])
    except OSError as err:  # disk full, permissions changed during the run, ...
        raise CLIOutputError(f"cannot write the results to {out_dir}: {err.strerror or err}") from None
    finally:
        for p in tmp.values():
            if p.exists():
                p.unlink()
    return final


def save_frames(path: Path, latents: dict, frames: dict, report: dict) -> Path:
    """Each mode's final latents (fp32) and decoded uint8 frames, with the run's config, in one file."""

    tmp = path.with_name(f".{path.name}.partial")
    try:
        torch.save(dict(config=report["config"], modes={m: dict(latents=latents[m], frames=frames.get(m))
                                                        for m in latents}), tmp)
        tmp.replace(path)
    except OSError as err:
        raise CLIOutputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ------------------------------------------------------------------ main flow

def _validate(args):
    """Everything that can be checked before building the pipeline. Returns the checked Request."""
    if args.num_runs < 1:
        raise CLIError(f"--num_runs must be >= 1, got {args.num_runs}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    req = parse_request(args, implied_task(args), modes=MODES if args.mode == "both" else (args.mode,))
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name
                                  or args.name.startswith(".")):
        raise CLIError(f"--name must be a plain file stem, got {args.name!r}")
    return req


def run(args, argv, cleanup: ExitStack) -> tuple[dict, dict]:
    """Validate, build once (wan_triton.build), run the modes, compare, write. Returns (report,
    written paths); `cleanup` tears down what the build started when main() is done."""

    request = _validate(args)
    task, config, size, frame_num, steps = (request.task, request.config, request.size, request.frame_num,
                                            request.steps)
    full_steps = steps if args.recipe else config.sample_steps  # what "full length" means for this run
    modes = request.plan.options.modes
    name = args.name or f"benchmark_{task}_{size.replace('*', 'x')}_{datetime.now():%Y%m%d_%H%M%S}"
    check_out_dir(Path(args.out_dir), name)
    plan = request.plan
    par = plan.parallel
    built = build_pipeline(request, cleanup, apply_plan=False, progress=not args.quiet)  # as the plan says
    pipe, device = built.pipe, built.device
    log.info("built %s (%s weights) on %s in %.1f s; each run: %s", task, built.weights, device, built.build_s,
             request.summary())

    req = dict(request.generate_kwargs(), prompt=request.prompt, progress=not args.quiet)
    decode = not args.no_decode
    results, latents, frames = {}, {}, {}
    tf32_saved = []
    try:
        # the reference state, also the start of a lone optimized run
        tf32_saved.append(to_reference(pipe, plan.reference_offload))
        if "reference" in modes:
            settings = dict(triton=False, compile=False, tf32="official (matmul off, cuDNN on)",
                            use_batched_cfg=False, offload=plan.reference_offload, t5_cpu=plan.t5_cpu,
                            attention=_attention_in_use(device), vae_dtype=pipe.vae.dtype_name, cache="off")
            res, latents["reference"], frames["reference"] = run_mode(
                pipe, "reference", settings, req, args.num_runs, args.warmup, decode)
            results["reference"] = summarize(res, full_steps, decode)
        if "optimized" in modes:
            applied = apply_built(built).applied
            if applied.compile and args.warmup == 0:
                log.warning("--compile with --warmup 0: the timed runs include compilation")
            if applied.tf32_prev is not None:
                tf32_saved.append(applied.tf32_prev)
            settings = dict(preset=applied.preset, triton=applied.triton, patched=len(applied.patched),
                            compile=applied.compile, compile_mode=applied.compile_mode if applied.compile else None,
                            tf32=applied.tf32, use_batched_cfg=applied.use_batched_cfg, offload=applied.offload,
                            t5_cpu=applied.t5_cpu, attention=_attention_in_use(device), fp8=applied.fp8,
                            vae_dtype=applied.vae_dtype, cache=applied.cache)
            res, latents["optimized"], frames["optimized"] = run_mode(
                pipe, "optimized", settings, req, args.num_runs, args.warmup, decode)
            results["optimized"] = summarize(res, full_steps, decode)
    finally:
        unpatch()
        for prev in reversed(tf32_saved):
            restore_tf32(prev)

    cmp_ = dict(speedup_total=None, speedup_per_step=None, speedup_extrapolated=None, latents_rel_err=None,
                latents_max_abs_err=None, psnr_db=None)
    if len(results) == 2:
        ref, opt = results["reference"], results["optimized"]
        cmp_.update(speedup_total=ref.total / opt.total, speedup_per_step=ref.step_mean / opt.step_mean,
                    speedup_extrapolated=ref.extrapolated_s / opt.extrapolated_s,
                    latents_rel_err=rel_err(latents["optimized"], latents["reference"]),
                    latents_max_abs_err=(latents["optimized"] - latents["reference"]).abs().max().item())
        if decode:
            cmp_["psnr_db"] = _psnr_json(psnr_uint8(frames["optimized"], frames["reference"]))
        cmp_.update(timing_verdict(ref.to_dict(), opt.to_dict()))
    video_wh = getattr(pipe, "last_size", None) or tuple(map(int, size.split("*")))  # image tasks: the image's
    report = dict(
        schema=1,
        config=dict(task=task, weights=built.weights, ckpt_dir=args.ckpt_dir, size=size, frame_num=frame_num,
                    sample_steps=steps, full_steps=full_steps, sample_solver=request.solver,
                    prompt=req["prompt"], n_prompt=request.n_prompt or None, base_seed=args.base_seed,
                    num_runs=args.num_runs, warmup=args.warmup,
                    decode=decode, device=str(device), build_s=built.build_s, recipe=args.recipe,
                    loras=[vars(sp) for sp in built.loras], lora_merge_s=built.lora_s, sample_shift=request.shift,
                    sample_guide_scale=request.guide_scale,
                    latent_shape=list(pipe.latent_shape(*video_wh, frame_num)),
                    parallel=dict(world=par.world, ulysses_size=par.ulysses_size, cfg_parallel=par.cfg_parallel,
                                  dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)),
        modes={k: v.to_dict() for k, v in results.items()},
        comparison=cmp_,
        environment=environment(device, argv),
    )
    if not built.is_main:
        return report, {}  # rank 0 writes
    try:
        paths = write_outputs(report, Path(args.out_dir), name)
        if args.save_frames:
            paths["frames"] = save_frames(Path(args.out_dir) / f"{name}.frames.pt", latents, frames, report)
    except CLIError:
        print(markdown(report))  # the measurements are not lost when the files cannot be written
        raise
    return report, paths


def main(argv=None) -> int:
    """Console entry point (`wan-benchmark`); returns the exit code."""

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    done = {}

    with ExitStack() as cleanup:  # the parallel state the build starts is destroyed after the error is said

        def go():
            done["report"], done["paths"] = run(args, argv, cleanup)

        rc = run_main(PROG, go)
    if rc == 0 and done["paths"]:  # under torchrun only rank 0 writes and prints
        print(markdown(done["report"]))
        log.info("wrote %s", ", ".join(str(p.resolve()) for p in done["paths"].values()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
