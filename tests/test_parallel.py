"""Multi-process generation (wan.parallel) on CPU with gloo, against one process on the same inputs.

One spawn of 2 processes and one of 4 each run several checks (spawning costs seconds per
process, the checks themselves are small). Every rank also computes the one-process result
itself, so the comparison needs no extra communication; rank 0 writes the relative errors to
a JSON file that the tests read. fp32 throughout: tolerance 1e-5 relative.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from wan import parallel
from wan.parallel import ParallelError
from wan.step_cache import CachePolicy
from wan_triton import request
from wan_triton.exits import CLIError
from wan_triton.plan import DeviceInfo

REL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _same_on_all_ranks(x: torch.Tensor) -> bool:
    import torch.distributed as dist

    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x.contiguous())
    return all(torch.equal(xs[0], y) for y in xs)


# ---------------------------------------------------------------- checks run inside the workers

def _forward_case(ulysses: int, seed: int):
    """A tiny fp32 DiT with random weights and inputs of 45 tokens (U does not divide them)."""
    from wan.configs import get_config
    from wan.dit import WanModel

    cfg = get_config("tiny").dit
    if cfg.num_heads % ulysses:
        from dataclasses import replace
        cfg = replace(cfg, num_heads=ulysses * 2)  # head_dim 64 / 8 = 8 pairs, still a 3-axis split
    model = WanModel.from_config(cfg, dtype=torch.float32, seed=seed, zero_head=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)                    # 3*3*5 = 45 tokens
    t = torch.tensor([700.0])
    ctx = [torch.randn(7, cfg.text_dim, generator=g)]
    return model, x, t, ctx, -(-45 // ulysses) * ulysses


def _check_forward(ulysses: int, seed: int) -> dict:
    """One DiT forward (random fp32 weights, a sequence U does not divide) with Ulysses U."""
    model, x, t, ctx, padded = _forward_case(ulysses, seed)
    ref = model(x, t, ctx, seq_len=padded)     # one process at the length Ulysses pads to
    ref_padded = model(x, t, ctx, seq_len=50)  # official-style padding (seq_len given) too
    ref_unpadded = model(x, t, ctx)
    state = parallel.build_state(ulysses_size=ulysses)
    with parallel.sequence_parallel(model, state.ulysses):
        out = model(x, t, ctx)
        out_padded = model(x, t, ctx, seq_len=50)
    return {"rel": _rel(out, ref), "rel_padded": _rel(out_padded, ref_padded),
            "rel_unpadded": _rel(out, ref_unpadded), "same": _same_on_all_ranks(out)}


def _check_forward_patched(ulysses: int, seed: int) -> dict:
    """The same forward with wan_triton.patch() (the Triton kernels; TRITON_INTERPRET=1 on CPU),
    strict: a kernel fallback raises. Each rank's q/k RoPE runs the kernel at its token_offset."""
    import wan_triton

    model, x, t, ctx, padded = _forward_case(ulysses, seed)
    ref = model(x, t, ctx, seq_len=padded)  # reference ops, one process
    state = parallel.build_state(ulysses_size=ulysses)
    with wan_triton.patched(strict=True):
        one = model(x, t, ctx, seq_len=padded)  # kernels, one process
        wan_triton.reset_kernel_stats()
        with parallel.sequence_parallel(model, state.ulysses):
            out = model(x, t, ctx)
        stats = wan_triton.kernel_stats()
    return {"rel_one_patched": _rel(out, one), "rel_reference": _rel(out, ref), "same": _same_on_all_ranks(out),
            "rope_launches": stats["rms_norm_rope"]["launches"],
            "fallbacks": sum(s["fallbacks"] for s in stats.values())}


def _check_forward_tokens(ulysses: int, seed: int) -> dict:
    """The TI2V image mode under Ulysses (wan_triton.patch(), strict): per-token timesteps with the
    first frame's 15 tokens at 0 over 45 + 1 padded tokens; each rank takes its part of the token
    index with its tokens."""
    import wan_triton
    from wan.configs import get_config
    from wan.dit import WanModel
    from wan.tokens import TokenTimesteps

    cfg = get_config("ti2v-tiny").dit
    model = WanModel.from_config(cfg, dtype=torch.float32, seed=seed, zero_head=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, 3, 6, 10, generator=g)  # 3 frames of 3*5 tokens
    ctx = [torch.randn(7, cfg.text_dim, generator=g)]
    padded = -(-45 // ulysses) * ulysses
    tt = TokenTimesteps.first_frame(torch.tensor(700), 15, padded)
    ref = model(x, tt, ctx, seq_len=padded)
    state = parallel.build_state(ulysses_size=ulysses)
    with wan_triton.patched(strict=True):
        one = model(x, tt, ctx, seq_len=padded)
        wan_triton.reset_kernel_stats()
        with parallel.sequence_parallel(model, state.ulysses):
            out = model(x, tt, ctx, seq_len=padded)
        stats = wan_triton.kernel_stats()
    return {"rel_one_patched": _rel(out, one), "rel_reference": _rel(out, ref), "same": _same_on_all_ranks(out),
            "rows_launches": stats["modulate_rows"]["launches"],
            "fallbacks": sum(s["fallbacks"] for s in stats.values())}


def _tiny_pipe():
    from wan.configs import get_config
    from wan.pipeline import WanT2V

    cfg = get_config("tiny").replace(param_dtype=torch.float32)
    return WanT2V.from_config(cfg, device="cpu", seed=0)


GEN = dict(size=(160, 96), frame_num=5, sampling_steps=2, progress=False)
_REF: dict = {}  # the one-process pipeline, built once per worker


def _fake_decode(z):
    """Stands in for the VAE (seconds on CPU): what matters here is who decodes."""
    return z.unsqueeze(0).mul(0.5).tanh()


def _check_generate(ulysses: int, cfg_parallel: bool, fsdp: bool = False, decode: bool = False,
                    seed: int = 0, cache=None) -> dict:
    """A 2-step generation (latents; or the decoded video) against one process; with a step cache
    (wan.step_cache.CachePolicy) 6 steps, both processes cached."""
    import torch.distributed as dist

    ref_pipe = _REF.get("pipe") or _REF.setdefault("pipe", _tiny_pipe())
    state = parallel.build_state(ulysses_size=ulysses, cfg_parallel=cfg_parallel)
    pipe = _tiny_pipe()
    parallel.apply_to_pipeline(pipe, state, dit_fsdp=fsdp, t5_fsdp=fsdp)
    if decode:
        pipe.vae.decode = ref_pipe.vae.decode = _fake_decode
    gen = GEN if cache is None else dict(GEN, sampling_steps=6)
    pipe.step_cache = ref_pipe.step_cache = cache
    try:  # seed -1 on every rank: each draws its own random seed, rank 0's is broadcast
        out = pipe.generate("a red fox", seed=-1, return_latents=not decode, **gen)
        ref = ref_pipe.generate("a red fox", seed=pipe.last_seed, return_latents=not decode, **gen)
    finally:
        ref_pipe.step_cache = None
    res = {"seed_same": _same_on_all_ranks(torch.tensor([pipe.last_seed]))}
    if cache is not None:  # every rank took the one-process decisions
        mine, one = pipe.last_timings.cache, ref_pipe.last_timings.cache
        res["reused"] = one.reused
        res["decisions_as_one_process"] = mine.steps == one.steps
        res["decisions_same"] = _same_on_all_ranks(torch.tensor([s != "run" for s in mine.steps]))
    if decode:
        res["none_off_rank0"] = (out is None) == (dist.get_rank() != 0)
        if out is not None:
            res["rel"] = _rel(out, ref)
    else:
        res["rel"] = _rel(out, ref)
        res["same"] = _same_on_all_ranks(out)
    if fsdp:
        from torch.distributed.tensor import DTensor
        w = pipe.low_noise_model.blocks[0].ffn[0].weight
        res["sharded"] = isinstance(w, DTensor) and w.to_local().shape[0] * state.world == w.shape[0]
    return res


CHECKS = {
    2: {
        "forward_u2": lambda: _check_forward(2, seed=11),
        "forward_u2_patched": lambda: _check_forward_patched(2, seed=13),
        "forward_u2_tokens": lambda: _check_forward_tokens(2, seed=17),
        "gen_u2_decode": lambda: _check_generate(2, False, decode=True),
        "gen_cfg2": lambda: _check_generate(1, True),
        "gen_u2_fsdp": lambda: _check_generate(2, False, fsdp=True),
        "gen_u2_cache": lambda: _check_generate(2, False, cache=CachePolicy("easy", 0.5, cfg_interval=2)),
        "gen_cfg2_cache": lambda: _check_generate(1, True, cache=CachePolicy("easy", 0.5)),
    },
    4: {
        "forward_u4": lambda: _check_forward(4, seed=12),
        "gen_cfg2_u2": lambda: _check_generate(2, True),
    },
}


KERNEL_CHECKS = ("forward_u2_patched", "forward_u2_tokens")  # run the Triton kernels (interpreted: CPU tensors)


def _run_check(name: str, fn) -> dict:
    """A check's results, or {"skip": why} for a kernel check where this Triton interpreter cannot run
    the kernels (Triton 3.6 with NumPy 2.4, on a GPU machine: the CPU suite stops at its start)."""
    from wan_triton import kernels

    if name in KERNEL_CHECKS and kernels.interpreter_problem():
        return {"skip": kernels.interpreter_problem()}
    return fn()


def _result(results: dict, name: str) -> dict:
    """One check's results (printed), or the test skipped with the reason the check did not run."""
    r = results[name]
    if "skip" in r:
        pytest.skip(r["skip"])
    print(r)
    return r


def _worker(rank: int, world: int, port: int, out_path: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    random.seed(1000 + rank)  # different local seeds: the broadcast must make them agree
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {name: _run_check(name, fn) for name, fn in CHECKS[world].items()}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _warm_up():
    """Build and run the tiny pipeline once in the parent, so that forked workers inherit the
    imports (the first meta-device build alone imports for seconds)."""
    import wan_triton.patch  # noqa: F401 - and the kernels' imports (triton: seconds)
    from wan_triton.kernels import rope  # noqa: F401

    pipe = _tiny_pipe()
    pipe.generate("warm", seed=0, return_latents=True, **GEN)


def _run_world(world: int, out: str) -> None:
    """Run the checks in `world` processes: forked from this warmed-up process where the platform
    allows (no re-import, ~10x cheaper than spawn), else spawned. Workers use one thread each."""
    import multiprocessing

    import torch.multiprocessing as mp

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        _warm_up()
    mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, join=True, start_method=method)


def _spawn(world: int, tmp_path_factory) -> dict:
    """The checks' results. Some run the Triton kernels on CPU tensors, which needs
    TRITON_INTERPRET=1 from the start of the process (triton.jit reads it when a kernel is defined).
    A GPU machine runs the suite without it: there the workers start from a fresh interpreter-mode
    process instead of this one."""
    out = tmp_path_factory.mktemp(f"par{world}") / "results.json"
    if os.environ.get("TRITON_INTERPRET") == "1":
        _run_world(world, str(out))
    else:
        here = Path(__file__).resolve().parent
        path = os.pathsep.join(p for p in (str(here), str(here.parent), os.environ.get("PYTHONPATH")) if p)
        r = subprocess.run([sys.executable, "-c", f"import test_parallel as t; t._run_world({world}, {str(out)!r})"],
                           env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}, cwd=here.parent,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


# ---------------------------------------------------------------- multi-process tests

def test_ulysses2_forward(two):
    r = two["forward_u2"]
    print(r)
    assert r["rel"] < REL and r["rel_padded"] < REL and r["same"]
    # vs one process without padding: CPU SDPA itself moves by ~2e-5 when masked keys are appended
    assert r["rel_unpadded"] < 1e-4


def test_ulysses2_forward_with_kernels(two):
    """Ulysses under wan_triton.patch(): the kernels take each shard's token_offset (no fallback)."""
    r = _result(two, "forward_u2_patched")
    assert r["rope_launches"] == 2 * 2 and r["fallbacks"] == 0 and r["same"]  # q and k in each of 2 layers
    assert r["rel_one_patched"] < REL
    assert r["rel_reference"] < 1e-4  # kernels vs the float64-RoPE reference, fp32


def test_ulysses2_forward_per_token_timesteps(two):
    """TI2V image mode under Ulysses: the rows kernels run on each rank's shard of the token index."""
    r = _result(two, "forward_u2_tokens")
    assert r["rows_launches"] == 2 * 2 + 1 and r["fallbacks"] == 0 and r["same"]  # 2 per block, 1 in the head
    assert r["rel_one_patched"] < REL and r["rel_reference"] < 1e-4


def test_ulysses4_forward_uneven_sequence(four):
    r = four["forward_u4"]
    print(r)
    assert r["rel"] < REL and r["rel_padded"] < REL and r["same"]
    # vs one process without padding: CPU SDPA itself moves by ~2e-5 when masked keys are appended
    assert r["rel_unpadded"] < 1e-4


def test_ulysses2_generate_decodes_on_rank0_only(two):
    r = two["gen_u2_decode"]
    print(r)
    assert r["seed_same"] and r["none_off_rank0"] and r["rel"] < REL


def test_cfg_parallel2_generate(two):
    r = two["gen_cfg2"]
    print(r)
    assert r["seed_same"] and r["same"] and r["rel"] < REL


def test_cfg_parallel2_x_ulysses2_generate(four):
    r = four["gen_cfg2_u2"]
    print(r)
    assert r["seed_same"] and r["same"] and r["rel"] < REL


@pytest.mark.parametrize("name", ["gen_u2_cache", "gen_cfg2_cache"])
def test_step_cache_takes_the_same_decisions_on_every_rank(two, name):
    """Issue 32: under torchrun the ranks take rank 0's (here: the one-process) skip decisions and
    the output equals the one-process cached output."""
    r = two[name]
    print(r)
    assert r["reused"] > 0 and r["decisions_as_one_process"] and r["decisions_same"]
    assert r["seed_same"] and r["same"] and r["rel"] < REL


def test_fsdp_ulysses2_generate(two):
    r = two["gen_u2_fsdp"]
    print(r)
    assert r["sharded"] and r["same"] and r["rel"] < REL


# ---------------------------------------------------------------- one process: pieces and validation

def test_only_the_kernel_checks_wait_for_a_working_interpreter(monkeypatch):
    """Where the interpreter is broken (a GPU machine with Triton 3.6 and NumPy 2.4) the two kernel checks
    are skipped with the reason and every other check of the world still runs; where it works, all run."""
    from wan_triton import kernels

    ran = lambda: {"ran": True}  # noqa: E731
    monkeypatch.setattr(kernels, "interpreter_problem", lambda: "fake: broken")
    assert [_run_check(n, ran) for n in CHECKS[2]] == [
        {"skip": "fake: broken"} if n in KERNEL_CHECKS else {"ran": True} for n in CHECKS[2]]
    assert set(KERNEL_CHECKS) < set(CHECKS[2])
    with pytest.raises(pytest.skip.Exception, match="fake: broken"):
        _result({"forward_u2_patched": {"skip": "fake: broken"}}, "forward_u2_patched")
    monkeypatch.setattr(kernels, "interpreter_problem", lambda: "")
    assert all(_run_check(n, ran) == {"ran": True} for n in CHECKS[2])


def test_rope_token_offset_matches_slice(seed):
    """Rows [o, o+n) of the full table == the table of n tokens at offset o (padding included)."""
    from wan.dit import rope_apply, rope_params, rope_table

    d = 32
    freqs = torch.cat([rope_params(64, d - 4 * (d // 6)), rope_params(64, 2 * (d // 6)),
                       rope_params(64, 2 * (d // 6))], dim=1)
    grid = torch.tensor([[3, 3, 5]])
    full = rope_table(grid, 48, freqs)
    for off in (0, 12, 36):
        assert torch.equal(rope_table(grid, 12, freqs, token_offset=off), full[:, off:off + 12])
    x = torch.randn(1, 48, 2, d)
    assert torch.equal(rope_apply(x[:, 36:], grid, freqs, token_offset=36), rope_apply(x, grid, freqs)[:, 36:])


TORCHRUN = lambda n: {"RANK": "0", "WORLD_SIZE": str(n), "MASTER_ADDR": "x", "LOCAL_WORLD_SIZE": str(n)}  # noqa


def _parse(monkeypatch, argv, env, gpu=False):
    """parse_request of wan-generate's flags under torchrun's `env` (on a CPU, or a GPU's facts faked:
    the plan's rows about CUDA runs)."""
    from wan_triton.generate import build_parser

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if gpu:
        monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, dev=None, fp8=False, attention=None:
                                                          DeviceInfo("cuda", "cuda", 143.7)))
        monkeypatch.setattr(request, "check_device", lambda spec: torch.device("cuda"))
    return request.parse_request(build_parser().parse_args([*argv, "--device", "cuda" if gpu else "cpu"]), "tiny")


@pytest.mark.parametrize("argv, env, gpu, msg", [
    (["--ulysses_size", "2"], {}, False, "--ulysses_size 2 needs torchrun"),
    (["--cfg_parallel"], {}, False, "--cfg_parallel needs torchrun"),
    (["--dit_fsdp"], {}, False, "--dit_fsdp needs torchrun"),
    (["--ulysses_size", "2"], TORCHRUN(4), False, "needs 2"),
    (["--ulysses_size", "2", "--cfg_parallel"], TORCHRUN(2), False, "--ulysses_size 2 x 2 (--cfg_parallel) needs 4"),
    ([], TORCHRUN(2), False, "needs 1 (N must equal --ulysses_size x 2 with --cfg_parallel, else --ulysses_size)"),
    (["--ulysses_size", "3"], TORCHRUN(3), False, "--ulysses_size 3 must divide"),
    (["--ulysses_size", "0"], TORCHRUN(1), False, "--ulysses_size 0 must be >= 1"),
    (["--dist_timeout", "0"], {}, False, "--dist_timeout must be > 0 seconds"),
    (["--ulysses_size", "2", "--dit_fsdp", "--offload_model", "True"], TORCHRUN(2), True,
     "--offload_model True cannot be combined with --dit_fsdp"),
    (["--ulysses_size", "2", "--t5_fsdp", "--t5_cpu"], TORCHRUN(2), True, "--t5_cpu cannot be combined with --t5_fsdp"),
    (["--cfg_parallel", "--use_batched_cfg"], TORCHRUN(2), True, "drop --use_batched_cfg"),
])
def test_bad_combinations_rejected(monkeypatch, argv, env, gpu, msg):
    """torchrun's world and the heads (wan.parallel.check_request) and the combinations (the plan's
    table), said with the flags: one line."""
    with pytest.raises(CLIError) as e:
        _parse(monkeypatch, argv, env, gpu)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_combinations_accepted(monkeypatch):
    assert _parse(monkeypatch, [], {}).plan.parallel.world == 1
    r = parallel.check_request(parallel.ParallelRequest(4, True, True, True), 40, torch.device("cpu"),
                               env=TORCHRUN(8))
    assert r.world == 8


def test_cli_without_torchrun_is_one_line(capsys, monkeypatch, tmp_path):
    from wan_triton.generate import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    rc = main(["--ulysses_size", "2", "--device", "cpu", "--save_file", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs torchrun" in err[0], err
    assert not list(tmp_path.iterdir())


def test_parse_request_checks_the_parallel_flags(monkeypatch):
    """Both CLIs get the group's flags (wan_triton.flags); parse_request checks them (against the
    task's heads) before any model is built; the request's plan carries them."""
    from wan_triton.benchmark import build_parser as bench_parser
    from wan_triton.generate import build_parser

    for k, v in TORCHRUN(2).items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["--ulysses_size", "2", "--device", "cpu"])
    assert request.parse_request(args, "tiny").plan.parallel.ulysses_size == 2
    args = bench_parser().parse_args(["--cfg_parallel", "--device", "cpu"])
    assert request.parse_request(args, "tiny").plan.parallel.cfg_parallel
    for argv, msg in ((["--ulysses_size", "2", "--cfg_parallel"], "needs 4"),
                      (["--cfg_parallel", "--use_batched_cfg"], "--use_batched_cfg")):
        with pytest.raises(CLIError, match=msg):
            request.parse_request(build_parser().parse_args([*argv, "--device", "cpu"]), "tiny")


def test_default_name_carries_the_ulysses_size():
    from datetime import datetime

    from wan_triton.request import default_output_name

    when = datetime(2026, 1, 2, 3, 4, 5)
    assert default_output_name("t2v-A14B", "1280*720", "a cat", when, ulysses=4) == \
        "t2v-A14B_1280x720_4_a_cat_20260102_030405.mp4"
    assert "_1280x720_1_a_cat_" in default_output_name("t2v-A14B", "1280*720", "a cat", when)


def test_one_process_path_unchanged(seed):
    """Without a parallel state the DiT runs exactly as before (no SP attribute anywhere)."""
    from wan.configs import get_config
    from wan.dit import WanModel

    m = WanModel.from_config(get_config("tiny").dit, dtype=torch.float32, seed=seed, zero_head=False)
    assert m.sp is None and all(b.self_attn.sp is None for b in m.blocks)


def _torchrun(args, tmp_path, nproc=2):
    """`torchrun --nproc_per_node N -m wan_triton.generate --task tiny ARGS` on the CPU (gloo); stdout+stderr
    (the tiny random task: its text_len of 32 is what the truncation test counts on)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "wan_triton.generate", "--task", "tiny", "--device", "cpu", "--quiet", "--no-triton",
           "--save_file", str(tmp_path / "v.mp4")] + args
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_bad_input_is_said_once(tmp_path):
    """Issue 22: every rank makes the same checks and exits 2; only rank 0 prints the line (torchrun
    itself then exits 1, as it does whenever a worker fails)."""
    out = _torchrun(["--cfg_parallel", "--sample_shift", "0"], tmp_path)
    text = out.stdout + out.stderr
    assert text.count("wan-generate: error") == 1 and "--sample_shift must be > 0, got 0.0" in text, text[-2000:]
    assert "exitcode  : 2" in text and out.returncode == 1
    assert not (tmp_path / "v.mp4").exists()


def test_torchrun_warnings_on_rank_0_only(tmp_path):
    """Issue 22: the prompt-truncation warning (every rank encodes the prompt) is logged once."""
    out = _torchrun(["--cfg_parallel", "--frame_num", "5", "--sample_steps", "1", "--prompt",
                     "a corgi surfing a wave at sunset, a long prompt for the tiny model"], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert text.count("the text encoder keeps the first 32 (text_len)") == 1, text[-3000:]
    assert (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0])
def test_dist_timeout_must_be_finite_and_positive(monkeypatch, timeout):
    """Issue 22: NaN passed a plain '<= 0' check."""
    with pytest.raises(CLIError, match=rf"^--dist_timeout must be > 0 seconds \(a finite number\), got {timeout}$"):
        _parse(monkeypatch, ["--dist_timeout", str(timeout)], {})
