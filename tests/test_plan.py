"""wan_triton.plan: one pure function decides a run, once; one table of rules holds in the CLIs and
in the Python API.

- every row of RULES is reached by a case below; its message (API words, plan()) matches the
  row's reason; the CLI says the same message with the flags (wan_triton.flag_words) and
  optimize() raises the very same message (where the API can ask for the combination);
- plan() is pure: it runs with every CUDA query and the fp8 probe made to fail, gives equal
  plans for equal inputs, and decides from the facts passed in (GPU memory, capability);
- a run plans once (both CLIs, optimize()), and what follows carries the plan out: the build
  puts the experts where the plan says, generate() follows the applied offload mode;
- the decisions: offload from the preset, the resident-fit switch, compile under streaming,
  T5 placement, streaming from load (not with LoRAs, fp8 or a reference mode), batched CFG under
  cfg_parallel, the kernels wherever they run.
"""
import argparse
import dataclasses
import re
import types

import pytest
import torch

from wan.naming import Arg
from wan.parallel import ParallelRequest
from wan.step_cache import CachePolicy
from wan_triton import accel, fp8, request
from wan_triton import plan as planmod
from wan_triton.errors import AccelError, PlanError
from wan_triton.exits import CLIError
from wan_triton.flag_words import in_flags
from wan_triton.plan import RULES, DeviceInfo, Options, plan

CPU = DeviceInfo("cpu", "cpu", fp8=(False, "device cpu: fp8 matrix products need an NVIDIA GPU of compute "
                                          "capability >= 8.9"))
GPU = DeviceInfo("cuda", "cuda", total_memory_gb=143.7, capability=(9, 0), gpu_name="NVIDIA H200", fp8=(True, ""))
H100 = DeviceInfo("cuda", "cuda", total_memory_gb=85.0, capability=(9, 0), gpu_name="NVIDIA H100 80GB HBM3",
                  fp8=(True, ""))
OLD_GPU = dataclasses.replace(GPU, capability=(8, 0), gpu_name="NVIDIA A100", total_memory_gb=85.0,
                              fp8=(False, "NVIDIA A100 is compute capability 8.0; fp8 matrix products need >= 8.9"))
NO_FA3 = dataclasses.replace(CPU, attention=("fa3", "flash_attn_interface is not installed", ("sdpa", "math")))
FSDP, CFGP, T5FSDP = ParallelRequest(dit_fsdp=True), ParallelRequest(cfg_parallel=True), ParallelRequest(t5_fsdp=True)

# row -> (Options, preset name, device, wan-generate flags or None, optimize() kwargs or None, fake pipeline state)
CASES = {
    "offload/unknown": (dict(offload="sideways"), "none", GPU, None, dict(offload="sideways"), {}),
    "host_ram/unknown": (dict(host_ram="medium"), "none", GPU, None, dict(host_ram="medium"), {}),
    "compile_mode/unknown": (dict(compile_mode="fastest"), "none", GPU, None, dict(compile_mode="fastest"), {}),
    "vae_dtype/unknown": (dict(vae_dtype="fp16"), "none", GPU, None, dict(vae_dtype="fp16"), {}),
    "attention/device": (dict(attention="fa3"), "none", NO_FA3, ["--attention", "fa3"], dict(attention="fa3"), {}),
    "fp8/device": (dict(fp8=True), "none", OLD_GPU, ["--fp8"], dict(fp8=True), {}),
    "cuda": (dict(tf32=True), "none", CPU, ["--tf32"], dict(tf32=True), {}),
    "offload/streaming": (dict(offload="model", streaming=True), "none", GPU, None, dict(offload="model"),
                          dict(offload="blocks")),
    "compile/blocks": (dict(compile=True, offload="blocks"), "none", GPU, ["--compile", "--offload", "blocks"],
                       dict(compile=True, offload="blocks"), {}),
    "fp8/dit_fsdp": (dict(fp8=True, parallel=FSDP), "none", GPU, ["--fp8", "--dit_fsdp"],
                     dict(fp8=True, parallel=FSDP), {}),
    "host_ram/offload": (dict(host_ram="high"), "none", GPU, ["--host_ram", "high"], dict(host_ram="high"), {}),
    "host_ram_low/random": (dict(host_ram="low", offload="blocks", checkpoint=False), "none", GPU,
                            ["--host_ram", "low", "--offload", "blocks"], dict(host_ram="low", offload="blocks"),
                            dict(ckpt_dir=None)),
    "host_ram_low/fp8": (dict(host_ram="low", offload="blocks", fp8=True, checkpoint=True), "none", GPU,
                         ["--host_ram", "low", "--offload", "blocks", "--fp8", "--ckpt_dir", "/ckpt"],
                         dict(host_ram="low", offload="blocks", fp8=True), dict(ckpt_dir="/ckpt")),
    "fp8_files/reference": (dict(fp8=True, fp8_files=True, checkpoint=True, modes=("reference", "optimized")),
                            "none", GPU, None, None, {}),  # the benchmark's --mode both: tests/test_fp8_files.py
    "offload/dit_fsdp": (dict(offload="model", parallel=FSDP), "none", GPU, ["--offload", "model", "--dit_fsdp"],
                         dict(offload="model", parallel=FSDP), {}),
    "use_batched_cfg/cfg_parallel": (dict(use_batched_cfg=True, parallel=CFGP), "none", GPU,
                                     ["--use_batched_cfg", "--cfg_parallel"],
                                     dict(use_batched_cfg=True, parallel=CFGP), {}),
    "t5_cpu/t5_fsdp": (dict(t5_cpu=True, parallel=T5FSDP), "none", GPU, ["--t5_cpu", "--t5_fsdp"],
                       dict(parallel=T5FSDP), dict(t5_cpu=True)),
    "cache_threshold/cache": (dict(cache=CachePolicy(threshold=0.05)), "none", GPU, ["--cache_threshold", "0.05"],
                              dict(cache_threshold=0.05), {}),
    "cache_mag/random": (dict(cache=CachePolicy("mag"), checkpoint=False), "none", GPU, ["--cache", "mag"],
                         dict(cache="mag"), dict(ckpt_dir=None)),
    "cache_cfg/cfg_parallel": (dict(cache=CachePolicy(cfg_interval=2), parallel=CFGP), "none", GPU,
                               ["--cache_cfg", "2", "--cfg_parallel"], dict(cache_cfg=2, parallel=CFGP), {}),
    "offload/one_model": (dict(offload="blocks", dit_models=1), "none", GPU,
                          ["--offload", "blocks", "--task", "ti2v-tiny", "--random-weights"], dict(offload="blocks"),
                          dict(one_model=True)),
    "loras/one_model": (dict(loras=True, dit_models=1), "none", GPU,
                        ["--lora", "x.safetensors", "--task", "ti2v-tiny", "--random-weights"], None, {}),
    "cache/one_model": (dict(cache=CachePolicy("easy"), dit_models=1), "none", GPU,
                        ["--cache", "easy", "--task", "ti2v-tiny", "--random-weights"], dict(cache="easy"),
                        dict(one_model=True)),
    "fp8_files/one_model": (dict(fp8=True, fp8_files=True, checkpoint=True, dit_models=1), "none", GPU, None, None, {}),
}


def _template(reason: str) -> str:
    """The row's message as a regex: its fixed words, anything where it names the case."""
    parts = re.split(r"\{\w+(?::[^}]*)?\}", reason)
    return ".*".join(re.escape(p) for p in parts)


@pytest.fixture(scope="module")
def tiny():
    from wan.pipeline import WanT2V

    return WanT2V.from_config("tiny", device="cpu")


def _fake(tiny, device: DeviceInfo, one_model: bool = False, **state):
    """The pipeline optimize() sees: the tiny one's models (one of them: a one-model task like
    ti2v-5B), on `device` (nothing runs there)."""
    models = (tiny.high_noise_model,) if one_model else (tiny.high_noise_model, tiny.low_noise_model)
    base = dict(device=torch.device(device.name), high_noise_model=tiny.high_noise_model,
                low_noise_model=tiny.low_noise_model, dit_models=lambda: models, text_encoder=tiny.text_encoder,
                vae=tiny.vae, t5_cpu=False, use_batched_cfg=False, offload="none", ckpt_dir=None, progress=False)
    return types.SimpleNamespace(**{**base, **state})


def _facts(monkeypatch, device: DeviceInfo):
    """The device's facts, as the CLI and optimize() read them (no GPU needed)."""
    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, dev=None, fp8=False, attention=None: device))
    monkeypatch.setattr(request, "check_device", lambda spec: torch.device(device.name))


def test_every_row_has_a_case():
    assert set(CASES) == set(RULES)
    for key, rule in RULES.items():  # the table holds the rules themselves: a condition and its reason
        assert rule.key == key and callable(rule.when) and callable(rule.says) and "{" in rule.reason


@pytest.mark.parametrize("key", sorted(CASES))
def test_cli_and_api_say_the_same_row(key, tiny, monkeypatch):
    """plan() refuses the case with the row's message (API words, the options as Args); the CLI says
    exactly that with the flags; optimize() raises exactly that message, and changes nothing."""
    from wan import attention as att

    opts, preset, device, argv, api, state = CASES[key]
    with pytest.raises(AccelError) as err:
        plan(Options(**opts), accel.find_preset(preset, device), device)
    msg = str(err.value)
    assert isinstance(err.value, fp8.Fp8Error if key == "fp8/device" else PlanError)
    assert re.fullmatch(_template(RULES[key].reason), msg), (key, msg)
    assert "--" not in msg and "\n" not in msg  # API words, one line
    print(f"{key}: {msg} | {in_flags(err.value)}")
    _facts(monkeypatch, device)
    if argv is not None:
        from wan_triton.generate import build_parser

        args = build_parser().parse_args(argv + ["--device", device.name])
        with pytest.raises(CLIError) as cli_err:
            request.parse_request(args, "tiny")
        assert str(cli_err.value) == in_flags(err.value)
    if api is not None:
        before = att.get_backend()
        with pytest.raises(AccelError) as api_err:
            accel.optimize(_fake(tiny, device, **state), preset, triton=False, **api)
        assert str(api_err.value) == msg and att.get_backend() == before


def test_plan_is_pure(monkeypatch):
    """No CUDA call, no fp8 probe: plan() decides from the facts passed in, the same way twice."""
    def no(*a, **k):
        raise AssertionError("plan() asked the machine")

    for name in ("is_available", "get_device_properties", "get_device_capability", "device_count",
                 "current_device", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no)
    monkeypatch.setattr(fp8, "check_fp8_device", no)
    monkeypatch.setattr(fp8, "fp8_support", no)
    opts = Options(fp8=True, compile=True, host_ram="high", loras=True, experts_gb=69.0)
    for preset in ("h200", "h100", "rtx4090", "cpu"):
        for device in (GPU, OLD_GPU, CPU):
            try:
                a = plan(Options(), accel.PRESETS[preset], device)
                assert a == plan(Options(), accel.PRESETS[preset], device)
                plan(opts, accel.PRESETS[preset], device)
            except AccelError:
                pass  # refusals are answers too


def test_offload_from_the_preset_and_the_fit():
    """A preset's offload mode on CUDA, none off it; a resident preset offloads the idle expert when
    the weights plus the headroom exceed the GPU's memory (a fact passed in)."""
    h200, h100, rtx = accel.PRESETS["h200"], accel.PRESETS["h100"], accel.PRESETS["rtx4090"]
    assert plan(Options(), h100, GPU).offload == "model" and plan(Options(), rtx, GPU).offload == "blocks"
    assert plan(Options(), dataclasses.replace(rtx, name="mine", min_mem_gb=0), CPU).offload == "none"  # off CUDA
    headroom = planmod.RESIDENT_HEADROOM_GB
    fits = plan(Options(experts_gb=GPU.total_memory_gb - headroom - 11.1, t5_gb=11.0), h200, GPU)
    over = plan(Options(experts_gb=GPU.total_memory_gb - headroom - 10.9, t5_gb=11.0, weights_dtype="float32"),
                h200, GPU)
    assert fits.offload == "none" and not fits.warnings
    assert over.offload == "model" and "float32" in str(over.warnings[0])
    assert "--convert_model_dtype" in over.warnings[0].say(__import__("wan_triton.flag_words").flag_words.flag_of)
    t5_off = plan(Options(experts_gb=GPU.total_memory_gb - headroom - 10.9, t5_gb=11.0, t5_cpu=True), h200, GPU)
    assert t5_off.offload == "none"  # the T5 on the CPU leaves room for both experts
    asked = plan(Options(offload="none", experts_gb=500.0), h200, GPU)  # asked: resident, as told
    assert asked.offload == "none" and not asked.warnings
    assert plan(Options(parallel=FSDP, experts_gb=500.0), h100, GPU).offload == "none"  # shards stay


def test_decisions():
    rtx, h200 = accel.PRESETS["rtx4090"], accel.PRESETS["h200"]
    run = plan(Options(), rtx, GPU)
    assert run.stream_from_load and not run.t5_cpu and run.t5_release and not run.compile and run.host_ram == "auto"
    assert not plan(Options(loras=True), rtx, GPU).stream_from_load  # LoRAs merge before streaming
    assert plan(Options(loras=True), rtx, GPU).build_offload == "model"  # ... the experts wait on the host
    assert not plan(Options(fp8=True), rtx, GPU).stream_from_load  # fp8 quantizes before streaming
    assert not plan(Options(checkpoint=True, diffusers_layout=True), rtx, GPU).stream_from_load  # read whole
    assert not plan(Options(t5_cpu=False, parallel=T5FSDP), rtx, GPU).t5_cpu  # a sharded T5 stays on the GPUs
    assert plan(Options(t5_cpu=True), h200, GPU).t5_cpu
    assert plan(Options(compile=True), h200, GPU).compile and plan(Options(tf32=True), h200, GPU).tf32
    compiling = dataclasses.replace(rtx, compile=True)  # a preset's compile gives way to its streaming
    assert not plan(Options(), compiling, GPU).compile
    with pytest.raises(PlanError, match=r"compile=True does not work with offload='blocks' \(preset rtx4090\)"):
        plan(Options(compile=True), rtx, GPU)
    batched = dataclasses.replace(h200, use_batched_cfg=True)
    assert plan(Options(), batched, GPU).use_batched_cfg and not plan(Options(parallel=CFGP), batched, GPU) \
        .use_batched_cfg


def test_the_benchmark_modes_are_planned_too():
    """Issue 30: the reference mode's offload, the T5 placement both modes share and whether the
    build streams are the plan's, the same for checkpoints and random weights."""
    rtx, h200, l40s = accel.PRESETS["rtx4090"], accel.PRESETS["h200"], accel.PRESETS["l40s"]
    for checkpoint in (True, False):
        both = plan(Options(modes=planmod.MODES, checkpoint=checkpoint), rtx, GPU)
        assert (both.offload, both.reference_offload, both.build_offload, both.t5_cpu, both.t5_release) == \
            ("blocks", "model", "model", False, True)  # the reference runs first: the build keeps the idle expert home
        alone = plan(Options(modes=("optimized",), checkpoint=checkpoint), rtx, GPU)
        assert alone.stream_from_load  # streamed from load, checkpoint or random weights alike
        ref = plan(Options(modes=("reference",), checkpoint=checkpoint), rtx, GPU)
        assert not ref.t5_release and ref.build_offload == "model"  # the preset's T5 only for the optimized mode
        assert plan(Options(modes=planmod.MODES), l40s, GPU).t5_cpu
        assert not plan(Options(modes=("reference",)), l40s, GPU).t5_cpu
    assert plan(Options(modes=planmod.MODES, offload="none"), h200, GPU).reference_offload == "none"  # asked: both
    assert plan(Options(modes=planmod.MODES), h200, GPU).reference_offload == "model"  # official default
    assert plan(Options(modes=planmod.MODES), accel.NO_PRESET, CPU).reference_offload == "none"  # nothing moves


def test_one_model_task_decisions():
    """ti2v-5B (one DiT): a preset that streams the blocks offloads the model instead (a warning says
    so; nothing streams from load); everything else is planned as for the experts."""
    rtx, h200 = accel.PRESETS["rtx4090"], accel.PRESETS["h200"]
    run = plan(Options(dit_models=1), rtx, GPU)
    assert run.offload == run.build_offload == "model" and not run.stream_from_load and run.t5_release
    assert "one model" in str(run.warnings[0])
    assert plan(Options(dit_models=1, compile=True), rtx, GPU).compile  # offload='model' compiles
    assert plan(Options(dit_models=1), h200, GPU).offload == plan(Options(), h200, GPU).offload
    assert plan(Options(dit_models=1, fp8=True), h200, GPU).fp8


def test_cli_request_carries_the_plan():
    args = argparse.Namespace(device="cpu", preset="none", use_batched_cfg=True, t5_cpu=True)
    run = request.parse_request(args, "tiny").plan
    assert run.use_batched_cfg and run.t5_cpu and run.offload == "none" and run.preset.name == "none"


# ------------------------------------------------------------------ issue 30: one plan, carried out

def _count_plans(monkeypatch):
    calls = []
    real = planmod.plan

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    for mod in (planmod, accel, request):
        monkeypatch.setattr(mod, "plan", counting, raising=False)
    return calls


@pytest.mark.parametrize("tool", ["wan-generate", "wan-benchmark"])
def test_one_plan_per_run(tool, tmp_path, monkeypatch):
    """Issue 30 item 1: a CLI run plans once (parse_request), and the build and apply use that plan;
    optimize() plans once."""
    from wan.pipeline import WanT2V
    from wan.timing import Timings

    calls = _count_plans(monkeypatch)

    def fake(self, prompt, **kw):
        self.last_seed, self.last_timings = kw.get("seed", 0), Timings(text_encode=0.1, steps=[0.1], total=0.3)
        return torch.zeros(3, 5, 128, 128) if not kw.get("return_latents") else torch.zeros(16, 2, 16, 16)

    monkeypatch.setattr(WanT2V, "generate", fake)
    if tool == "wan-generate":
        from wan_triton.generate import main
        argv = ["--save_file", str(tmp_path / "v.mp4"), "--frame_num", "5"]
    else:
        from wan_triton.benchmark import main
        argv = ["--out_dir", str(tmp_path), "--frame_num", "5", "--num_runs", "1", "--warmup", "0", "--no-decode"]
    assert main(argv + ["--device", "cpu", "--quiet", "--no-triton"]) == 0
    assert len(calls) == 1
    calls.clear()
    accel.optimize(WanT2V.from_config("tiny"), "cpu", triton=False, fp8=None)
    assert len(calls) == 1


def test_generate_follows_the_applied_offload(tiny, monkeypatch):
    """Issue 30 item 2: after optimize(pipe, 'h200') on an H200, pipe.generate(prompt) keeps both
    experts resident (the plan's mode is the pipeline's); an explicit offload_model still wins; a
    pipeline on CUDA without a plan follows the official default (offload)."""
    from wan.pipeline import WanT2V

    seen = []
    real = WanT2V._expert
    monkeypatch.setattr(WanT2V, "_expert", lambda self, t, offload: seen.append(offload) or real(self, t, False))
    pipe = WanT2V.from_config("tiny", device="cpu")
    args = dict(size="128*128", frame_num=5, sampling_steps=1, progress=False, return_latents=True)
    pipe.offload = "model"  # what a CUDA pipeline starts with (the official default)
    pipe.generate("a cat", **args)
    assert seen == [True]
    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, dev=None, fp8=False, attention=None: GPU))
    applied = accel.optimize(pipe, "h200", triton=False)
    assert applied.offload == "none" and pipe.offload == "none"
    seen.clear()
    pipe.generate("a cat", **args)
    pipe.generate("a cat", offload_model=True, **args)
    assert seen == [False, True]
    assert WanT2V.__init__.__defaults__ is not None and torch.device("cuda").type == "cuda"
    assert WanT2V(tiny.config, None, None, None, None, device="cuda").offload == "model"
    assert WanT2V(tiny.config, None, None, None, None, device="cpu").offload == "none"


def test_one_offload_vocabulary():
    """Issue 30 item 2: one field, `offload` ('none', 'model', 'blocks'), from the preset to the
    record of what was applied; no offload_model beside it."""
    for cls in (accel.Preset, Options, planmod.RunPlan, accel.Optimized, request.Request):
        names = {f.name for f in dataclasses.fields(cls)}
        assert "offload_model" not in names and "no_offload" not in names, cls
    assert {p.offload for p in accel.PRESETS.values()} == {"none", "model", "blocks"}


# ------------------------------------------------------------------ issue 31: what a new user hits

def _h100_a14b_request(tool: str, monkeypatch, extra=()):
    """The request of `<tool> --task t2v-A14B --random-weights --size 1280*720 --frame_num 81
    --sample_steps 2` on one H100 80GB (its facts faked: no GPU needed)."""
    _facts(monkeypatch, H100)
    if tool == "wan-generate":
        from wan_triton.generate import build_parser
    else:
        from wan_triton.benchmark import build_parser
    args = build_parser().parse_args(["--task", "t2v-A14B", "--random-weights", "--size", "1280*720",
                                      "--frame_num", "81", "--sample_steps", "2", *extra])
    modes = planmod.MODES if tool == "wan-benchmark" else ("optimized",)
    return request.parse_request(args, "t2v-A14B", modes=modes)


@pytest.mark.parametrize("tool", ["wan-generate", "wan-benchmark"])
def test_h100_default_plan_fits(tool, monkeypatch):
    """Issue 31 item 1: the default command on one H100 80GB plans the idle expert on the host
    (model offload, the T5 on the GPU) and the resident weights plus the 720p headroom fit its
    85.5 GB; --preset h100 plans the same."""
    for extra in ((), ("--preset", "h100")):
        run = _h100_a14b_request(tool, monkeypatch, extra).plan
        assert (run.offload, run.build_offload, run.t5_cpu) == ("model", "model", False), extra
        if tool == "wan-benchmark":
            assert run.reference_offload == "model"
        one_expert = run.options.experts_gb / 2
        assert 28 < one_expert < 29.5 and 11 < run.options.t5_gb < 12
        assert planmod.fits_resident(one_expert + run.options.t5_gb, H100.total_memory_gb)
        assert not planmod.fits_resident(run.resident_gb, H100.total_memory_gb)  # both experts would not


@pytest.mark.parametrize("tool", ["wan-generate", "wan-benchmark"])
def test_the_build_honours_the_plan_and_never_holds_both_experts(tool, monkeypatch, tmp_path):
    """Issue 31 item 1: building the plan above (random weights, the real A14B shapes, on the meta
    device: no memory) puts the low-noise expert on the host before the high-noise one is built;
    the GPU never holds both, and its resident weights are one expert + T5 + VAE."""
    from contextlib import ExitStack

    from wan import footprint, pipeline
    from wan.dit import WanModel
    from wan.t5 import T5TextEncoder
    from wan.vae import WanVAE
    from wan_triton.build import build_pipeline

    req = _h100_a14b_request(tool, monkeypatch)
    on_gpu, peak, moved = {}, [0.0], []

    def size(m):
        return sum(p.numel() * p.element_size() for p in m.parameters()) / 1e9

    def track(make):
        def build(*a, device="cpu", **k):
            with torch.device("meta"):
                m = make(*a, device="meta", **k)
            if torch.device(device).type == "cuda":
                on_gpu[id(m)] = size(m)
                peak[0] = max(peak[0], sum(on_gpu.values()))
            return m
        return build

    def dit(config, device="cpu", dtype=torch.float32, seed=0, zero_head=True):
        return WanModel(config).to(dtype)

    def t5(config, device="cpu", dtype=None, seed=0, tokenizer=None):
        m = types.SimpleNamespace(model=torch.nn.Linear(1, 1))
        m.model.weight = torch.nn.Parameter(torch.empty(footprint.text_encoder_bytes(config) // 2,
                                                        dtype=torch.bfloat16))
        m.parameters = m.model.parameters
        return m

    def to_host(model):
        moved.append(model)
        on_gpu.pop(id(model), None)
        return model

    monkeypatch.setattr(WanModel, "from_config", staticmethod(track(dit)))
    monkeypatch.setattr(T5TextEncoder, "from_config", staticmethod(track(t5)))
    monkeypatch.setattr(WanVAE, "from_config", staticmethod(track(lambda cfg, device="cpu", dtype=None, seed=0:
                                                                   WanVAE(cfg).to(dtype))))
    monkeypatch.setattr(pipeline, "_to_host", to_host)
    monkeypatch.setattr(pipeline, "check_host_ram", lambda *a: None)
    with ExitStack() as cleanup:
        built = build_pipeline(req, cleanup, apply_plan=False, progress=False)
    pipe = built.pipe
    assert moved == [pipe.low_noise_model] and pipe.offload == "model"
    assert id(pipe.high_noise_model) in on_gpu and id(pipe.low_noise_model) not in on_gpu
    experts_on_gpu = [m for m in (pipe.high_noise_model, pipe.low_noise_model) if id(m) in on_gpu]
    assert len(experts_on_gpu) == 1
    print(f"resident after the build: {sum(on_gpu.values()):.1f} GB, peak {peak[0]:.1f} GB (of {H100.total_memory_gb})")
    assert 40 < sum(on_gpu.values()) < 41 and peak[0] < 41  # one expert 28.6 + T5 11.4 + VAE 0.5
    assert planmod.fits_resident(sum(on_gpu.values()), H100.total_memory_gb, planmod.RESIDENT_HEADROOM_GB)


def test_the_host_ram_check_counts_the_idle_expert():
    """Issue 31 item 1: a build that keeps the idle expert on the host says so before building."""
    from wan.configs import get_config
    from wan.footprint import build_footprint

    cfg = get_config("t2v-A14B")
    parts = dict(build_footprint(cfg, "cuda", offload="model").parts)
    assert list(parts) == ["the idle expert"] and 28 < parts["the idle expert"] / 1e9 < 29.5
    assert build_footprint(cfg, "cuda", offload="none").parts == ()


def test_optimize_obeys_the_cli_rules(tiny):
    """Issue 31 item 4: optimize(pipe, attention='fa4') on a CPU is the CLI's one-line refusal (and
    leaves the backend as it was: a later plain optimize() runs); unknown keywords are refused."""
    from wan import attention as att
    from wan_triton.flags import attention_registry

    attention_registry()
    pipe = _fake(tiny, CPU)
    before = att.get_backend()
    with pytest.raises(AccelError) as err:
        accel.optimize(pipe, "cpu", attention="fa4")
    assert str(err.value).startswith("attention='fa4' is not available on cpu (available: ") and \
        "\n" not in str(err.value)
    assert in_flags(err.value).startswith("--attention fa4 is not available on cpu")
    assert att.get_backend() == before
    assert accel.optimize(pipe, "cpu", triton=False).attention is None
    with pytest.raises(AccelError, match=r"optimize\(\) has no argument batched_cfg \(did you mean "
                                         r"use_batched_cfg\?\)"):
        accel.optimize(pipe, "cpu", batched_cfg=True)
    with pytest.raises(AccelError, match=r"optimize\(\) has no argument foo; it takes preset, triton"):
        accel.optimize(pipe, "cpu", foo=1)
    accel.optimize(pipe, "cpu", triton=False, rms_norm=False)  # patch()'s own switches still pass


def test_no_offload_is_offload_none():
    """Issue 31 item 6: --no-offload means --offload none, on a CPU too (nothing to offload there)."""
    from wan_triton.generate import build_parser

    runs = [request.parse_request(build_parser().parse_args([*flags, "--device", "cpu"]), "tiny").plan
            for flags in (["--no-offload"], ["--offload", "none"], ["--offload_model", "False"])]
    assert all(r.offload == "none" for r in runs) and runs[0].options.offload == runs[1].options.offload == "none"
    with pytest.raises(CLIError, match="--offload_model True needs a CUDA GPU"):
        request.parse_request(build_parser().parse_args(["--offload_model", "True", "--device", "cpu"]), "tiny")
    with pytest.raises(CLIError, match="--offload model conflicts with --no-offload: give one of them"):
        request.parse_request(build_parser().parse_args(["--no-offload", "--offload", "model", "--device", "cpu"]),
                              "tiny")


def test_kernels_wherever_they_run(monkeypatch):
    """Issue 31 item 7: the default (auto -> the cpu profile) runs the Triton kernels under
    TRITON_INTERPRET=1, as --no-triton's help says; without the interpreter, the reference ops."""
    from wan_triton.benchmark import build_parser

    cpu = accel.PRESETS["cpu"]
    assert plan(Options(), cpu, dataclasses.replace(CPU, triton_interpret=True)).triton
    assert not plan(Options(), cpu, CPU).triton
    assert not plan(Options(triton=False), cpu, dataclasses.replace(CPU, triton_interpret=True)).triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = request.parse_request(build_parser().parse_args(["--device", "cpu"]), "tiny", modes=planmod.MODES).plan
    assert run.preset.name == "cpu" and run.triton
    assert "TRITON_INTERPRET=1" in " ".join(build_parser().format_help().split())


def test_arg_words():
    assert str(Arg("offload", "blocks")) == "offload='blocks'" and str(Arg("sampling_steps")) == "sampling_steps"


def test_names_mean_one_thing():
    """Issue 30 item 5: a task is a model size (wan.configs.TASKS, WanT2V.from_config), a preset a
    hardware profile (wan_triton.accel.PRESETS), the plan the RunPlan; the old public names are gone
    (no compatibility shims in a 0.x package)."""
    import wan.configs as configs
    import wan.hostmem
    import wan.lora
    from wan.pipeline import WanT2V

    assert not hasattr(configs, "PRESETS") and not hasattr(WanT2V, "from_preset")
    assert WanT2V.from_config("tiny").config.name == "tiny"
    with pytest.raises(KeyError, match="unknown task 'x'"):
        configs.get_config("x")
    assert hasattr(wan.hostmem, "HostRamChoice") and not hasattr(wan.hostmem, "HostPlan")
    assert hasattr(wan.lora, "map_lora") and not hasattr(wan.lora, "plan_lora")
