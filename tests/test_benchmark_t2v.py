"""The end-to-end benchmark CLI on the tiny task (CPU): outputs, one-mode runs, bad input."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_triton.benchmark import main, psnr_uint8, rel_err

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--task", "tiny", "--size", "128*128", "--frame_num", "5", "--sample_steps", "2", "--num_runs", "1",
        "--warmup", "0",
        "--device", "cpu", "--quiet", "--no-triton"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_both_modes_write_json_md_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(FAST + ["--mode", "both", "--out_dir", str(out), "--name", "b"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "b.md", "b.png"]  # no partial files left

    rep = json.loads((out / "b.json").read_text())
    assert {"schema", "config", "modes", "comparison", "environment"} <= rep.keys()
    assert set(rep["modes"]) == {"reference", "optimized"}
    for m in rep["modes"].values():
        assert len(m["runs"]) == 1 and len(m["steps"]) == 2 and len(m["experts"]) == 2
        assert m["total"] > 0 and m["step_mean"] > 0 and m["decode"] > 0
        assert m["extrapolated"] and m["full_steps"] == 8
        assert m["extrapolated_s"] == pytest.approx(m["text_encode"] + 8 * m["step_mean"] + m["offload"] + m["decode"])
    assert rep["modes"]["reference"]["settings"]["use_batched_cfg"] is False
    assert rep["modes"]["optimized"]["settings"]["triton"] is False  # --no-triton
    c = rep["comparison"]
    assert c["speedup_total"] > 0 and c["speedup_per_step"] > 0 and c["speedup_extrapolated"] > 0
    # --no-triton on CPU: nothing patched, same flags -> the same computation, no speed-up claimed
    assert c["verdict"] == "same" and c["same_computation"] is True
    assert set(c["spread"]) == {"reference", "optimized"} and c["spread"]["reference"]["basis"] == \
        "min-max of 1 run totals"
    for m in rep["modes"].values():  # not measured on a CPU: null, as the Markdown's n/a
        assert m["peak_mem_gb"] is None and all(r["peak_mem_gb"] is None for r in m["runs"])
    assert c["psnr_db"] == "inf" or math.isfinite(c["psnr_db"])
    assert 0 <= c["latents_rel_err"] < 0.05
    env = rep["environment"]
    assert env["torch"] == torch.__version__ and env["command"].startswith("wan-benchmark ") and env["date"]

    md = (out / "b.md").read_text()
    header = "| mode | text s | s/step | offload s | decode s | total s | extrapolated s | peak GB |"
    assert header in md and "| reference |" in md and "| optimized |" in md
    assert "no speed-up to report: both modes ran the same computation" in md and "run-to-run spread" in md
    assert "x**" not in md and "speedup (median total)" not in md
    png = (out / "b.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    assert header in capsys.readouterr().out  # the table is printed at the end


def test_reference_only_default_name(tmp_path, caplog):
    caplog.set_level("INFO")
    rc = main(FAST + ["--mode", "reference", "--no-decode", "--out_dir", str(tmp_path)])
    assert rc == 0
    files = sorted(tmp_path.iterdir())
    assert [p.suffix for p in files] == [".json", ".md", ".png"]
    assert files[0].name.startswith("benchmark_tiny_128x128_")
    rep = json.loads(files[0].read_text())
    assert list(rep["modes"]) == ["reference"]
    assert rep["modes"]["reference"]["decode"] == 0 and rep["config"]["decode"] is False
    assert rep["comparison"]["speedup_total"] is None and rep["comparison"]["psnr_db"] is None
    assert "[reference] run 1/1: total" in caplog.text


def test_takes_wan_generates_flags(tmp_path, monkeypatch):
    """wan-benchmark takes every flag of wan-generate but --save_file (it writes a report, not a
    video), and the sampling ones reach the runs and the report (issue 31, item 8: it lacked
    --sample_shift, --sample_guide_scale, --n_prompt and --no-offload)."""
    from wan.pipeline import WanT2V
    from wan_triton import benchmark, generate

    def flags(p):
        return {o for a in p._actions for o in a.option_strings}

    assert flags(generate.build_parser()) - flags(benchmark.build_parser()) == {"--save_file"}
    asked = []
    real = WanT2V.generate

    def spy(self, prompt, **kw):
        asked.append((kw["shift"], kw["guide_scale"], kw["n_prompt"]))
        return real(self, prompt, **kw)

    monkeypatch.setattr(WanT2V, "generate", spy)
    rc = main(FAST + ["--mode", "reference", "--no-decode", "--out_dir", str(tmp_path), "--name", "g",
                      "--sample_shift", "3", "--sample_guide_scale", "2.5", "--n_prompt", "blur"])
    assert rc == 0 and asked == [(3.0, 2.5, "blur")]
    cfg = json.loads((tmp_path / "g.json").read_text())["config"]
    assert (cfg["sample_shift"], cfg["sample_guide_scale"], cfg["n_prompt"]) == (3.0, 2.5, "blur")


def test_no_offload_is_offload_none_in_both_modes():
    """wan-benchmark's --no-offload is wan-generate's: --offload none (fine on a CPU), for both modes."""
    from wan_triton.benchmark import MODES, build_parser
    from wan_triton.request import parse_request

    plans = [parse_request(build_parser().parse_args([*flags, "--device", "cpu"]), "tiny", modes=MODES).plan
             for flags in (["--no-offload"], ["--offload", "none"])]
    assert all((p.offload, p.reference_offload, p.options.offload) == ("none",) * 3 for p in plans)


@pytest.mark.parametrize("args,msg", [
    (["--size", "100*100"], "multiples of 16"),
    (["--size", "1280*720"], "not supported"),
    (["--size", "big"], "WIDTH*HEIGHT"),
    (["--frame_num", "8"], "4n+1"),
    (["--sample_solver", "heun"], "unknown solver"),
    (["--tf32"], "needs a CUDA GPU"),
    (["--compile"], "needs a CUDA GPU"),
    (["--preset", "h200"], "needs a CUDA GPU"),
    (["--attention", "fa3"], "not available"),
    (["--ckpt_dir", "/nonexistent", "--random-weights"], "exclude each other"),
    (["--num_runs", "0"], "--num_runs"),
    (["--sample_steps", "0"], "--sample_steps"),
    (["--task", "t2v-XXL"], "unknown task"),
    (["--mode", "fast"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quiet", "--out_dir", str(out)] + args
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors (bad choice) exit from the parser
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("wan-benchmark: error:") and msg in err[0]
    assert not out.exists()


def test_no_matplotlib_writes_the_figures_and_skips_the_chart(tmp_path, capsys, caplog, monkeypatch):
    """Issue 31 item 7: without matplotlib (a plain pip install) the run still writes its JSON and
    Markdown and says in one line that the chart was skipped; it never fails for a picture."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    caplog.set_level("WARNING")
    out = tmp_path / "out"
    rc = main(FAST + ["--mode", "reference", "--no-decode", "--out_dir", str(out), "--name", "b"])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["b.json", "b.md"]
    lines = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert lines == ["matplotlib is not installed: b.png skipped (pip install matplotlib, or the [bench] extra)"]
    assert "| reference |" in capsys.readouterr().out


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("x")
    assert main(["--device", "cpu", "--quiet", "--out_dir", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wan-benchmark: error: --out_dir is not a directory: {f}"]


def test_unwritable_results_keep_the_table(tmp_path, capsys, monkeypatch):
    """If the files cannot be written at the end, the table still reaches stdout and the error is one line."""
    import wan_triton.benchmark as bt

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bt, "plot", full_disk)
    out = tmp_path / "out"
    rc = main(["--device", "cpu", "--quiet", "--out_dir", str(out), "--mode", "reference", "--num_runs", "1",
               "--warmup", "0", "--sample_steps", "2", "--frame_num", "5"])
    cap = capsys.readouterr()
    assert rc == 3 and "| mode |" in cap.out  # an I/O failure: exit code 3
    assert cap.err.strip().splitlines()[-1] == f"wan-benchmark: error: cannot write the results to {out}: " \
                                                "No space left on device"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_module_entry_point_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wan_triton.benchmark", "--num_runs", "0", "--device", "cpu",
                        "--out_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["wan-benchmark: error: --num_runs must be >= 1, got 0"]
    assert not (tmp_path / "o").exists()


def test_metrics():
    a = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert psnr_uint8(a, a) == math.inf
    b = a.clone()
    b.view(-1)[0] = 255 if a.view(-1)[0] < 128 else 0
    d = abs(int(b.view(-1)[0]) - int(a.view(-1)[0]))
    assert psnr_uint8(a, b) == pytest.approx(10 * math.log10(255 ** 2 / (d ** 2 / a.numel())))
    x = torch.randn(100, dtype=torch.float64)
    assert rel_err(x, x) == 0 and rel_err(2 * x, x) == pytest.approx(1.0)


# ------------------------------------------------------------------ speed-up wording and the chart

def _mode(totals, steps, **settings):
    runs = [dict(total=t, text_encode=0.1, steps=list(steps), moves=[], decode=0.2, peak_mem_gb=0.0,
                 experts=["high"] * len(steps)) for t in totals]
    base = dict(triton=False, compile=False, tf32=False, use_batched_cfg=False, offload="none", t5_cpu=False,
                attention="auto -> sdpa")
    med = sorted(totals)[len(totals) // 2]
    return dict(runs=runs, total=med, median_run=totals.index(med), settings={**base, **settings},
                steps=list(steps), experts=["high"] * len(steps), text_encode=0.1, offload=0.0, decode=0.2, step_mean=0.5,
                extrapolated_s=1.0, extrapolated=False, full_steps=2)


def _report(ref, opt):
    from wan_triton.benchmark import timing_verdict

    cmp_ = dict(speedup_total=ref["total"] / opt["total"], speedup_per_step=1.0, speedup_extrapolated=1.0,
                **timing_verdict(ref, opt))
    config = dict(task="tiny", size="128*128", frame_num=5, sample_steps=2, full_steps=8)
    return dict(config=config, modes=dict(reference=ref, optimized=opt), comparison=cmp_,
                environment=dict(device_name="cpu"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_computation_never_claims_a_speedup(seed):
    from wan_triton.report import speedup_text

    g = torch.Generator().manual_seed(seed)
    ref_t = (10 + 5 * torch.rand(3, generator=g)).tolist()
    opt_t = (5 + 2 * torch.rand(3, generator=g)).tolist()        # "faster", but nothing differs
    rep = _report(_mode(ref_t, [0.5, 0.6]), _mode(opt_t, [0.5, 0.6], triton=True, patched=0))
    assert rep["comparison"]["verdict"] == "same"
    for short in (False, True):
        text = speedup_text(rep, short=short)
        assert "same computation" in text and not re.search(r"\d\.\d+x", text)
    assert "run-to-run spread" in speedup_text(rep)


def test_overlapping_runs_are_no_measurable_difference():
    from wan_triton.report import speedup_text

    rep = _report(_mode([12.87, 12.0, 13.5], [0.5]), _mode([12.6, 11.8, 13.9], [0.5], triton=True, patched=6))
    c = rep["comparison"]
    assert c["verdict"] == "noise"
    spread = 100 * (13.9 - 11.8) / 12.6
    assert speedup_text(rep).startswith(f"no measurable difference (within run-to-run spread {spread:.1f}%: "
                                        "min-max of 3 run totals)")
    assert not re.search(r"\d\.\d+x", speedup_text(rep)) and not re.search(r"\d\.\d+x", speedup_text(rep, True))


def test_disjoint_runs_give_the_ratio_with_the_spread():
    from wan_triton.report import speedup_text

    rep = _report(_mode([12.9, 12.8, 13.0], [0.5]), _mode([10.1, 10.0, 10.3], [0.4], triton=True, patched=6))
    assert rep["comparison"]["verdict"] == "measured"
    text = speedup_text(rep)
    assert f"**{12.9 / 10.1:.2f}x**" in text and "run-to-run spread: reference 1.6%, optimized 3.0%" in text
    assert speedup_text(rep, short=True) == f"speedup {12.9 / 10.1:.2f}x (spread 3%)"


@pytest.mark.parametrize("runs", [1, 2])
def test_fewer_than_three_runs_claim_no_ratio(runs):
    """Issue 22: with 1 or 2 timed runs per mode no ratio is claimed (the spread of per-step times
    said nothing about totals that are mostly the decode), and the report says why."""
    from wan_triton.report import speedup_text

    rep = _report(_mode([10.0, 10.1][:runs], [0.50, 0.51, 0.52]),
                  _mode([8.0, 8.1][:runs], [0.40, 0.41, 0.42], use_batched_cfg=True))
    c = rep["comparison"]
    assert c["verdict"] == c["step_verdict"] == "too_few" and c["runs_per_mode"] == runs and c["min_runs"] == 3
    text, short = speedup_text(rep), speedup_text(rep, short=True)
    assert not re.search(r"\d\.\d+x", text) and not re.search(r"\d\.\d+x", short) and "**" not in text
    assert f"{runs} timed run(s) per mode, and a ratio needs >= 3 (--num_runs 3)" in text
    assert short == f"no ratio claimed ({runs} timed run(s) per mode, needs 3)"


def test_each_ratio_is_tested_against_the_spread_of_its_own_quantity():
    """Totals apart but mean step times overlapping: the total's ratio is claimed with the spread of
    the totals, the per-step ratio is not (and the other way round: no total ratio)."""
    from wan_triton.report import speedup_text

    ref = _mode([12.9, 12.8, 13.0], [0.5])
    opt = _mode([10.1, 10.0, 10.3], [0.5], triton=True, patched=6)
    for r, st in zip(ref["runs"], ([0.50, 0.60], [0.55, 0.56], [0.52, 0.58])):
        r["steps"] = st
    for r, st in zip(opt["runs"], ([0.54, 0.56], [0.50, 0.53], [0.57, 0.55])):
        r["steps"] = st
    rep = _report(ref, opt)
    c = rep["comparison"]
    assert (c["verdict"], c["step_verdict"]) == ("measured", "noise")
    assert c["spread"]["reference"]["basis"] == "min-max of 3 run totals"
    assert c["step_spread"]["reference"]["basis"] == "min-max of 3 per-run mean step times"
    text = speedup_text(rep)
    assert f"**{12.9 / 10.1:.2f}x**" in text and "per step: no measurable difference" in text
    ref2 = _mode([12.9, 10.0, 13.0], [0.5])  # totals overlap, steps apart: no ratio at all
    opt2 = _mode([10.1, 12.95, 10.3], [0.4], triton=True, patched=6)
    c2 = _report(ref2, opt2)["comparison"]
    assert (c2["verdict"], c2["step_verdict"]) == ("noise", "measured")
    assert not re.search(r"\d\.\d+x", speedup_text(_report(ref2, opt2)))


def test_table_and_chart_show_the_same_median_run(tmp_path, monkeypatch):
    """With an even number of runs the table's total is a real run's (the lower median), the one
    whose stages the chart stacks; the Markdown names it."""
    import matplotlib.pyplot as plt

    from wan_triton.benchmark import ModeResult, markdown, plot, summarize

    modes = {}
    for name, totals in (("reference", [12.0, 14.0]), ("optimized", [9.0, 7.0])):
        res = ModeResult(mode=name, settings=dict(triton=False))
        res.runs = [dict(total=t, text_encode=0.5, steps=[t / 4, t / 4], moves=[], decode=t / 4, peak_mem_gb=None,
                         experts=["high", "low"]) for t in totals]
        modes[name] = summarize(res, full_steps=2, decoded=True).to_dict()
    assert modes["reference"]["total"] == 12.0 and modes["optimized"]["total"] == 7.0  # not 13.0 / 8.0
    rep = _report(modes["reference"], modes["optimized"])
    rep["config"].update(sample_solver="unipc", weights="random", device="cpu", decode=True, base_seed=42,
                         num_runs=2, warmup=0)
    rep["comparison"].update(latents_rel_err=0.0, latents_max_abs_err=0.0, psnr_db="inf")
    rep["environment"].update(torch="x", triton=None, git_commit=None, git_dirty=None, date="d", command="c")
    md = markdown(rep)
    assert "| 12.00 |" in md and "| 7.00 |" in md and "| n/a |" in md
    assert "reference: run 1 of 2, optimized: run 2 of 2" in md
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    plot(rep, tmp_path / "c.png")
    labels = sorted(t.get_text().strip() for t in figs[0].axes[0].texts)
    assert labels == ["12.00 s", "7.00 s"]


def test_offload_is_its_own_stage_and_in_the_extrapolation():
    """Placing the experts (model offload; 22 s of a 720p run on an H100, 2026-12-07, copying the
    last expert to host memory) is a column of the table and part of the extrapolated video, and a
    report whose timed steps ran one expert says that a full run's expert switch is not in it."""
    from wan_triton.benchmark import ModeResult, markdown, summarize

    modes = {}
    for name, off in (("reference", 3.0), ("optimized", 2.0)):
        res = ModeResult(mode=name, settings=dict(triton=False))
        res.runs = [dict(total=20.0, text_encode=0.5, steps=[4.0, 4.0], moves=[0.0, 0.0, off], decode=1.5, peak_mem_gb=None,
                         experts=["high", "high"])]
        modes[name] = summarize(res, full_steps=40, decoded=True).to_dict()
    assert modes["reference"]["offload"] == 3.0
    assert modes["reference"]["extrapolated_s"] == pytest.approx(0.5 + 40 * 4.0 + 3.0 + 1.5)
    rep = _report(modes["reference"], modes["optimized"])
    rep["config"].update(sample_solver="unipc", weights="random", device="cpu", decode=True, base_seed=42,
                         num_runs=1, warmup=0, full_steps=40)
    rep["comparison"].update(latents_rel_err=0.0, latents_max_abs_err=0.0, psnr_db="inf")
    rep["environment"].update(torch="x", triton=None, git_commit=None, git_dirty=None, date="d", command="c")
    md = markdown(rep)
    assert "| offload s |" in md and "| reference | 0.50 | 4.000 | 3.00 | 1.50 | 20.00 | 165.00 |" in md
    assert "ran the high-noise expert only" in md
    for m in modes.values():
        m["experts"] = ["high", "low"]
    assert "expert only" not in markdown(rep)


def test_chart_title_and_bar_labels(tmp_path, monkeypatch):
    """The title follows the speed-up rule; each bar's label is the number where the bar ends."""
    import matplotlib.pyplot as plt

    from wan_triton.report import plot, speedup_text

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    ref = _mode([12.87, 12.0, 13.5], [0.5, 0.6])
    ref["runs"][0].update(total=12.87, text_encode=1.0, steps=[5.0, 6.0], decode=0.5)  # 0.37 s of other work
    rep = _report(ref, _mode([12.6, 11.8, 13.9], [0.5, 0.6], triton=True, patched=6))
    plot(rep, tmp_path / "c.png")
    ax = figs[0].axes[0]
    assert ax.get_title().endswith(": " + speedup_text(rep, short=True)) and "x (" not in ax.get_title()
    ends = {}
    for bar in ax.patches:
        y = round(bar.get_y() + bar.get_height() / 2)
        ends[y] = max(ends.get(y, 0.0), bar.get_x() + bar.get_width())
    labels = {round(t.get_position()[1]): t for t in ax.texts}
    assert sorted(ends) == sorted(labels) == [0, 1]
    for y, end in ends.items():
        assert labels[y].get_position()[0] == pytest.approx(end)
        assert labels[y].get_text().strip() == f"{end:.2f} s"
    assert ends[0] == pytest.approx(12.87)   # the reference's median run, all of it


def test_out_dir_help_and_error_name_the_real_files(tmp_path, capsys):
    from wan_triton.benchmark import build_parser

    assert "bench/out, relative to the current directory" in " ".join(build_parser().format_help().split())
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)   # the chart's path is taken by a folder
    assert main(["--device", "cpu", "--quiet", "--out_dir", str(out), "--name", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wan-benchmark: error: --out_dir: output path is a directory: {out / 'b.png'}"]


def test_rel_err_is_shared():
    import wan_triton.metrics as util
    import wan_triton.benchmark as bt

    assert bt.rel_err is util.rel_err
    x = torch.randn(7, dtype=torch.float64)
    assert util.rel_err(x, torch.zeros(7)) == math.inf and util.rel_err(torch.zeros(3), torch.zeros(3)) == 0


def test_save_frames_and_compare_across_runs(tmp_path, capsys):
    """Two separate runs with --save_frames (same seed) compare as identical; a different seed does not."""
    from bench.compare_frames import main as compare

    out = tmp_path / "out"
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(FAST + ["--mode", "optimized", "--out_dir", str(out), "--name", name, "--save_frames",
                            "--base_seed", seed]) == 0
    assert (out / "a.frames.pt").is_file() and not list(out.glob(".*partial*"))
    saved = torch.load(out / "a.frames.pt", weights_only=False)
    fr = saved["modes"]["optimized"]["frames"]
    assert fr.dtype == torch.uint8 and fr.shape[0] == 5 and fr.shape[-1] == 3  # [T, H, W, C] uint8, 5 frames
    capsys.readouterr()
    assert compare([str(out / "a.frames.pt"), str(out / "b.frames.pt"), "--out", str(tmp_path / "ab.json")]) == 0
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert ab["psnr_db"] == "inf" and ab["latents_rel_err"] == 0.0
    with pytest.raises(SystemExit, match="base_seed"):
        compare([str(out / "a.frames.pt"), str(out / "c.frames.pt")])
