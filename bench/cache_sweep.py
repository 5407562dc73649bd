"""The step cache on the quality gate: forwards saved against PSNR / SSIM, per criterion and threshold.

    python -m bench.cache_sweep --device cpu                 # the trained demo model, 40 steps, 8 prompts, seed 0
    python -m bench.cache_sweep --device cuda --seeds 0,1 --out bench/out/cache_sweep_h100
    python -m bench.cache_sweep --task tiny --random --prompts 1 --steps 12   # smoke run, random weights

One gate Mode (bench/quality.py) per setting: `apply` is wan.step_cache.enable_step_cache (its undo
puts the pipeline's previous policy back), so the gate samples every prompt x seed exactly and
with each setting, and counts the transformer-block calls with its own hooks. Settings: `easy` and
`mag` at --thresholds each, the CFG-branch cache alone (--cfg), and each criterion combined with
it at its middle threshold; plus the fp32 floor (how far the exact bf16 run is from fp32).

The `mag` ratios of this model and schedule come from beside the checkpoint
(<ckpt_dir>/mag_ratios, written by `python -m wan_triton.calibrate`); when there are none they are
measured here with the same function, on a prompt that is not among the gate's, and written next
to the outputs (<out>.mag_ratios/). Writes <out>.json (the gate's rows and the settings), <out>.md
(the table and the picks: the most forwards saved at >= 24 dB and at >= 30 dB) and <out>.png
(forwards saved vs PSNR, one line per criterion).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.quality import NO_LPIPS, PROMPTS, Mode, fp32_floor, judge, markdown_table
from wan.configs import DEMO_CKPT_DIR, get_config
from wan.mag_ratios import find_ratios, load_ratios, ratios_dir, ratios_file_name
from wan.pipeline import WanT2V
from wan.step_cache import CacheError, CachePolicy, calibrate, enable_step_cache

log = logging.getLogger("bench.cache_sweep")

THRESHOLDS = {"easy": (0.025, 0.05, 0.1, 0.2, 0.4), "mag": (0.025, 0.05, 0.1, 0.2, 0.4)}
CFG_INTERVALS = (2, 3)
GOALS_DB = (24.0, 30.0)  # the goals: >= 2x forwards saved at >= 24 dB; a conservative preset at >= 30 dB
# not among the gate's prompts (bench/quality.PROMPTS): the ratios are measured on one caption, judged on others
CALIBRATION_PROMPT = "a green circle moving right on a black background"


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a policy and the plot line it belongs to."""
    series: str
    policy: CachePolicy

    @property
    def label(self) -> str:
        """'easy 0.1', 'cfg 2', 'mag 0.1 + cfg 2' (the table's mode column; its note is the policy's summary)."""
        p = self.policy
        parts = ([f"{p.criterion} {p.limit:g}"] if p.criterion != "none" else []) + \
            ([f"cfg {p.cfg_interval}"] if p.cfg_interval >= 2 else [])
        return " + ".join(parts) + (f" (<= {p.max_skips} in a row)" if p.max_skips is not None else "")


def sweep_settings(ratios_file: str | None, thresholds: dict = THRESHOLDS, cfg_intervals=CFG_INTERVALS,
                   max_skips: int | None = None) -> list[Setting]:
    """easy and mag at each threshold (mag only with a ratio source), the CFG-branch cache alone,
    and each criterion at its middle threshold with the CFG-branch cache at the smallest interval."""
    out = []
    for crit, ths in thresholds.items():
        if crit == "mag" and ratios_file is None:
            continue
        for th in ths:
            out.append(Setting(crit, CachePolicy(crit, th, max_skips=max_skips, ratios_file=ratios_file)))
    for n in cfg_intervals:
        out.append(Setting("cfg", CachePolicy(cfg_interval=n)))
    if cfg_intervals:
        for crit, ths in thresholds.items():
            if crit == "mag" and ratios_file is None:
                continue
            mid = ths[len(ths) // 2]
            out.append(Setting(f"{crit} + cfg", CachePolicy(crit, mid, cfg_interval=min(cfg_intervals),
                                                            max_skips=max_skips, ratios_file=ratios_file)))
    return out


def mode_of(setting: Setting) -> Mode:
    """The gate's Mode: enable_step_cache on apply, its undo on undo."""
    policy = setting.policy
    return Mode(setting.label, lambda pipe: enable_step_cache(pipe, policy), lossy=True, note=policy.summary())


def mag_ratios_source(pipe, steps: int, shift: float, solver: str, out: Path, size: str, frame_num: int) -> str:
    """The ratio file of this model and schedule: beside the checkpoint when there, else measured now
    (wan.step_cache.calibrate, the function `python -m wan_triton.calibrate` runs) into <out>.mag_ratios/."""
    if pipe.ckpt_dir is not None:
        try:
            found = find_ratios(load_ratios(ratios_dir(pipe.ckpt_dir)), solver, steps, shift)
            log.info("mag ratios: %s", found.path)
            return found.path
        except CacheError as err:
            log.info("no usable ratios beside the checkpoint (%s): measuring them", err)
    r = calibrate(pipe, [CALIBRATION_PROMPT], steps=steps, shift=shift, solver=solver, size=size, frame_num=frame_num,
                  progress=False)
    path = r.save(out.with_name(out.name + ".mag_ratios") / ratios_file_name(solver, steps, shift))
    log.info("mag ratios measured on %r, written to %s", CALIBRATION_PROMPT, path)
    return str(path)


def picks(rows, settings_by_label: dict) -> list[str]:
    """For each goal: the setting that saves the most forwards with a mean PSNR at or above it."""
    lines = []
    for goal in GOALS_DB:
        ok = [r for r in rows if r.mode in settings_by_label and not r.skipped and r.psnr_db >= goal]
        if not ok:
            lines.append(f"- >= {goal:g} dB: no setting of this sweep")
            continue
        best = max(ok, key=lambda r: r.forwards_saved)
        lines.append(f"- >= {goal:g} dB: **{best.mode}**: {best.forwards_saved:.0%} of the block calls saved "
                     f"({_speedup(best.forwards_saved):.2f}x fewer), PSNR {best.psnr_db:.2f} dB (worst "
                     f"{best.psnr_min_db:.2f}), SSIM {best.ssim:.4f}")
    return lines


def _speedup(saved: float) -> float:
    return 1.0 / (1.0 - saved) if saved < 1 else math.inf


def plot(rows, settings: list[Setting], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {r.mode: r for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for series in dict.fromkeys(s.series for s in settings):
        pts = sorted(((_speedup(by_label[s.label].forwards_saved), by_label[s.label].psnr_db, s)
                      for s in settings if s.series == series and s.label in by_label
                      and not by_label[s.label].skipped and math.isfinite(by_label[s.label].psnr_db)),
                     key=lambda p: p[:2])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=series)
        for x, y, s in pts:
            tag = f"{s.policy.limit:g}" if s.policy.criterion != "none" else f"every {s.policy.cfg_interval}"
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    floor = [r for r in rows if not r.lossy and r.mode != "exact" and math.isfinite(r.psnr_db)]
    for r in floor:
        ax.axhline(r.psnr_db, color="gray", lw=0.8, ls=":", label=f"fp32 floor ({r.psnr_db:.1f} dB)")
    for goal in GOALS_DB:
        ax.axhline(goal, color="k", lw=0.6, ls="--")
    ax.axvline(2.0, color="k", lw=0.6, ls="--")
    ax.set_xlabel("block calls, exact / cached (x fewer)")
    ax.set_ylabel("PSNR vs exact, dB (mean over videos)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build(args) -> WanT2V:
    config = get_config(args.task)
    if args.random:
        return WanT2V.from_config(config, device=args.device, seed=0)
    return WanT2V.from_pretrained(args.ckpt_dir or DEMO_CKPT_DIR, config, device=args.device, init_on_cpu=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt_dir", default=None, help="checkpoint folder (default: the demo model)")
    ap.add_argument("--task", default="demo", help="the task (default: demo)")
    ap.add_argument("--random", action="store_true", help="random weights of --task (smoke runs only: no quality)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40, help="denoising steps (default: 40, the A14B's)")
    ap.add_argument("--size", default=None, help="W*H (default: the task's)")
    ap.add_argument("--frame_num", type=int, default=None, help="frames (default: the task's)")
    ap.add_argument("--solver", default="unipc")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the gate's {len(PROMPTS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--thresholds", default=None, help="comma-separated thresholds for both criteria "
                                                       f"(default: easy {THRESHOLDS['easy']}, mag {THRESHOLDS['mag']})")
    ap.add_argument("--cfg", default=",".join(map(str, CFG_INTERVALS)), help="CFG-branch cache intervals ('' : none)")
    ap.add_argument("--max_skips", type=int, default=None, help="steps reused in a row at most (default: the "
                                                                "criterion's)")
    ap.add_argument("--no-mag", dest="mag", action="store_false", help="leave the mag criterion out")
    ap.add_argument("--out", default="bench/out/cache_sweep", help="output stem: <out>.json, .md, .png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = build(args)
    cfg = pipe.config
    ths = THRESHOLDS if args.thresholds is None else {
        c: tuple(float(x) for x in args.thresholds.split(",")) for c in THRESHOLDS}
    cfgs = tuple(int(x) for x in args.cfg.split(",") if x.strip())
    size, frames = args.size or cfg.default_size, args.frame_num or cfg.frame_num
    ratios = mag_ratios_source(pipe, args.steps, cfg.sample_shift, args.solver, out, size, frames) if args.mag else None
    settings = sweep_settings(ratios, ths, cfgs, args.max_skips)
    floor = [] if args.random else [Mode("fp32 (floor: bf16 vs fp32)", fp32_floor, lossy=False, note="floor")]
    modes = [*floor, *(mode_of(s) for s in settings)]  # the floor needs fp32 weights (a checkpoint as stored)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rows = judge(pipe, modes, PROMPTS[:args.prompts], seeds, size=size, frame_num=frames, steps=args.steps,
                 solver=args.solver)
    source = "random weights (no quality meaning)" if args.random else (args.ckpt_dir or "the demo model")
    head = (f"{cfg.name} ({source}), {pipe.device}"
            f"{' ' + torch.cuda.get_device_name(pipe.device) if pipe.device.type == 'cuda' else ''}, torch "
            f"{torch.__version__}; {size}, {frames} frames, {args.steps} steps ({args.solver}, "
            f"shift {cfg.sample_shift:g}), {args.prompts} prompts x seeds {list(seeds)}; "
            f"{time.perf_counter() - t0:.0f} s. {NO_LPIPS}.")
    by_label = {s.label: s for s in settings}
    text = "\n".join([head, "", markdown_table(rows), "", "Picks (most block calls saved at each goal):", "",
                      *picks(rows, by_label), ""])
    print(text)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(dict(
        header=head, ratios=ratios, rows=[asdict(r) for r in rows],
        settings=[dict(label=s.label, series=s.series, policy=asdict(s.policy)) for s in settings]), indent=1))
    plot(rows, settings, Path(f"{out}.png"), f"step cache on the gate: {cfg.name}, {args.steps} steps")
    log.info("wrote %s.{json,md,png}", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
