"""wan_triton.plan: one pure function decides a run, one table of rules holds in the CLIs and in
the Python API.

- every row of RULES is reached by a case below; its message (API words, plan()) matches the
  row's template; the CLI says the same message in flag words (wan_triton.flag_words) and
  optimize() raises the very same message (where the API can ask for the combination);
- plan() is pure: it runs with every CUDA query and the fp8 probe made to fail, gives equal
  plans for equal inputs, and decides from the facts passed in (GPU memory, capability);
- the decisions: offload from the preset, the resident-fit switch, compile under streaming,
  T5 placement, streaming from load (not with LoRAs or fp8), batched CFG under cfg_parallel.
"""
import argparse
import dataclasses
import re
import types

import pytest
import torch

from wan.parallel import ParallelRequest
from wan_triton import accel, cli, fp8
from wan_triton import plan as planmod
from wan_triton.errors import AccelError, PlanError
from wan_triton.flag_words import flag_words
from wan_triton.plan import RULES, DeviceInfo, Options, plan

CPU = DeviceInfo("cpu", "cpu", fp8=(False, "device cpu: fp8 matrix products need an NVIDIA GPU of compute "
                                          "capability >= 8.9"))
GPU = DeviceInfo("cuda", "cuda", total_memory_gb=143.7, capability=(9, 0), gpu_name="NVIDIA H200", fp8=(True, ""))
OLD_GPU = dataclasses.replace(GPU, capability=(8, 0), gpu_name="NVIDIA A100", total_memory_gb=85.0,
                              fp8=(False, "NVIDIA A100 is compute capability 8.0; fp8 matrix products need >= 8.9"))
FSDP, CFGP, T5FSDP = ParallelRequest(dit_fsdp=True), ParallelRequest(cfg_parallel=True), ParallelRequest(t5_fsdp=True)

# row -> (Options, preset name, device, wan-generate flags or None, optimize() kwargs or None, fake pipeline state)
CASES = {
    "offload_model/cuda": (dict(offload_model=True), "none", CPU, ["--offload_model", "True"], None, {}),
    "tf32/cuda": (dict(tf32=True), "none", CPU, ["--tf32"], dict(tf32=True), {}),
    "compile/cuda": (dict(compile=True), "none", CPU, ["--compile"], dict(compile=True), {}),
    "no_offload/cuda": (dict(no_offload=True), "none", CPU, ["--no-offload"], None, {}),
    "fp8/cuda": (dict(fp8=True), "none", CPU, ["--fp8"], dict(fp8=True), {}),
    "preset/cuda": (dict(), "h200", CPU, ["--preset", "h200"], dict(), {}),
    "offload/cuda": (dict(offload="blocks"), "none", CPU, ["--offload", "blocks"], dict(offload="blocks"), {}),
    "fp8/native": (dict(fp8=True), "none", OLD_GPU, ["--fp8"], dict(fp8=True), {}),
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
    "offload/dit_fsdp": (dict(offload="model", parallel=FSDP), "none", GPU, ["--offload", "model", "--dit_fsdp"],
                         dict(offload="model", parallel=FSDP), {}),
    "use_batched_cfg/cfg_parallel": (dict(use_batched_cfg=True, parallel=CFGP), "none", GPU,
                                     ["--use_batched_cfg", "--cfg_parallel"],
                                     dict(use_batched_cfg=True, parallel=CFGP), {}),
    "t5_cpu/t5_fsdp": (dict(t5_cpu=True, parallel=T5FSDP), "none", GPU, ["--t5_cpu", "--t5_fsdp"], None, {}),
    "offload/one_model": (dict(offload="blocks", dit_models=1), "none", GPU,
                          ["--offload", "blocks", "--task", "ti2v-tiny", "--random-weights"], dict(offload="blocks"),
                          dict(one_model=True)),
    "loras/one_model": (dict(loras=True, dit_models=1), "none", GPU,
                        ["--lora", "x.safetensors", "--task", "ti2v-tiny", "--random-weights"], None, {}),
}


def _template(rule) -> str:
    """The row's message as a regex: its fixed words, anything where it names the case."""
    parts = re.split(r"\{(?:a|b|device|why)\}", rule.reason)
    return ".+".join(re.escape(p) for p in parts)


@pytest.fixture(scope="module")
def tiny():
    from wan.pipeline import WanT2V

    return WanT2V.from_preset("tiny", device="cpu")


def _fake(tiny, device: DeviceInfo, one_model: bool = False, **state):
    """The pipeline optimize() sees: the tiny one's models (one of them: a one-model task like
    ti2v-5B), on `device` (nothing runs there)."""
    models = (tiny.high_noise_model,) if one_model else (tiny.high_noise_model, tiny.low_noise_model)
    base = dict(device=torch.device(device.name), high_noise_model=tiny.high_noise_model,
                low_noise_model=tiny.low_noise_model, dit_models=lambda: models, text_encoder=tiny.text_encoder,
                t5_cpu=False, use_batched_cfg=False, offload="none", ckpt_dir=None, progress=False)
    return types.SimpleNamespace(**{**base, **state})


def _facts(monkeypatch, device: DeviceInfo):
    """The device's facts, as the CLI and optimize() read them (no GPU needed)."""
    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, dev=None, fp8=False: device))
    monkeypatch.setattr(cli, "check_device", lambda spec: torch.device(device.name))


def test_every_row_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("key", sorted(CASES))
def test_cli_and_api_say_the_same_row(key, tiny, monkeypatch):
    """plan() refuses the case with the row's message (API words); the CLI says exactly that in
    flag words; optimize() raises exactly that message."""
    opts, preset, device, argv, api, state = CASES[key]
    with pytest.raises(AccelError) as err:
        plan(Options(**opts), accel.find_preset(preset, device), device)
    msg = str(err.value)
    assert isinstance(err.value, fp8.Fp8Error if key.startswith("fp8/") and "fsdp" not in key else PlanError)
    assert re.match(_template(RULES[key]), msg), (key, msg)
    assert "--" not in msg and "\n" not in msg  # API words, one line
    print(f"{key}: {msg}")
    _facts(monkeypatch, device)
    if argv is not None:
        from wan_triton.generate import build_parser

        args = build_parser().parse_args(argv + ["--device", device.name])
        with pytest.raises(cli.CLIError) as cli_err:
            cli.parse_request(args, "tiny")
        assert str(cli_err.value) == flag_words(msg)
    if api is not None:
        with pytest.raises(AccelError) as api_err:
            accel.optimize(_fake(tiny, device, **state), preset, triton=False, **api)
        assert str(api_err.value) == msg


def test_flag_words_of_the_table():
    """The words the table uses are said as the flags a user typed."""
    assert flag_words("tf32=True, fp8=True, preset='h200' needs a CUDA GPU") == "--tf32, --fp8, --preset h200 needs " \
                                                                                 "a CUDA GPU"
    assert flag_words("give ckpt_dir=<folder>") == "give --ckpt_dir <folder>"


def test_plan_is_pure(monkeypatch):
    """No CUDA call, no fp8 probe: plan() decides from the facts passed in, the same way twice."""
    def no(*a, **k):
        raise AssertionError("plan() asked the machine")

    for name in ("is_available", "get_device_properties", "get_device_capability", "device_count",
                 "current_device", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no)
    monkeypatch.setattr(fp8, "check_fp8_device", no)
    monkeypatch.setattr(fp8, "fp8_support", no)
    opts = Options(fp8=True, compile=True, host_ram="high", loras=True, resident_gb=69.0)
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
    fits = plan(Options(resident_gb=GPU.total_memory_gb - headroom - 0.1), h200, GPU)
    over = plan(Options(resident_gb=GPU.total_memory_gb - headroom + 0.1, weights_dtype="float32"), h200, GPU)
    assert fits.offload == "none" and not fits.warnings
    assert over.offload == "model" and over.offload_model and "float32" in over.warnings[0]
    asked = plan(Options(offload="none", resident_gb=500.0), h200, GPU)  # asked: resident, as told
    assert asked.offload == "none" and not asked.warnings
    assert plan(Options(parallel=FSDP, resident_gb=500.0), h100, GPU).offload == "none"  # shards stay


def test_decisions():
    rtx, h200 = accel.PRESETS["rtx4090"], accel.PRESETS["h200"]
    run = plan(Options(), rtx, GPU)
    assert run.stream_from_load and run.t5_cpu and not run.compile and run.host_ram == "auto"
    assert not plan(Options(loras=True), rtx, GPU).stream_from_load  # LoRAs merge before streaming
    assert not plan(Options(fp8=True), rtx, GPU).stream_from_load  # fp8 quantizes before streaming
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
    with pytest.raises(PlanError, match="conflicts"):
        plan(Options(offload="blocks", offload_model=False), h200, GPU)


def test_one_model_task_decisions():
    """ti2v-5B (one DiT): a preset that streams the blocks offloads the model instead (a warning says
    so; nothing streams from load); everything else is planned as for the experts."""
    rtx, h200 = accel.PRESETS["rtx4090"], accel.PRESETS["h200"]
    run = plan(Options(dit_models=1), rtx, GPU)
    assert run.offload == "model" and run.offload_model and not run.stream_from_load and run.t5_cpu
    assert "one model" in run.warnings[0]
    assert plan(Options(dit_models=1, compile=True), rtx, GPU).compile  # offload='model' compiles
    assert plan(Options(dit_models=1), h200, GPU).offload == plan(Options(), h200, GPU).offload
    assert plan(Options(dit_models=1, fp8=True), h200, GPU).fp8


def test_cli_request_carries_the_plan():
    args = argparse.Namespace(device="cpu", preset="none", use_batched_cfg=True, t5_cpu=True)
    run = cli.parse_request(args, "tiny").plan
    assert run.use_batched_cfg and run.t5_cpu and run.offload == "none" and run.preset.name == "none"
