"""wan_triton.request / flags / exits: the request checks both CLIs share, and that the two tools
answer alike.

Every bad request ends in one line on stderr, exit 2 (or 1 for out-of-memory), before any
model is built; nothing is written.
"""
import argparse
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from wan_triton import benchmark as benchmark_t2v
from wan_triton import accel, exits, generate, request

TOOLS = {"wan-generate": generate, "wan-benchmark": benchmark_t2v}
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def no_build(monkeypatch):
    """Any model construction fails the test: the checks must come first."""
    from wan.pipeline import WanT2V

    def must_not_build(*a, **k):
        raise AssertionError("a model was built before the request was checked")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    monkeypatch.setattr(WanT2V, "from_pretrained", must_not_build)


def run_tool(tool, args, tmp_path):
    out = ["--save_file", str(tmp_path / "v.mp4")] if tool == "wan-generate" else ["--out_dir", str(tmp_path / "o")]
    try:
        return TOOLS[tool].main(args + out + ["--quiet"])
    except SystemExit as e:  # argparse errors exit from the parser
        return e.code


BAD = [
    (["--device", "tpu"], "--device 'tpu' is not a device; use cuda, cuda:N, cpu"),
    (["--device", "mps"], "--device mps: wan-triton runs on CUDA GPUs or the CPU; use cuda, cuda:N, cpu"),
    (["--device", "meta"], "--device meta: wan-triton runs on CUDA GPUs or the CPU; use cuda, cuda:N, cpu"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device; use cuda, cuda:N, cpu"),
    (["--device", "cpu", "--attention", "fa3"], "--attention fa3 is not available on cpu (available: sdpa, math)"),
    (["--device", "cpu", "--attention", "sdpa-cudnn"],
     "--attention sdpa-cudnn is not available on cpu (available: sdpa, math)"),
    (["--device", "cpu", "--prompt", ""], "--prompt is empty; give a prompt, or leave --prompt out for the task's "
                                          "default prompt"),
    (["--device", "cpu", "--prompt", "  \n"], "--prompt is empty"),
    (["--device", "cpu", "--sample_steps", "0"], "--sample_steps must be >= 1, got 0"),
]
if NO_CUDA:
    BAD += [(["--device", "cuda"], "--device cuda: no CUDA device is available (use --device cpu)"),
            (["--device", "cuda:1"], "--device cuda:1: no CUDA device is available (use --device cpu)")]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_both_tools_one_line_before_any_model(tmp_path, capsys, no_build, tool, args, msg):
    rc = run_tool(tool, args, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{tool}: error: ") and msg in err[0]
    assert not list(tmp_path.iterdir())


HOST_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 57231000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("exc,msg", [
    (RuntimeError(HOST_OOM), "out of host memory (RAM): [enforce fail"),
    (MemoryError(), "out of host memory (RAM): MemoryError"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of GPU memory; try"),
], ids=["DefaultCPUAllocator", "MemoryError", "cuda"])
def test_out_of_memory_while_building_is_one_line(tmp_path, capsys, monkeypatch, tool, exc, msg):
    from wan.pipeline import WanT2V

    def oom(*a, **k):
        raise exc

    monkeypatch.setattr(WanT2V, "from_config", oom)
    rc = run_tool(tool, ["--task", "tiny", "--device", "cpu", "--no-triton"], tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"{tool}: error: {msg}")
    hint = exits.HOST_OOM_HINT if "host" in msg else exits.gpu_oom_hint()
    assert err[0].endswith(hint)


def test_other_runtime_errors_still_raise():
    def boom():
        raise RuntimeError("a bug, not the user's input")

    with pytest.raises(RuntimeError, match="a bug"):
        exits.run_main("x", boom)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("argv,field,value", [
    (["--prompt", "-v"], "prompt", "-v"),
    (["--prompt=-v"], "prompt", "-v"),
    (["--prompt", "--no-such-flag"], "prompt", "--no-such-flag"),
    (["--prompt", "-- a dash first"], "prompt", "-- a dash first"),
])
def test_prompts_starting_with_a_dash(tool, argv, field, value):
    assert getattr(TOOLS[tool].build_parser().parse_args(argv), field) == value


def test_negative_prompt_with_a_dash_and_flags_stay_flags(capsys):
    p = generate.build_parser()
    assert p.parse_args(["--n_prompt", "-blurry"]).n_prompt == "-blurry"
    with pytest.raises(SystemExit) as e:  # a real flag is never swallowed as the prompt
        p.parse_args(["--prompt", "--quiet"])
    assert e.value.code == 2 and "--prompt: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("tool", TOOLS)
def test_help_gives_every_flag_text_and_default(tool):
    p = TOOLS[tool].build_parser()
    fmt = p._get_formatter()
    for act in p._actions:
        if not act.option_strings or act.dest == "help":
            continue
        text = fmt._get_help_string(act)
        assert text and len(text) > 10, act.option_strings
        if act.nargs != 0:  # a flag with a value says its default
            assert "default" in text, (act.option_strings, text)
    h = p.format_help()
    assert "--task {t2v-A14B,tiny,demo,ti2v-5B,ti2v-tiny,i2v-A14B,i2v-tiny}" in h and "(default: unipc)" in h and "(default: None)" not in h


def test_both_tools_accept_the_same_presets():
    def choices(p):
        return next(a.choices for a in p._actions if a.dest == "preset")

    g, b = choices(generate.build_parser()), choices(benchmark_t2v.build_parser())
    assert list(g) == list(b) == list(accel.PRESET_CHOICES)
    assert {"auto", "none", "h100", "a100-80g", "cpu"} <= set(g)
    assert generate.build_parser().parse_args([]).preset == "none"
    assert benchmark_t2v.build_parser().parse_args([]).preset == "auto"


def test_preset_aliases_are_defined_once():
    from dataclasses import replace

    assert accel.PRESETS["a100-80g"] == replace(accel.PRESETS["h100"], name="a100-80g")
    assert all(p.note for p in accel.PRESETS.values())
    h = generate.build_parser().format_help()
    assert "h100 (= a100-80g)" in " ".join(h.split())
    assert accel.get_preset("none", "cpu").name == "none"
    if NO_CUDA:
        assert accel.detect_preset().name == "cpu"


@pytest.mark.parametrize("prompt", [
    'a "quoted" <tag>: back\\slash */?|', "line one\nline two\r\t", "x" * 500, "日本語のプロンプト", "...", "../../etc/passwd",
    "-v", "",
])
def test_default_output_names_are_safe_and_bounded(prompt):
    name = request.default_output_name("t2v-A14B", "1280*720", prompt, when=datetime(2026, 1, 2, 3, 4, 5))
    print(repr(prompt), "->", name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.mp4", name), name
    assert len(name) <= 110 and name.endswith("_20260102_030405.mp4")
    assert name.startswith("t2v-A14B_1280x720_1_")


def test_safe_name_keeps_readable_prompts():
    assert request.safe_name("a red fox, in snow!") == "a_red_fox_in_snow"
    assert request.safe_name("***") == "video"


def _ns(**kw):
    base = dict(task=None, device="cpu", attention="auto", size=None, frame_num=None, sample_steps=None,
                sample_solver="unipc", prompt=None, preset="none", base_seed=-1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_parse_request_fills_the_request():
    req = request.parse_request(_ns(size="160x96", frame_num=9, sample_steps=3, prompt="a cat", base_seed=5,
                                sample_solver="dpm++"), "tiny")
    assert (req.task, str(req.device), req.size, req.width_height, req.frame_num, req.steps) == \
        ("tiny", "cpu", "160*96", (160, 96), 9, 3)
    assert req.prompt_given and req.prompt == "a cat" and req.seed == 5 and req.plan.preset.name == "none"
    kw = req.generate_kwargs()
    assert kw["sample_solver"] == "dpm++" and kw["sampling_steps"] == 3 and kw["seed"] == 5
    o = req.plan.options  # the acceleration flags as given: None, the preset decides
    assert (o.triton, o.compile, o.compile_mode, o.tf32, o.use_batched_cfg, o.attention, o.fp8) == \
        (None, None, "default", None, None, "auto", None)
    tiny = request.parse_request(_ns(), "tiny")
    assert not tiny.prompt_given and tiny.prompt == request.TINY_PROMPT and tiny.size == "128*128"
    assert (tiny.weights, tiny.ckpt_dir) == ("random", None)
    demo = request.parse_request(_ns(), request.implied_task(_ns()))
    assert (demo.task, demo.prompt, demo.size, demo.frame_num, demo.steps) == ("demo", request.DEMO_PROMPT, "64*64",
                                                                              17, 20)
    assert demo.weights == "built-in" and demo.ckpt_dir == str(request.DEMO_CKPT_DIR) and demo.plan.options.checkpoint


def test_the_request_is_typed(tmp_path):
    """Issue 30: every flag group lands in a typed field of the Request (or its plan), read by name
    in the code, never a dict filled at import time and read by string keys."""
    import dataclasses

    from wan.lora import LoraSpec

    lora = tmp_path / "a.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(lora))
    req = request.parse_request(generate.build_parser().parse_args(["--lora", f"{lora}:0.5", "--device", "cpu"]),
                                "tiny")
    assert req.loras == (LoraSpec(path=str(lora), strength=0.5, expert="both"),)
    assert req.plan.parallel.world == 1 and req.plan.offload == "none" and req.plan.options.loras
    fields = {f.name: f.type for f in dataclasses.fields(request.Request)}
    assert "extra" not in fields and not any("dict" in str(t) for t in fields.values())


def test_optimize_returns_a_frozen_result_and_leaves_attention_alone(caplog):
    import dataclasses

    import wan_triton
    from wan import attention as att
    from wan.pipeline import WanT2V

    caplog.set_level("INFO")
    pipe = WanT2V.from_config("tiny", device="cpu")
    prev = att.set_backend("math")
    try:
        res = wan_triton.optimize(pipe, "none", triton=False)
        assert isinstance(res, accel.Optimized) and att.get_backend() == "math"  # attention=None: untouched
        with pytest.raises(dataclasses.FrozenInstanceError):
            res.offload = "model"
        assert (res.preset, res.triton, res.patched, res.offload, res.tf32_prev) == \
            ("none", False, (), "none", None)
        line = caplog.records[-1].getMessage()
        assert line.startswith("preset none (only the flags): Triton kernels off") and "{" not in line
        assert "flags'" not in line
        res = wan_triton.optimize(pipe, "cpu", attention="sdpa")
        assert att.get_backend() == "sdpa" and res.attention == "sdpa" and res.preset == "cpu"
    finally:
        wan_triton.unpatch()
        att.set_backend(prev)


def test_flag_words_say_wan_arguments_as_flags():
    """wan names its arguments as Args (`name=value` in str()), the CLIs say each one as its flag from
    one table (wan_triton.flag_words); no text is rewritten."""
    from wan.naming import Arg, NamedError
    from wan_triton.flag_words import flag_of, in_flags

    err = NamedError("{a} conflicts with {b}: give one of them", a=Arg("offload", "blocks"),
                     b=Arg("offload_model", True))
    assert str(err) == "offload='blocks' conflicts with offload_model=True: give one of them"
    assert in_flags(err) == "--offload blocks conflicts with --offload_model True: give one of them"
    many = NamedError("{asks}", asks=[Arg("no_offload", True), Arg("compile", True), Arg("cfg_parallel", True),
                                      Arg("t5_cpu", True)])
    assert in_flags(many) == "--no-offload, --compile, --cfg_parallel, --t5_cpu"
    assert [flag_of(a) for a in (Arg("ulysses_size", 3), Arg("timeout"), Arg("host_ram", "low"),
                                 Arg("sampling_steps"), Arg("compile", False), Arg("triton", False),
                                 Arg("ckpt_dir", "<folder>", literal=True), Arg("size", "1280*720"))] == \
        ["--ulysses_size 3", "--dist_timeout", "--host_ram low", "--sample_steps", "--no-compile", "--no-triton",
         "--ckpt_dir <folder>", "size='1280*720'"]  # an argument without a flag keeps its API words
    text = "N must equal ulysses_size x 2; compile=False; --offload blocks"
    assert in_flags(NamedError(text)) == in_flags(ValueError(text)) == text  # plain text is never rewritten


def test_wan_holds_no_argparse():
    """The CLI layer owns every flag: no module of wan imports argparse."""
    from pathlib import Path

    import wan

    for path in Path(wan.__file__).parent.glob("*.py"):
        assert "argparse" not in path.read_text(), path.name


# ------------------------------------------------------------------ issue 22: bad numbers, weights, prompt files

BAD_22 = [
    (["--device", "cpu", "--base_seed", "99999999999999999999"],
     "--base_seed must be -1 (random) or 0..9223372036854775807, got 99999999999999999999"),
    (["--device", "cpu", "--seed", "-2"], "--base_seed must be -1 (random) or 0..9223372036854775807, got -2"),
    (["--device", "cpu", "--task", "t2v-A14B"], "--task t2v-A14B needs its weights: give --ckpt_dir (the official "
                                                "release), or --random-weights"),
    (["--device", "cpu", "--ckpt_dir", "x", "--random-weights"], "--ckpt_dir and --random-weights exclude each other"),
    (["--device", "cpu", "--prompt_file", "/nonexistent/p.txt"],
     "--prompt_file /nonexistent/p.txt: cannot read it (No such file or directory)"),
    (["--device", "cpu", "--prompt", "a", "--prompt_file", "p.txt"], "not allowed with argument --prompt"),
    (["--device", "cpu", "--lora", "f.safetensors:abc"], "--lora f.safetensors:abc: the strength 'abc' after ':' is "
                                                         "not a number"),
    (["--device", "cpu", "--lora_low", "f.safetensors:nan"], "--lora_low f.safetensors:nan: the strength must be a "
                                                             "finite number, got nan"),
]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("args,msg", BAD_22, ids=[" ".join(a) for a, _ in BAD_22])
def test_issue22_bad_input_one_line_before_any_model(tmp_path, capsys, no_build, tool, args, msg):
    rc = run_tool(tool, args, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{tool}: error: ") and msg in err[0], err[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,msg", [
    (["--sample_shift", "0"], "--sample_shift must be > 0, got 0"),
    (["--sample_shift", "-1"], "--sample_shift must be > 0, got -1"),
    (["--sample_shift", "nan"], "--sample_shift must be a finite number, got nan"),
    (["--sample_shift", "inf"], "--sample_shift must be a finite number, got inf"),
    (["--sample_guide_scale", "nan"], "--sample_guide_scale must be a finite number, got nan"),
    (["--sample_guide_scale=-inf"], "--sample_guide_scale must be a finite number, got -inf"),
])
def test_bad_shift_and_guidance_one_line_before_any_model(tmp_path, capsys, no_build, args, msg):
    rc = run_tool("wan-generate", ["--device", "cpu"] + args, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    assert not list(tmp_path.iterdir())


def test_prompt_file_and_seed_alias_reach_the_request(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("  a red fox in the snow\n", encoding="utf-8")
    req = request.parse_request(generate.build_parser().parse_args(["--prompt_file", str(f), "--seed", "7",
                                                                 "--device", "cpu"]), "tiny")
    assert req.prompt == "a red fox in the snow" and req.prompt_given and req.seed == 7
    f.write_text(" \n", encoding="utf-8")
    with pytest.raises(exits.CLIError, match=f"--prompt_file {re.escape(str(f))} is empty"):
        request.parse_request(generate.build_parser().parse_args(["--prompt_file", str(f), "--device", "cpu"]), "tiny")


def test_convert_model_dtype_without_ckpt_dir_says_so(caplog):
    caplog.set_level("WARNING")
    request.parse_request(generate.build_parser().parse_args(["--convert_model_dtype", "--device", "cpu"]), "tiny")
    assert "--convert_model_dtype applies to checkpoint weights (--ckpt_dir)" in caplog.text


def test_recipe_logs_what_it_set_and_the_summary_names_solver_shift_guidance(caplog):
    caplog.set_level("INFO")
    args = generate.build_parser().parse_args(["--recipe", "lightning-4step", "--sample_steps", "6", "--device",
                                               "cpu"])
    req = request.parse_request(args, "tiny")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe "))
    assert line == ("recipe lightning-4step sets --sample_shift 5, --sample_guide_scale 1, --sample_solver euler "
                    "(given, kept: --sample_steps 6)")
    assert req.summary(seed=3) == "128*128, 17 frames, 6 steps, solver euler, shift 5, guidance 1, seed 3"
    plain = request.parse_request(generate.build_parser().parse_args(["--device", "cpu"]), "tiny")
    assert "solver unipc, shift 12, guidance 3 (low-noise) / 4 (high-noise)" in plain.summary(seed=42)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_the_exit_codes(tool, capsys):
    with pytest.raises(SystemExit):
        TOOLS[tool].build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "3    an output could not be written (disk full" in out


def test_io_failure_is_exit_3_and_torchrun_other_ranks_are_quiet(capsys, monkeypatch):
    from wan.video import OutputWriteError

    def disk_full():
        raise OutputWriteError("cannot write v.mp4: No space left on device")

    def bad():
        raise exits.CLIError("--sample_shift must be > 0, got 0")

    assert exits.run_main("x", disk_full) == exits.EXIT_IO == 3
    assert capsys.readouterr().err.strip() == "x: error: cannot write v.mp4: No space left on device"
    monkeypatch.setenv("RANK", "1")  # torchrun: every rank made the same check; rank 0 says it
    assert exits.run_main("x", bad) == 2 and capsys.readouterr().err == ""
    assert exits.run_main("x", disk_full) == 3  # a failure of this rank's own is still reported, with its rank
    assert capsys.readouterr().err.strip() == "x: error (rank 1): cannot write v.mp4: No space left on device"
    monkeypatch.setenv("RANK", "0")
    assert exits.run_main("x", bad) == 2 and capsys.readouterr().err.strip() == "x: error: --sample_shift must be > 0, " \
                                                                               "got 0"


def test_fp8_rule_is_the_one_optimize_applies(monkeypatch, tmp_path, capsys):
    """--fp8 on a device without native e4m3: the CLI's one line is the translation of the error
    wan_triton.fp8.check_fp8_device raises, the rule optimize(fp8=True) applies too."""
    from wan_triton import fp8

    seen = []
    monkeypatch.setattr(fp8, "check_fp8_device", lambda d: seen.append(d) or (_ for _ in ()).throw(
        fp8.Fp8Error("the rule said no")))
    dev = "cuda" if not NO_CUDA else "cpu"
    if NO_CUDA:  # the CUDA-only flag check answers first on a CPU; the rule itself is checked directly
        with pytest.raises(fp8.Fp8Error, match="the rule said no"):
            from wan.pipeline import WanT2V
            accel.optimize(WanT2V.from_config("tiny"), "cpu", fp8=True)
        assert seen and str(seen[0]) == "cpu"
        return
    rc = run_tool("wan-generate", ["--device", dev, "--fp8"], tmp_path)
    assert rc == 2 and "--fp8: the rule said no" in capsys.readouterr().err


_INTERRUPT_AT_IMPORT = """
import sys

class Interrupt:  # one Ctrl-C, while the tool imports {interrupted} (the first seconds of a run)
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == "{interrupted}" and not Interrupt.fired:
            Interrupt.fired = True
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["{tool}", "--frame_num", "8"]  # a lost interrupt ends in a bad-input line, exit 2, nothing written
from {module} import {func}
sys.exit({func}())
"""


@pytest.mark.parametrize("interrupted", ["torch", "numpy"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_ctrl_c_during_the_imports_is_one_line(tool, interrupted):
    """The console script as setup.py installs it, interrupted while it imports torch: one line and
    exit code 130, as Ctrl-C later (issue 31 item 9: a KeyboardInterrupt traceback). Also within
    numpy's import, which torch's C start-up makes itself and whose errors it drops: a Ctrl-C there
    was lost (the run went on, or died later on a half-imported numpy)."""
    root = Path(__file__).resolve().parent.parent
    module, func = re.search(rf'"{tool} = ([\w.]+):(\w+)"', (root / "setup.py").read_text()).groups()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = _INTERRUPT_AT_IMPORT.format(module=module, func=func, interrupted=interrupted, tool=tool)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (130, f"{tool}: interrupted\n"), r.stderr[-2000:]
    from wan_triton import console  # here: the test above must fail (not error) where it does not exist

    assert console.EXIT_INTERRUPTED == exits.EXIT_INTERRUPTED
