"""bench/cache_sweep.py and bench/bench_cache.py end to end on the tiny preset (random weights: the
plumbing, not the quality; the gate's numbers come from the trained demo model, docs/caching.md)."""
import json

import pytest

from bench.bench_cache import main as bench_cache

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_the_table_and_the_plot(tmp_path):
    pytest.importorskip("bench.quality", reason="the quality gate (bench/quality.py, branch demo) is not here yet")
    from bench.cache_sweep import main

    out = tmp_path / "sw"
    assert main(["--task", "tiny", "--random", "--device", "cpu", "--prompts", "1", "--steps", "8",
                 "--frame_num", "1", "--thresholds", "0.05,1e9", "--cfg", "2", "--out", str(out)]) == 0
    rep = json.loads((tmp_path / "sw.json").read_text())
    modes = [r["mode"] for r in rep["rows"]]
    assert modes == ["exact", "easy 0.05", "easy 1e+09", "mag 0.05", "mag 1e+09", "cfg 2", "easy 1e+09 + cfg 2",
                     "mag 1e+09 + cfg 2"]
    assert rep["ratios"].endswith("sw.mag_ratios/unipc_8steps_shift12.json")  # measured for the schedule
    saved = {r["mode"]: r["forwards_saved"] for r in rep["rows"]}
    assert saved["exact"] == 0 and saved["easy 1e+09"] > 0 and saved["cfg 2"] > 0  # the gate's hooks see it
    md = (tmp_path / "sw.md").read_text()
    assert "| easy 0.05 | yes | 1 |" in md and ">= 24 dB:" in md and ">= 30 dB:" in md
    assert (tmp_path / "sw.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bench_cache_extrapolates_from_the_sweep(tmp_path):
    sweep = tmp_path / "sw.json"
    sweep.write_text(json.dumps({"rows": [
        {"mode": "exact", "lossy": False, "skipped": "", "forwards_saved": 0.0},
        {"mode": "easy 0.1", "lossy": True, "skipped": "", "forwards_saved": 0.5}]}))
    out = tmp_path / "t.json"
    assert bench_cache(["--task", "tiny", "--size", "128*128", "--frame_num", "1", "--device", "cpu", "--no-triton",
                        "--runs", "1", "--warmup", "0", "--sweep", str(sweep), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    (row,) = r["settings"]
    assert row["setting"] == "easy 0.1" and row["kept"] == 0.5
    assert row["denoise_s"] == pytest.approx(80 * (0.5 * r["full_s"] + 0.5 * r["reused_s"]) + 40 * r["decision_s"])
    assert r["exact_denoise_s"] == pytest.approx(80 * r["full_s"])
