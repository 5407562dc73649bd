"""The benchmark's report as text and chart: the Markdown summary (`markdown`), the speed-up
sentence (`speedup_text`: a ratio only from enough runs and outside the run-to-run spread) and
the PNG (`plot`). Reads the report dict wan_triton.benchmark builds; computes nothing new."""
from __future__ import annotations

from pathlib import Path

__all__ = ["MIN_RUNS", "speedup_text", "markdown", "plot"]

MIN_RUNS = 3  # timed runs per mode before a ratio is claimed: fewer cannot show the run-to-run spread


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pcts(sp: dict) -> str:
    return f"reference {100 * sp['reference']['rel']:.1f}%, optimized {100 * sp['optimized']['rel']:.1f}%"


def speedup_text(report: dict, short: bool = False) -> str:
    """The speed-up sentence of the Markdown report (or, `short`, of the chart title): a ratio is
    given only from >= MIN_RUNS timed runs per mode, next to the run-to-run spread of the same
    quantity, and never for the same computation or inside the noise."""
    cmp_, modes = report["comparison"], report["modes"]
    sp = cmp_["spread"]
    pct = 100 * max(sp["reference"]["rel"], sp["optimized"]["rel"])
    basis = sp["reference"]["basis"]
    verdict, n, need = cmp_["verdict"], cmp_.get("runs_per_mode", sp["reference"]["n"]), cmp_.get("min_runs", MIN_RUNS)
    totals = f"median totals {modes['reference']['total']:.2f} s and {modes['optimized']['total']:.2f} s"
    if verdict == "same":
        if short:
            return "same computation in both modes"
        noise = (f"run-to-run spread {pct:.1f}% ({basis})" if n >= need else
                 f"run-to-run spread not measured ({n} timed run(s) per mode; --num_runs {need} measures it)")
        return f"no speed-up to report: both modes ran the same computation (nothing patched, same flags); {noise}"
    if verdict == "too_few":
        if short:
            return f"no ratio claimed ({n} timed run(s) per mode, needs {need})"
        return (f"no speed-up claimed: {n} timed run(s) per mode, and a ratio needs >= {need} (--num_runs {need}) "
                f"to be told apart from run-to-run noise; {totals}")
    if verdict == "noise":
        if short:
            return f"no measurable difference (within spread {pct:.0f}%)"
        return f"no measurable difference (within run-to-run spread {pct:.1f}%: {basis}); {totals}"
    total = cmp_["speedup_total"]
    if short:
        return f"speedup {total:.2f}x (spread {pct:.0f}%)"
    ssp = cmp_["step_spread"]
    if cmp_["step_verdict"] == "measured":
        step = (f"per step: {cmp_['speedup_per_step']:.2f}x (spread {_pcts(ssp)}, {ssp['reference']['basis']}); "
                f"{report['config']['full_steps']}-step video: {cmp_['speedup_extrapolated']:.2f}x")
    else:
        step = f"per step: no measurable difference ({ssp['reference']['basis']} overlap)"
    return (f"speedup (median total): **{total:.2f}x**; run-to-run spread: {_pcts(sp)} ({basis}; the bands do not "
            f"overlap); {step}")


def markdown(report: dict) -> str:
    """The Markdown summary: header, the table, speedup / parity / method lines."""
    c, cmp_, env = report["config"], report["comparison"], report["environment"]
    lines = [f"# Wan T2V benchmark: {c['task']} {c['size']}, {c['frame_num']} frames, {c['sample_steps']} steps "
             f"({c['sample_solver']}), {c['weights']} weights", "",
             "| mode | text s | s/step | offload s | decode s | total s | extrapolated s | peak GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["modes"].items():
        peak = _fmt(m["peak_mem_gb"], 1)  # None off CUDA: n/a
        dec = _fmt(m["decode"]) if c["decode"] else "skipped"
        lines.append(f"| {name} | {_fmt(m['text_encode'])} | {_fmt(m['step_mean'], 3)} | {_fmt(m['offload'])} | {dec} | "
                     f"{_fmt(m['total'])} | {_fmt(m['extrapolated_s'])} | {peak} |")
    lines.append("")
    if cmp_["speedup_total"] is not None:
        lines.append(f"- {speedup_text(report)}")
        psnr = cmp_["psnr_db"]
        psnr_s = "n/a (no decode)" if psnr is None else ("inf dB (identical)" if psnr == "inf" else f"{psnr:.2f} dB")
        lines.append(f"- parity (seed {c['base_seed']}, optimized vs reference): latents rel err "
                     f"{cmp_['latents_rel_err']:.3e} (max abs {cmp_['latents_max_abs_err']:.3e}), "
                     f"decoded frames PSNR {psnr_s}")
    else:
        lines.append("- speedup / parity: n/a (one mode only)")
    any_m = next(iter(report["modes"].values()))
    how = "extrapolated" if any_m["extrapolated"] else "measured at full length"
    lines.append(f"- extrapolated s = text + s/step x {c['full_steps']} + offload + decode ({how}; "
                 f"{c['sample_steps']} steps timed{'' if c['decode'] else ', decode skipped'}); offload s = placing the "
                 f"experts (offload=model: the needed one onto the GPU, the idle one and, after the last step, the "
                 f"last one into host memory), in no step's time")
    if any_m["extrapolated"] and len(set(any_m["experts"])) == 1 and any_m["experts"][0] in ("high", "low"):
        lines.append(f"- the timed steps ran the {any_m['experts'][0]}-noise expert only: a full run's switch to the "
                     f"other expert (with offload=model one expert copied out, the other in) is not in the "
                     f"extrapolation")
    lines.append(f"- medians over {c['num_runs']} timed run(s) after {c['warmup']} warmup(s); "
                 f"decode timed by the benchmark after generate(return_latents=True)")
    lines.append("- total s = the median run's total (" + ", ".join(
        f"{name}: run {m['median_run'] + 1} of {len(m['runs'])}" for name, m in report["modes"].items())
        + "); the chart shows that run's stages")
    for name, m in report["modes"].items():
        s = m["settings"]
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines.append(f"- experts per step: {' '.join(any_m['experts'])}")
    lines.append(f"- {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
                 f"git {env['git_commit'] or 'unknown'}{' (dirty)' if env['git_dirty'] else ''} | {env['date']}")
    lines.append(f"- `{env['command']}`")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Stacked horizontal bars of the median run's stage times per mode (the label is that run's
    total, where its bar ends), and the per-step times of the median run."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    c, modes = report["config"], report["modes"]
    names = list(modes)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), gridspec_kw=dict(height_ratios=[1, 1.2]))
    median_runs = [modes[n]["runs"][modes[n]["median_run"]] for n in names]
    stages = [("text encode", lambda r: r["text_encode"], "#8da0cb"),
              ("denoise", lambda r: sum(r["steps"]), "#fc8d62"), ("VAE decode", lambda r: r["decode"], "#66c2a5"),
              ("offload", lambda r: sum(r["moves"]), "#e78ac3"),
              ("other (setup)",
               lambda r: max(0.0, r["total"] - r["text_encode"] - sum(r["steps"]) - sum(r["moves"]) - r["decode"]),
               "#cccccc")]
    left = [0.0] * len(names)
    for label, get, color in stages:
        vals = [get(r) for r in median_runs]
        ax.barh(names, vals, left=left, color=color, label=label, edgecolor="white")
        left = [a + b for a, b in zip(left, vals)]
    for i in range(len(names)):
        ax.text(left[i], i, f"  {left[i]:.2f} s", va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (the median run of each mode)")
    verdict = f": {speedup_text(report, short=True)}" if report["comparison"].get("verdict") else ""
    ax.set_title(f"{c['task']} {c['size']} x{c['frame_num']}f, {c['sample_steps']} steps on "
                 f"{report['environment']['device_name']}{verdict}", fontsize=10)
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
