"""The step cache (wan.step_cache, wan.mag_ratios) on the tiny task, CPU.

- a run that reuses nothing computes exactly the exact output (the hook path is exact);
- what is counted is what ran: the experts' block hooks see `blocks_run` calls;
- the first and last steps and each expert's first step always run; nothing crosses the switch;
- the CFG-branch cache derives uncond = cond + (uncond - cond) of its last run;
- the magnitude ratios: measured, written, read back, refused for another model, schedule or range;
- with block streaming (bit-identical to resident) and with a merged LoRA;
- the plan's rows and the CLI's checks (also tests/test_plan.py), the benchmark's JSON.
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from wan import step_cache as sc
from wan.mag_ratios import CacheError, fingerprint, load_ratios, ratios_dir, ratios_file_name
from wan.pipeline import WanT2V
from wan.step_cache import CachePolicy, enable_step_cache

ARGS = dict(size="128*128", frame_num=1, sampling_steps=12, seed=7, progress=False, return_latents=True)
PROMPT = "a red fox runs through snow"


@pytest.fixture(scope="module")
def pipe():
    p = WanT2V.from_config("tiny", device="cpu", seed=0)
    p.block_calls = [0]
    for m in (p.high_noise_model, p.low_noise_model):
        for b in m.blocks:
            b.register_forward_hook(lambda *a: p.block_calls.__setitem__(0, p.block_calls[0] + 1))
    return p


@pytest.fixture(scope="module")
def exact(pipe):
    return pipe.generate(PROMPT, **ARGS)


def run(pipe, policy, **kw):
    """(latents, CacheStats, block hook calls) of one generation under `policy`."""
    undo = enable_step_cache(pipe, policy)
    try:
        pipe.block_calls[0] = 0
        out = pipe.generate(PROMPT, **{**ARGS, **kw})
        return out, pipe.last_timings.cache, pipe.block_calls[0]
    finally:
        undo()


def test_nothing_reused_is_exact(pipe, exact):
    """Threshold 0 (no step can stay under it) and the recording run go through the cache's block
    hook and compute every block: bit for bit the exact output."""
    for policy in (CachePolicy("easy", 0.0), CachePolicy(blocks=(0, 1), record=True)):
        out, st, calls = run(pipe, policy)
        assert torch.equal(out, exact), policy
        assert st.reused == 0 and st.uncond_reused == 0 and st.blocks_run == st.blocks_total == calls == 48
    assert pipe.high_noise_model.step_cache is None and pipe.low_noise_model.step_cache is None  # detached


@pytest.mark.parametrize("policy", [CachePolicy("easy", 0.5, max_skips=4), CachePolicy(cfg_interval=3),
                                    CachePolicy("easy", 0.5, cfg_interval=2, blocks=(1, 2))])
def test_what_is_counted_is_what_ran(pipe, exact, policy):
    out, st, calls = run(pipe, policy)
    assert st.blocks_run == calls < st.blocks_total == 48  # the block hooks (the quality gate's count) agree
    assert st.saved == pytest.approx(48 / calls)
    assert len(st.steps) == 12 and st.forwards + st.reused + st.uncond_reused == 24
    rel = ((out - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.05, rel  # lossy, and close
    experts = pipe.last_timings.experts
    switch = experts.index("low")
    for i in (0, switch, 11):  # first, the first low-noise step, last: computed, both branches
        assert st.steps[i] == "run", (i, st.steps)
    assert all(s.startswith("run") for s in st.steps[:2])  # warmup 0.1 of 12 steps = 2, and easy needs its rate


def test_max_skips_and_a_high_threshold(pipe):
    _, st, _ = run(pipe, CachePolicy("easy", 1e9, max_skips=2))
    runs = "".join("r" if s == "run" else "s" for s in st.steps)
    assert "sss" not in runs and runs.count("s") >= 4, runs


def test_cfg_branch_cache_derives_uncond(monkeypatch, pipe):
    """On a step without the unconditional forward, the combined velocity is
    cfg_combine(cond + d, cond, scale), d = uncond - cond of the last step both ran."""
    seen = []
    real = sc.CacheRun.uncond_of

    def spy(self, cond):
        u = real(self, cond)
        seen.append(torch.equal(u, cond + self._delta) and self._uncond_at >= 0)
        return u
    monkeypatch.setattr(sc.CacheRun, "uncond_of", spy)
    _, st, _ = run(pipe, CachePolicy(cfg_interval=2))
    assert st.uncond_reused == len(seen) > 0 and all(seen)
    assert [s.endswith("+cfg") for s in st.steps].count(True) == st.uncond_reused


def test_batched_cfg_takes_the_same_decisions(pipe):
    a, sa, _ = run(pipe, CachePolicy("easy", 0.5, cfg_interval=2))
    pipe.use_batched_cfg = True
    try:
        b, sb, _ = run(pipe, CachePolicy("easy", 0.5, cfg_interval=2))
    finally:
        pipe.use_batched_cfg = False
    assert sa.steps == sb.steps
    assert ((a - b).norm() / a.norm()).item() < 2e-2  # batch-2 vs batch-1 rounding, as test_pipeline


def test_nothing_crosses_the_expert_switch(monkeypatch, pipe):
    """The residuals and the CFG difference are dropped at the first step of each expert."""
    stored = []
    real = sc.CacheRun.begin

    def spy(self, step, latent):
        real(self, step, latent)
        stored.append((step.expert_start, dict(self._residual), self._delta, self.reuse_blocks, self.reuse_uncond))
    monkeypatch.setattr(sc.CacheRun, "begin", spy)
    run(pipe, CachePolicy("easy", 1e9, cfg_interval=4, max_skips=8))
    starts = [s for s in stored if s[0]]
    assert len(starts) == 2 and all(not r and d is None and not rb and not ru for _, r, d, rb, ru in starts)


# ---------------------------------------------------------------- magnitude ratios

@pytest.fixture(scope="module")
def ratios(pipe, tmp_path_factory):
    r = sc.calibrate(pipe, [PROMPT], steps=12, shift=12.0, size="128*128", frame_num=1, progress=False)
    folder = tmp_path_factory.mktemp("ckpt")
    r.save(ratios_dir(folder) / ratios_file_name("unipc", 12, 12.0))
    return r, folder


def test_calibration_round_trip(pipe, ratios):
    r, folder = ratios
    assert r.fingerprint == fingerprint(pipe) and r.steps == 12 and set(r.ratios) == {"cond", "uncond"}
    assert r.ratios["cond"][0] == 1.0 and all(x > 0 for v in r.ratios.values() for x in v)
    (back,) = load_ratios(ratios_dir(folder))
    assert dataclasses.replace(back, path="") == r
    assert json.loads((ratios_dir(folder) / "unipc_12steps_shift12.json").read_text())["kind"] == \
        "wan step-cache magnitude ratios"


def test_mag_reads_the_ratios_beside_the_checkpoint(pipe, exact, ratios):
    _, folder = ratios
    pipe.ckpt_dir = folder
    try:
        out, st, calls = run(pipe, CachePolicy("mag", 1e9))
        assert st.reused > 0 and calls == st.blocks_run
        zero, st0, _ = run(pipe, CachePolicy("mag", 0.0))
        assert torch.equal(zero, exact) and st0.reused == 0
    finally:
        pipe.ckpt_dir = None


def test_mag_refuses_other_ratios(pipe, ratios, tmp_path):
    r, folder = ratios
    other = dataclasses.replace(r, fingerprint="sha256:" + "0" * 64)
    other.save(tmp_path / "other.json")
    with pytest.raises(CacheError, match=r"^.*other.json were measured on another model \(tiny") as e:
        enable_step_cache(pipe, CachePolicy("mag", ratios_file=str(tmp_path / "other.json")))
    assert "\n" not in str(e.value)
    with pytest.raises(CacheError, match=r"were measured over blocks \(0, 2\), and the cache reuses blocks \(1, 2\)"):
        enable_step_cache(pipe, CachePolicy("mag", blocks=(1, 2), ratios_file=str(folder / "mag_ratios")))
    undo = enable_step_cache(pipe, CachePolicy("mag", ratios_file=str(folder / "mag_ratios")))
    try:
        with pytest.raises(CacheError, match=r"no magnitude ratios for sample_solver='unipc', sampling_steps=6, "
                                             r"shift=12 \(there are: sample_solver='unipc', sampling_steps=12, "
                                             r"shift=12 \(unipc_12steps_shift12.json\)\)"):
            pipe.generate(PROMPT, **{**ARGS, "sampling_steps": 6})
    finally:
        undo()
    with pytest.raises(CacheError, match=r"^cache='mag' needs the magnitude ratios of this model, and random "
                                           r"weights have no checkpoint folder to find them beside: give "
                                           r"cache_ratios=<file> \(docs/caching.md\)$"):
        enable_step_cache(pipe, CachePolicy("mag"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**r.to_json(), "ratios": {"cond": [1.0]}}))
    with pytest.raises(CacheError, match="malformed magnitude-ratio file"):
        load_ratios(bad)


@pytest.mark.parametrize("policy, msg", [
    (CachePolicy("fast"), "cache='fast' is not a step cache"),
    (CachePolicy("easy", float("nan")), "cache_threshold must be a finite number >= 0, got nan"),
    (CachePolicy(cfg_interval=-1), "cache_cfg must be a whole number >= 0"),
    (CachePolicy("easy", blocks=(1, 3)), r"block range \(1, 3\) is not within the model's 2 blocks"),
    (CachePolicy("easy", warmup=1.5), "warmup is a share of the steps"),
])
def test_bad_policies_are_one_line(pipe, policy, msg):
    with pytest.raises(CacheError, match=msg) as e:
        enable_step_cache(pipe, policy)
    assert "\n" not in str(e.value) and pipe.step_cache is None


def test_cfg_cache_is_refused_under_cfg_parallel(pipe):
    pipe.parallel = type("P", (), {"cfg_parallel": True, "world": 2})()
    try:
        with pytest.raises(CacheError, match=r"cache_cfg=2 derives the unconditional branch .* cfg_parallel=True"):
            enable_step_cache(pipe, CachePolicy(cfg_interval=2))
    finally:
        pipe.parallel = None


# ---------------------------------------------------------------- with the pipeline's other parts

def test_with_block_streaming(exact):
    """Streaming is bit-identical to resident weights, so the same cached run gives the same bits
    (the skipped blocks are never called, the streamer's ring keeps its order)."""
    policy = CachePolicy("easy", 0.5, cfg_interval=2)
    a = WanT2V.from_config("tiny", device="cpu", seed=0)
    b = WanT2V.from_config("tiny", device="cpu", seed=0)
    b.enable_block_streaming(ring=2, allow_cpu=True)
    outs = []
    for p in (a, b):
        enable_step_cache(p, policy)
        outs.append(p.generate(PROMPT, **ARGS))
        assert p.last_timings.cache.reused > 0
    assert torch.equal(outs[0], outs[1])
    assert a.last_timings.cache.steps == b.last_timings.cache.steps


def test_with_a_merged_lora(tmp_path, seed):
    p = WanT2V.from_config("tiny", device="cpu", seed=0)
    g = torch.Generator().manual_seed(seed)
    f = tmp_path / "l.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 64, generator=g),
               "blocks.0.self_attn.q.lora_B.weight": torch.randn(64, 4, generator=g)}, str(f))
    enable_step_cache(p, CachePolicy("easy", 0.5))
    before = p.generate(PROMPT, **ARGS)
    p.load_lora(f, strength=1.0)
    after = p.generate(PROMPT, **ARGS)
    assert p.last_timings.cache.reused > 0 and not torch.allclose(before, after)
    p.unload_loras()
    assert torch.equal(p.generate(PROMPT, **ARGS), before)


# ---------------------------------------------------------------- the command lines

def test_flags_become_the_plan_and_reach_the_pipeline():
    from wan_triton import accel, request
    from wan_triton.generate import build_parser

    args = build_parser().parse_args(["--device", "cpu", "--cache", "easy", "--cache_threshold", "0.2",
                                      "--cache_cfg", "3"])
    req = request.parse_request(args, "tiny")
    assert req.plan.cache == CachePolicy("easy", 0.2, 3)
    assert request.parse_request(build_parser().parse_args(["--device", "cpu"]), "tiny").plan.cache is None
    p = WanT2V.from_config("tiny", device="cpu", seed=0)
    applied = accel.optimize(p, "none", triton=False, cache="easy", cache_cfg=2)  # the API's words
    assert p.step_cache == CachePolicy("easy", cfg_interval=2) and applied.cache.startswith("easy (threshold")
    accel.optimize(p, "none", triton=False)  # cache=None leaves it
    assert p.step_cache is not None
    accel.optimize(p, "none", triton=False, cache="none")
    assert p.step_cache is None


def _one_line_exit_2(main, argv, capsys, msg):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    return err[0]


@pytest.mark.parametrize("extra, msg", [
    (["--cache_threshold", "0.1"], "--cache_threshold 0.1 is the threshold of a step cache, and none is on "
                                   "(--cache none): add --cache easy or --cache mag"),
    (["--cache", "mag"], "--cache mag needs the magnitude ratios of this model, and random weights have no "
                         "checkpoint folder to find them beside: give --cache_ratios <file>"),
    (["--cache", "mag", "--cache_ratios", "{folder}", "--sample_steps", "6"],
     "no magnitude ratios for --sample_solver unipc, --sample_steps 6, --sample_shift 12 (there are: "
     "--sample_solver unipc, --sample_steps 12, --sample_shift 12 (unipc_12steps_shift12.json))"),
    (["--cache", "easy", "--cache_cfg", "-1"], "--cache_cfg must be a whole number >= 0 (0: off), got -1"),
    (["--cache", "easy", "--cache_threshold", "inf"], "--cache_threshold must be a finite number >= 0, got inf"),
])
def test_cli_refuses_before_any_model(tmp_path, capsys, ratios, extra, msg):
    from wan_triton.generate import main

    folder = str(ratios_dir(ratios[1]))
    argv = [a.format(folder=folder) for a in extra] + ["--task", "tiny", "--device", "cpu",
                                                       "--save_file", str(tmp_path / "v.mp4")]
    _one_line_exit_2(main, argv, capsys, msg)
    assert not (tmp_path / "v.mp4").exists()


def test_cli_refuses_ratios_of_another_model(tmp_path, capsys, ratios):
    from wan_triton.generate import main

    other = dataclasses.replace(ratios[0], fingerprint="sha256:" + "1" * 64, path="")
    other.save(tmp_path / "r" / "o.json")
    argv = ["--task", "tiny", "--device", "cpu", "--no-triton", "--frame_num", "1", "--sample_steps", "12",
            "--cache", "mag", "--cache_ratios", str(tmp_path / "r"), "--save_file", str(tmp_path / "v.mp4")]
    _one_line_exit_2(main, argv, capsys, "o.json were measured on another model (tiny, sha256:111111111111)")
    assert not (tmp_path / "v.mp4").exists()


def test_calibrate_cli(tmp_path, capsys):
    from wan_triton.calibrate import main

    out = tmp_path / "r.json"
    assert main(["--task", "tiny", "--device", "cpu", "--quiet", "--frame_num", "1", "--sample_steps", "4", "--out",
                 str(out)]) == 0
    (r,) = load_ratios(out)
    assert r.steps == 4 and r.solver == "unipc" and r.calibration.size == "128*128" and r.model == "tiny"
    assert r.fingerprint == fingerprint(WanT2V.from_config("tiny", device="cpu", seed=0))  # the demo's model
    _one_line_exit_2(main, ["--task", "tiny", "--device", "cpu"], capsys, "random weights have no checkpoint folder to write the "
                                                        "ratios beside: give --out FILE")


def test_benchmark_json_counts_the_reused_forwards(tmp_path):
    from wan_triton.benchmark import main

    rc = main(["--task", "tiny", "--size", "128*128", "--frame_num", "1", "--sample_steps", "8", "--num_runs", "1",
               "--warmup", "0", "--device", "cpu", "--quiet", "--no-triton", "--no-decode", "--mode", "both",
               "--cache", "easy",
               "--cache_threshold", "1e9", "--out_dir", str(tmp_path), "--name", "c"])
    assert rc == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    ref, opt = rep["modes"]["reference"], rep["modes"]["optimized"]
    assert ref["settings"]["cache"] == "off" and ref["runs"][0]["cache"] is None
    assert opt["settings"]["cache"].startswith("easy (threshold 1e+09")
    c = opt["runs"][0]["cache"]
    assert c["reused"] > 0 and c["blocks_run"] < c["blocks_total"] == 32 and len(c["steps"]) == 8
    assert rep["comparison"]["verdict"] != "same"  # the cache changes what is computed
