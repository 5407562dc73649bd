"""End-to-end Wan 2.2 T2V benchmark: reference vs optimized, same pipeline, same seed.

    python -m bench.benchmark_t2v                                  # tiny preset, CPU-friendly
    python -m bench.benchmark_t2v --random-weights --size 1280*720 --sample_steps 4 --no-decode
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

Offloading: unless `--offload_model` is given (then it applies to both modes), the reference
uses the official single-GPU default (offload on CUDA) and the optimized mode the preset's
choice. The text encoder placement (`--t5_cpu` or the preset's) is shared by both modes.

Outputs, written only at the very end (temporary names, then renamed): `<out_dir>/<name>.json`,
`<name>.md` and `<name>.png`. Bad input: one line on stderr, exit code 2, no file.
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
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from wan_triton.generate import CLIError, check_common

PROG = "wan-benchmark"
MODES = ("reference", "optimized")
log = logging.getLogger("wan.benchmark")


# ------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    from wan_triton.accel import PRESETS
    from wan_triton.generate import OneLineParser, add_accel_flags, parse_bool

    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--mode", default="both", choices=["reference", "optimized", "both"])
    a("--num_runs", type=int, default=3, help="timed generations per mode (median reported)")
    a("--warmup", type=int, default=1, help="untimed generations per mode before timing")
    # what to generate
    a("--task", default=None, help="t2v-A14B (default with --ckpt_dir / --random-weights) or tiny (default without)")
    a("--ckpt_dir", default=None, help="official Wan2.2-T2V-A14B folder")
    a("--random-weights", dest="random_weights", action="store_true",
      help="build the preset at its real shapes with random weights (no checkpoint needed)")
    a("--convert_model_dtype", action="store_true", help="with --ckpt_dir: DiT weights to bf16 (official flag)")
    a("--size", default=None, help="WIDTH*HEIGHT (default: the preset's)")
    a("--frame_num", type=int, default=None, help="4n+1 (default: the preset's)")
    a("--sample_steps", type=int, default=None, help="denoising steps (default: the preset's)")
    a("--sample_solver", default="unipc", help="unipc or dpm++")
    a("--prompt", default=None, help="text prompt (default: the demo prompt)")
    a("--base_seed", type=int, default=42, help="one seed for every run of both modes")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--t5_cpu", action="store_true", help="text encoder on CPU (both modes)")
    # optimization (wan_triton), as in wan-generate
    a("--preset", default="auto", choices=["auto", "none", *PRESETS],
      help="hardware preset for the optimized mode (default auto; none: only what the flags say)")
    add_accel_flags(p, triton_help="optimized mode keeps the reference ops")
    a("--offload_model", type=parse_bool, default=None,
      help="move the idle expert to CPU, in both modes (CUDA only; default: official for reference, preset for optimized)")
    from wan.parallel import add_parallel_flags
    add_parallel_flags(p)  # both modes run on all ranks (torchrun); rank 0 reports
    # output
    a("--no-decode", dest="no_decode", action="store_true", help="skip the VAE decode (per-step timing at full size)")
    a("--out_dir", default="bench/out")
    a("--name", default=None, help="file stem (default benchmark_<task>_<size>_<timestamp>)")
    a("--quiet", action="store_true", help="no progress bars")
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
    decode: float = 0.0
    total: float = 0.0
    peak_mem_gb: float = 0.0      # max over runs
    median_run: int = 0           # index of the run whose total is closest to the median
    steps: list = field(default_factory=list)    # per-step times of that run
    experts: list = field(default_factory=list)  # "high"/"low" per step
    extrapolated_s: float = 0.0
    extrapolated: bool = False
    full_steps: int = 0
    repeat_max_rel_err: float = 0.0  # timed runs vs the first timed run (0.0: deterministic)

    def to_dict(self) -> dict:
        return asdict(self)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def psnr_uint8(a, b) -> float:
    """PSNR in dB between two uint8 frame stacks (all frames, all channels); inf when identical."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _median_index(values) -> int:
    med = statistics.median(values)
    return min(range(len(values)), key=lambda i: (abs(values[i] - med), i))


def summarize(res: ModeResult, full_steps: int, decoded: bool) -> ModeResult:
    """Fill the medians, the median run's step list and the extrapolated full-length time."""
    runs = res.runs
    res.text_encode = statistics.median(r["text_encode"] for r in runs)
    res.step_mean = statistics.median(statistics.fmean(r["steps"]) for r in runs)
    res.denoise = statistics.median(sum(r["steps"]) for r in runs)
    res.decode = statistics.median(r["decode"] for r in runs) if decoded else 0.0
    res.total = statistics.median(r["total"] for r in runs)
    res.peak_mem_gb = max(r["peak_mem_gb"] for r in runs)
    res.median_run = _median_index([r["total"] for r in runs])
    res.steps = list(runs[res.median_run]["steps"])
    res.experts = list(runs[res.median_run]["experts"])
    res.full_steps = full_steps
    res.extrapolated = len(res.steps) < full_steps
    res.extrapolated_s = res.text_encode + res.step_mean * full_steps + res.decode
    return res


# ------------------------------------------------------------------ running

def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(pipe, req: dict, decode: bool):
    """One generation: latents from generate(), decoded here (timed, synchronised).
    Returns (Timings, latents on CPU, decoded video or None)."""
    import torch

    latents = pipe.generate(**req, return_latents=True)
    tm = pipe.last_timings
    video = None
    if decode:
        dev = pipe.device
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            video = pipe.vae.decode(latents.unsqueeze(0))[0]
        _sync(dev)
        tm.decode = time.perf_counter() - t0
        tm.total += tm.decode
        if dev.type == "cuda":  # generate reset the peak at its start; include the decode
            tm.peak_mem_gb = max(tm.peak_mem_gb, torch.cuda.max_memory_allocated(dev) / 1e9)
    return tm, latents.float().cpu(), video


def run_mode(pipe, mode: str, settings: dict, req: dict, num_runs: int, warmup: int, decode: bool):
    """Warm up, then time `num_runs` generations. Returns (ModeResult, latents, uint8 frames)."""
    from wan.pipeline import video_to_uint8

    res = ModeResult(mode=mode, settings=settings)
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
        log.info("[%s] run %d/%d: total %.2f s (text %.2f, %d steps %.3f s/step, decode %.2f)", mode, i + 1,
                 num_runs, tm.total, tm.text_encode, len(tm.steps), statistics.fmean(tm.steps), tm.decode)
    frames = video_to_uint8(video) if video is not None else None
    return res, latents, frames


def to_reference(pipe) -> dict:
    """The official state: reference ops, two-call CFG, PyTorch's default TF32 settings (fp32
    matmuls exact, cuDNN convolutions with TF32, as the official code runs). Returns the
    previous TF32 settings."""
    import wan_triton

    wan_triton.unpatch()
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        wan_triton.unpatch(m)
    pipe.use_batched_cfg = False
    from wan_triton.accel import official_tf32

    return official_tf32()


def _attention_in_use(device) -> str:
    from wan import attention as att

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
    import torch

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


# ------------------------------------------------------------------ reports

def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _psnr_json(p):
    if p is None:
        return None
    return "inf" if math.isinf(p) else p


def markdown(report: dict) -> str:
    """The Markdown summary: header, the table, speedup / parity / method lines."""
    c, cmp_, env = report["config"], report["comparison"], report["environment"]
    lines = [f"# Wan T2V benchmark: {c['task']} {c['size']}, {c['frame_num']} frames, {c['sample_steps']} steps "
             f"({c['sample_solver']}), {c['weights']} weights", "",
             "| mode | text s | s/step | decode s | total s | extrapolated s | peak GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["modes"].items():
        peak = _fmt(m["peak_mem_gb"], 1) if c["device"].startswith("cuda") else "n/a"
        dec = _fmt(m["decode"]) if c["decode"] else "skipped"
        lines.append(f"| {name} | {_fmt(m['text_encode'])} | {_fmt(m['step_mean'], 3)} | {dec} | "
                     f"{_fmt(m['total'])} | {_fmt(m['extrapolated_s'])} | {peak} |")
    lines.append("")
    if cmp_["speedup_total"] is not None:
        lines.append(f"- speedup (median total): **{cmp_['speedup_total']:.2f}x**; per step: "
                     f"{cmp_['speedup_per_step']:.2f}x; {c['full_steps']}-step video: "
                     f"{cmp_['speedup_extrapolated']:.2f}x")
        psnr = cmp_["psnr_db"]
        psnr_s = "n/a (no decode)" if psnr is None else ("inf dB (identical)" if psnr == "inf" else f"{psnr:.2f} dB")
        lines.append(f"- parity (seed {c['base_seed']}, optimized vs reference): latents rel err "
                     f"{cmp_['latents_rel_err']:.3e} (max abs {cmp_['latents_max_abs_err']:.3e}), "
                     f"decoded frames PSNR {psnr_s}")
    else:
        lines.append("- speedup / parity: n/a (one mode only)")
    any_m = next(iter(report["modes"].values()))
    how = "extrapolated" if any_m["extrapolated"] else "measured at full length"
    lines.append(f"- extrapolated s = text + s/step x {c['full_steps']} + decode ({how}; "
                 f"{c['sample_steps']} steps timed{'' if c['decode'] else ', decode skipped'})")
    lines.append(f"- medians over {c['num_runs']} timed run(s) after {c['warmup']} warmup(s); "
                 f"decode timed by the benchmark after generate(return_latents=True)")
    for name, m in report["modes"].items():
        s = m["settings"]
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines.append(f"- experts per step: {' '.join(any_m['experts'])}")
    lines.append(f"- {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
                 f"git {env['git_commit'] or 'unknown'}{' (dirty)' if env['git_dirty'] else ''} | {env['date']}")
    lines.append(f"- `{env['command']}`")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Stacked horizontal bars of stage times per mode, and the per-step times of the median run."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    c, modes = report["config"], report["modes"]
    names = list(modes)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), gridspec_kw=dict(height_ratios=[1, 1.2]))
    stages = [("text encode", "text_encode", "#8da0cb"), ("denoise", "denoise", "#fc8d62"),
              ("VAE decode", "decode", "#66c2a5")]
    left = [0.0] * len(names)
    for label, key, color in stages:
        vals = [modes[n][key] for n in names]
        ax.barh(names, vals, left=left, color=color, label=label, edgecolor="white")
        left = [a + b for a, b in zip(left, vals)]
    for i, n in enumerate(names):
        ax.text(left[i], i, f"  {modes[n]['total']:.2f} s", va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median run)")
    sp = report["comparison"]["speedup_total"]
    ax.set_title(f"{c['task']} {c['size']} x{c['frame_num']}f, {c['sample_steps']} steps on "
                 f"{report['environment']['device_name']}" + (f": speedup {sp:.2f}x" if sp else ""), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    for n in names:
        st = modes[n]["steps"]
        ax2.plot(range(1, len(st) + 1), st, marker="o", label=n)
    exp = modes[names[0]]["experts"]
    for i, e in enumerate(exp):
        if e == "high":
            ax2.axvspan(i + 0.5, i + 1.5, color="0.92", lw=0)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("denoising step of the median run (shaded: high-noise expert)")
    ax2.set_ylabel("s / step")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, name: str) -> dict:
    """Write <name>.json/.md/.png under temporary names, then rename them all; returns the paths."""
    final = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    tmp = {ext: out_dir / f".{name}.partial.{ext}" for ext in final}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp["md"].write_text(markdown(report), encoding="utf-8")
        plot(report, tmp["png"])
        for ext in final:
            tmp[ext].replace(final[ext])
    except OSError as err:  # disk full, permissions changed during the run, ...
        raise CLIError(f"cannot write the results to {out_dir}: {err.strerror or err}") from None
    finally:
        for p in tmp.values():
            if p.exists():
                p.unlink()
    return final


# ------------------------------------------------------------------ main flow

def _validate(args):
    """Everything that can be checked before building the pipeline. Returns the resolved request."""
    from wan import attention as att

    if args.ckpt_dir and args.random_weights:
        raise CLIError("--ckpt_dir and --random-weights exclude each other")
    if args.num_runs < 1:
        raise CLIError(f"--num_runs must be >= 1, got {args.num_runs}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    try:  # the PNG chart is written last: check its dependency before any model is built
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("the chart needs matplotlib: pip install matplotlib "
                       "(or install wan-triton with the [bench] extra)") from None
    default = "t2v-A14B" if (args.ckpt_dir or args.random_weights) else "tiny"
    task, config, device, size, frame_num, steps = check_common(args, default)
    if args.attention != "auto" and args.attention not in att.available_backends(device):
        raise CLIError(f"--attention {args.attention} is not available on {device} "
                       f"(available: {', '.join(att.available_backends(device))})")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name
                                  or args.name.startswith(".")):
        raise CLIError(f"--name must be a plain file stem, got {args.name!r}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out_dir is not a directory: {out_dir}")
    from wan.pipeline import InputError, check_output_path
    try:
        check_output_path(out_dir / "results.json")
    except InputError as err:
        raise CLIError(f"--out_dir: {err}") from None
    return task, config, device, size, frame_num, steps


def _optimized_preset(args, device):
    from wan_triton import accel

    if args.preset != "none":
        return accel.get_preset(args.preset, device)
    return accel.flags_preset(device)


def run(args, argv) -> tuple[dict, dict]:
    """Validate, build once, run the modes, compare, write. Returns (report, written paths)."""
    import torch

    from wan.pipeline import WanT2V
    from wan_triton import accel, restore_tf32, unpatch
    from wan_triton.generate import DEMO_PROMPT

    task, config, device, size, frame_num, steps = _validate(args)
    from wan import parallel
    par = parallel.check_parallel_args(args, config.dit.num_heads, device, args.offload_model, args.t5_cpu)
    state = None
    if par.world > 1:
        state = args._parallel_state = parallel.init_from_env(par.ulysses_size, par.cfg_parallel, par.timeout,
                                                               device=device.type)
        device = state.device
    modes = MODES if args.mode == "both" else (args.mode,)
    preset = _optimized_preset(args, device) if "optimized" in modes else None
    t5_cpu = args.t5_cpu or bool(preset and preset.t5_cpu)
    name = args.name or f"benchmark_{task}_{size.replace('*', 'x')}_{datetime.now():%Y%m%d_%H%M%S}"
    on_cuda = device.type == "cuda"

    t0 = time.perf_counter()
    if args.ckpt_dir:
        weights = "checkpoint"
        pipe = WanT2V.from_pretrained(args.ckpt_dir, config, device=device, t5_cpu=t5_cpu,
                                      convert_model_dtype=args.convert_model_dtype, progress=not args.quiet)
    else:
        weights = "random"
        pipe = WanT2V.from_preset(config, device=device, t5_cpu=t5_cpu)
    build_s = time.perf_counter() - t0
    log.info("built %s (%s weights) on %s in %.1f s", task, weights, device, build_s)
    if state is not None:
        parallel.apply_to_pipeline(pipe, state, dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)
        if par.dit_fsdp:
            args.offload_model = False

    req = dict(prompt=args.prompt or DEMO_PROMPT, size=size, frame_num=frame_num, sample_solver=args.sample_solver,
               sampling_steps=steps, seed=args.base_seed, progress=not args.quiet)
    decode = not args.no_decode
    results, latents, frames = {}, {}, {}
    tf32_saved = []
    try:
        tf32_saved.append(to_reference(pipe))  # the reference state, also the start of a lone optimized run
        if "reference" in modes:
            offload = (args.offload_model if args.offload_model is not None else on_cuda) and on_cuda
            settings = dict(triton=False, compile=False, tf32="official (matmul off, cuDNN on)",
                            use_batched_cfg=False, offload_model=offload, t5_cpu=t5_cpu,
                            attention=_attention_in_use(device))
            res, latents["reference"], frames["reference"] = run_mode(
                pipe, "reference", settings, dict(req, offload_model=offload), args.num_runs, args.warmup, decode)
            results["reference"] = summarize(res, config.sample_steps, decode)
        if "optimized" in modes:
            applied = accel.optimize(pipe, preset, triton=False if args.no_triton else None, compile=args.compile,
                                     compile_mode=args.compile_mode, tf32=True if args.tf32 else None,
                                     use_batched_cfg=True if args.use_batched_cfg else None,
                                     attention=args.attention)
            if applied["compile"] and args.warmup == 0:
                log.warning("--compile with --warmup 0: the timed runs include compilation")
            if "tf32_prev" in applied:
                tf32_saved.append(applied.pop("tf32_prev"))
            offload = (applied["offload_model"] if args.offload_model is None else args.offload_model) and on_cuda
            settings = dict(preset=applied["preset"], triton=applied["triton"], patched=len(applied["patched"]),
                            compile=applied["compile"],
                            compile_mode=applied["compile_mode"] if applied["compile"] else None,
                            tf32=applied["tf32"], use_batched_cfg=applied["use_batched_cfg"], offload_model=offload,
                            t5_cpu=t5_cpu, attention=_attention_in_use(device))
            res, latents["optimized"], frames["optimized"] = run_mode(
                pipe, "optimized", settings, dict(req, offload_model=offload), args.num_runs, args.warmup, decode)
            results["optimized"] = summarize(res, config.sample_steps, decode)
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
    report = dict(
        schema=1,
        config=dict(task=task, weights=weights, ckpt_dir=args.ckpt_dir, size=size, frame_num=frame_num,
                    sample_steps=steps, full_steps=config.sample_steps, sample_solver=args.sample_solver,
                    prompt=req["prompt"], base_seed=args.base_seed, num_runs=args.num_runs, warmup=args.warmup,
                    decode=decode, device=str(device), build_s=build_s,
                    latent_shape=list(pipe.latent_shape(*map(int, size.split("*")), frame_num)),
                    parallel=dict(world=par.world, ulysses_size=par.ulysses_size, cfg_parallel=par.cfg_parallel,
                                  dit_fsdp=par.dit_fsdp, t5_fsdp=par.t5_fsdp)),
        modes={k: v.to_dict() for k, v in results.items()},
        comparison=cmp_,
        environment=environment(device, argv),
    )
    if state is not None and not state.is_main:
        return report, {}  # rank 0 writes
    try:
        paths = write_outputs(report, Path(args.out_dir), name)
    except CLIError:
        print(markdown(report))  # the measurements are not lost when the files cannot be written
        raise
    return report, paths


def main(argv=None) -> int:
    """Console entry point (`wan-benchmark`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 logs and prints
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from wan.checkpoint import CheckpointError
    from wan.parallel import ParallelError, destroy
    from wan.pipeline import InputError
    from wan_triton.accel import AccelError
    from wan_triton.patch import PatchError

    try:
        report, paths = run(args, argv)
    except (CLIError, InputError, CheckpointError, AccelError, PatchError, ParallelError) as err:
        if rank == 0 or getattr(args, "_parallel_state", None) is not None:
            print(f"{PROG}: error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as err:
        print(f"{PROG}: error: out of memory: {str(err).splitlines()[0] if str(err) else 'MemoryError'}",
              file=sys.stderr)
        return 1
    except RuntimeError as err:
        if "out of memory" not in str(err).lower():
            raise
        print(f"{PROG}: error: out of memory: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        destroy(getattr(args, "_parallel_state", None))
    if rank != 0:
        return 0
    print(markdown(report))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
