"""One resolved plan: what a run turns on, decided once.

    Options (what the user asked; None: the preset decides)  --+
    a Preset (what a class of GPU turns on, wan_triton.accel)   +--> plan() --> RunPlan (frozen)
    DeviceInfo (the device's facts, read once)                 --+

`plan()` is a pure function: it reads no model, calls no CUDA function and changes nothing; the
facts it needs (device type, GPU memory, compute capability, fp8 verdict, the resident weights'
size) come in through `Options` and `DeviceInfo`. Both CLIs (wan_triton.cli.parse_request, from
their flags) and the Python API (`wan_triton.optimize`, from its keyword arguments and the
pipeline's state) call it, so every rule holds in both. The rules that forbid a combination are
the rows of one table, `RULES` (feature, feature, reason); `plan()` and
`wan_triton.cli.check_parallel_args` consult it. Errors name the arguments in API words
(`offload='blocks'`, `compile=True`); the CLIs say them as flags (wan_triton.flag_words).

Rules about wan's own objects stay in wan and are called from here: where offloading runs
(`wan.offload.check_offload_device`), torchrun's world (`wan.parallel.check_request`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wan.hostmem import HOST_RAM_MODES
from wan.offload import OFFLOAD_MODES, check_offload_device
from wan.parallel import ParallelRequest
from wan.streaming import OffloadError

from . import fp8 as _fp8
from .errors import PlanError

__all__ = ["Options", "DeviceInfo", "RunPlan", "Rule", "RULES", "NO_CUDA", "plan", "resolve_offload",
           "preset_offload", "cuda_only", "check_cuda_only", "check_parallel", "fits_resident",
           "RESIDENT_HEADROOM_GB"]

# Memory a generation needs beyond the resident weights, measured at 1280x720x81 on the H200
# (bench/RESULTS.md): an A14B forward 12.5 GB of activations (41.1 GB peak - 28.6 GB weights),
# the fp32 VAE decode 23.1 GB. A preset that keeps both experts resident does so only when
# the weights plus this headroom fit in the GPU.
RESIDENT_HEADROOM_GB = 30.0


def fits_resident(weights_gb: float, gpu_gb: float, headroom_gb: float = RESIDENT_HEADROOM_GB) -> bool:
    return weights_gb + headroom_gb <= gpu_gb


# ------------------------------------------------------------------ the table

NO_CUDA = "a device without CUDA"


@dataclass(frozen=True)
class Rule:
    """One forbidden combination: feature `a` does not work with `b`, for `reason`. `reason` is
    the one-line message, with {a} and {b} filled by the words of the case at hand (default: the
    row's own). Rows with b == NO_CUDA are said together: "a, b needs a CUDA GPU, ..."."""
    a: str
    b: str
    reason: str

    def message(self, a: str | None = None, b: str | None = None, **kw) -> str:
        return self.reason.format(a=a or self.a, b=b or self.b, **kw)


_CUDA = "{a} needs a CUDA GPU, and none is in use (device {device})"
RULES = {
    # CUDA-only features (said together, in this order)
    "offload_model/cuda": Rule("offload_model=True", NO_CUDA, _CUDA),
    "tf32/cuda": Rule("tf32=True", NO_CUDA, _CUDA),
    "compile/cuda": Rule("compile=True", NO_CUDA, _CUDA),
    "no_offload/cuda": Rule("no_offload=True", NO_CUDA, _CUDA),
    "fp8/cuda": Rule("fp8=True", NO_CUDA, _CUDA),  # when the fp8 check refuses the device
    "preset/cuda": Rule("preset='h200'", NO_CUDA, _CUDA),  # a GPU preset (min_mem_gb > 0)
    # the rule of wan.offload.check_offload_device (the plan calls it), as it words it
    "offload/cuda": Rule("offload='blocks'", NO_CUDA, _CUDA),
    "fp8/native": Rule("fp8=True", "a GPU without native e4m3 products", "{a}: {why}"),
    "offload/streaming": Rule("offload='model'", "a pipeline that streams its blocks",
                              "the pipeline already streams its DiT blocks; {a} would need "
                              "wan.offload.disable_pipeline_streaming(pipe) first"),
    "compile/blocks": Rule("compile=True", "offload='blocks'",
                           "{a} does not work with {b}: compiled blocks would run the streaming hooks inside the "
                           "graph; use one or the other (offload='model' compiles)"),
    "fp8/dit_fsdp": Rule("fp8=True", "dit_fsdp=True",
                         "{a} does not work with {b} (the shards hold the bf16 weights): use one or the other"),
    "host_ram/offload": Rule("host_ram='high'", "offload='none'",
                             "{a} applies to block streaming, and the offload mode here is {b}: add "
                             "offload='blocks' (CUDA only)"),
    "host_ram_low/random": Rule("host_ram='low'", "random weights",
                                "{a} re-reads the idle expert from its checkpoint files, and {b} have none: give "
                                "ckpt_dir=<folder>"),
    "host_ram_low/fp8": Rule("host_ram='low'", "fp8=True",
                             "{a} re-reads the idle expert from its bf16 files, which would undo {b}: use "
                             "host_ram='high' (fp8 experts need half the host memory)"),
    "offload/dit_fsdp": Rule("offload_model=True / offload='model' / offload='blocks'", "dit_fsdp=True",
                             "{a} cannot be combined with {b} (the sharded experts stay on the GPUs); drop one "
                             "of them"),
    "use_batched_cfg/cfg_parallel": Rule("use_batched_cfg=True", "cfg_parallel=True",
                                         "{b} already runs cond and uncond at once, on two halves of the GPUs; "
                                         "drop {a}"),
    "t5_cpu/t5_fsdp": Rule("t5_cpu=True", "t5_fsdp=True", "{a} cannot be combined with {b}; drop one of them"),
    # a task with one DiT model (ti2v-5B; docs/models.md)
    "offload/one_model": Rule("offload='blocks'", "a one-model task (ti2v-5B)",
                              "{a} streams the blocks of an A14B task's two experts; {b} fits a 24 GB GPU with "
                              "offload='model' (the model leaves the GPU for the VAE decode)"),
    "loras/one_model": Rule("LoRAs", "a one-model task (ti2v-5B)",
                            "{a} merge into an A14B task's experts (high / low noise); {b} is not supported"),
}


def _refuse(key: str, error=PlanError, **words):
    raise error(RULES[key].message(**words))


# ------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class DeviceInfo:
    """The facts plan() needs about the device, read once (`of`) or given (tests)."""
    name: str = "cpu"                      # as torch says it: 'cpu', 'cuda', 'cuda:1'
    type: str = "cpu"
    total_memory_gb: float | None = None   # CUDA: the GPU's memory
    capability: tuple | None = None        # CUDA: (major, minor)
    gpu_name: str = ""
    fp8: tuple | None = None               # (ok, why) of wan_triton.fp8.check_fp8_device; None: not asked

    @classmethod
    def of(cls, device=None, fp8: bool = False) -> "DeviceInfo":
        """Read the facts of `device` (default: cuda when available, else cpu); `fp8` also runs the
        fp8 check (a probe product on a GPU)."""
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        mem = cap = None
        gpu = ""
        if dev.type == "cuda":
            try:
                props = torch.cuda.get_device_properties(dev)
            except (RuntimeError, AssertionError):
                props = None
            if props is not None:
                mem = props.total_memory / 1e9
                cap = (getattr(props, "major", 0), getattr(props, "minor", 0))
                gpu = getattr(props, "name", "")
        verdict = None
        if fp8:
            try:
                _fp8.check_fp8_device(dev)
                verdict = (True, "")
            except _fp8.Fp8Error as err:
                verdict = (False, str(err))
        return cls(str(dev), dev.type, mem, cap, gpu, verdict)


@dataclass(frozen=True)
class Options:
    """What the user asked (None: the preset decides), in API words, plus the state of a pipeline
    that exists already (optimize()). The CLIs build it from their flags, optimize() from its
    keyword arguments."""
    offload: str | None = None           # 'none', 'model', 'blocks'
    offload_model: bool | None = None    # the official switch (True = 'model', False = 'none')
    no_offload: bool = False             # = 'none'
    host_ram: str | None = None          # block streaming's host memory: 'auto', 'high', 'low'
    t5_cpu: bool = False                 # asked; a preset may add it
    triton: bool | None = None
    compile: bool | None = None
    compile_mode: str = "default"
    tf32: bool | None = None
    use_batched_cfg: bool | None = None
    attention: str | None = None         # a backend name; None leaves the current choice
    fp8: bool | None = None              # True quantizes, False dequantizes, None leaves the experts
    parallel: ParallelRequest = field(default_factory=ParallelRequest)
    loras: bool = False                  # LoRAs will be merged into the experts
    checkpoint: bool | None = None       # weights come from files (None: not known yet)
    dit_models: int = 2                  # DiT models the task runs: 2 experts (A14B), 1 (ti2v-5B)
    # the state of an existing pipeline
    streaming: bool = False              # its blocks stream already
    resident_gb: float | None = None     # GB that stay on the GPU with nothing offloaded (None: not measured)
    weights_dtype: str = ""              # the experts' dtype, for the log


@dataclass(frozen=True)
class RunPlan:
    """Every decision of a run. `offload`: 'none', 'model' (the idle expert waits in host memory)
    or 'blocks' (streamed); `stream_from_load`: block streaming starts while loading (nothing has
    to see a whole expert first: no LoRA, no fp8, no sharding); LoRAs always merge first, before
    fp8 and block streaming (`build_pipeline` applies them right after loading). `warnings`:
    lines for the log (a decision the user may not expect)."""
    preset: object                       # the Preset it was made with
    options: Options
    device: DeviceInfo
    offload: str = "none"
    host_ram: str = "auto"
    t5_cpu: bool = False
    triton: bool = True
    compile: bool = False
    compile_mode: str = "default"
    tf32: bool = False
    use_batched_cfg: bool = False
    attention: str | None = None
    fp8: bool | None = None
    parallel: ParallelRequest = field(default_factory=ParallelRequest)
    stream_from_load: bool = False
    warnings: tuple = ()

    @property
    def offload_model(self) -> bool:
        """What generate(offload_model=) gets: the idle expert leaves the GPU."""
        return self.offload == "model"


# ------------------------------------------------------------------ the parts

def preset_offload(preset) -> str:
    """A preset's offload mode: 'blocks' (stream the DiT blocks), 'model' (the idle expert in CPU
    memory) or 'none'."""
    return preset.offload or ("model" if preset.offload_model else "none")


def resolve_offload(offload: str | None, offload_model: bool | None, no_offload: bool) -> tuple:
    """(mode, words) from the ways of asking: `offload`, the official `offload_model` (True / False
    = 'model' / 'none') and `no_offload` (True = 'none'); any two that disagree are a PlanError.
    (None, "") when none is asked."""
    asked = []
    if offload is not None:
        asked.append((f"offload={offload!r}", offload))
    if offload_model is not None:
        asked.append((f"offload_model={offload_model}", "model" if offload_model else "none"))
    if no_offload:
        asked.append(("no_offload=True", "none"))
    for words, mode in asked[1:]:
        if mode != asked[0][1]:
            raise PlanError(f"{asked[0][0]} conflicts with {words}: give one of them")
    if not asked:
        return None, ""
    words, mode = asked[0]
    if mode not in OFFLOAD_MODES:
        raise PlanError(f"unknown offload mode {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")
    return mode, words


def cuda_only(options: Options, preset, device: DeviceInfo) -> list:
    """The rows NO_CUDA that `options` and `preset` ask for, as (key, words)."""
    o = options
    fp8_refused = bool(o.fp8) and device.fp8 is not None and not device.fp8[0]
    asks = (("offload_model/cuda", "offload_model=True", o.offload_model), ("tf32/cuda", "tf32=True", o.tf32),
            ("compile/cuda", "compile=True", o.compile), ("no_offload/cuda", "no_offload=True", o.no_offload),
            ("fp8/cuda", "fp8=True", fp8_refused),
            ("preset/cuda", f"preset={getattr(preset, 'name', '')!r}", getattr(preset, "min_mem_gb", 0) > 0))
    return [(key, words) for key, words, on in asks if on]


def check_cuda_only(options: Options, preset, device: DeviceInfo) -> None:
    """Off CUDA, every CUDA-only feature asked for is said in one line (PlanError; Fp8Error when
    fp8 is among them, with the fp8 check's reason)."""
    if device.type == "cuda":
        return
    asks = cuda_only(options, preset, device)
    if not asks:
        return
    msg = RULES[asks[0][0]].message(a=", ".join(w for _, w in asks), device=device.name)
    if any(key == "fp8/cuda" for key, _ in asks):
        raise _fp8.Fp8Error(f"{msg}; {device.fp8[1]}")
    raise PlanError(msg)


def check_parallel(par: ParallelRequest, offloaded: str | bool = "", t5_cpu: bool = False,
                   use_batched_cfg: bool = False) -> None:
    """The table's rows about multi-GPU runs. `offloaded`: the offload asked for (its words, or True
    when only known to be 'model' or 'blocks'; '' / False: none); `t5_cpu` and `use_batched_cfg`:
    whether they were asked. PlanError."""
    if par.dit_fsdp and offloaded:
        _refuse("offload/dit_fsdp", a=offloaded if isinstance(offloaded, str) else None)
    if par.cfg_parallel and use_batched_cfg:
        _refuse("use_batched_cfg/cfg_parallel")
    if par.t5_fsdp and t5_cpu:
        _refuse("t5_cpu/t5_fsdp")


# ------------------------------------------------------------------ the plan

def plan(options: Options, preset, device: DeviceInfo) -> RunPlan:
    """Every decision of a run from what was asked, a preset and the device's facts; PlanError
    (Fp8Error for fp8 on a device without native e4m3) naming the arguments in API words.
    Explicit requests that cannot work are errors; a preset's defaults that cannot work here
    are turned off."""
    o, p, par = options, preset, options.parallel
    cuda = device.type == "cuda"
    check_cuda_only(o, p, device)
    if o.fp8 and cuda and device.fp8 is not None and not device.fp8[0]:
        _refuse("fp8/native", error=_fp8.Fp8Error, why=device.fp8[1])
    if o.fp8 and par.dit_fsdp:
        _refuse("fp8/dit_fsdp")
    asked, words = resolve_offload(o.offload, o.offload_model, o.no_offload)
    if o.streaming and asked not in (None, "blocks"):
        _refuse("offload/streaming", a=words)
    if asked is not None and not o.streaming:
        try:  # wan's rule for where offloading runs
            check_offload_device(asked, device.name, what=words)
        except OffloadError as err:
            raise PlanError(str(err)) from None
    check_parallel(par, words if asked not in (None, "none") else "", o.t5_cpu, bool(o.use_batched_cfg))
    if o.dit_models == 1 and asked == "blocks":
        _refuse("offload/one_model", a=words)
    if o.dit_models == 1 and o.loras:
        _refuse("loras/one_model")

    warnings = []
    if o.streaming:  # a pipeline that streams its blocks keeps streaming
        offload = "blocks"
    elif not cuda or par.dit_fsdp:  # nothing to move on a CPU; sharded experts stay on the GPUs
        offload = "none"
    else:
        offload = asked or preset_offload(p)
    if o.dit_models == 1 and offload == "blocks":  # a preset's streaming: the one model waits in CPU memory instead
        offload = "model"
        warnings.append(f"preset {p.name} streams the DiT blocks of an A14B task; this task has one model, which "
                        "waits in CPU memory during the VAE decode instead (offload='model')")
    if (cuda and offload == "none" and asked is None and not par.dit_fsdp and o.resident_gb is not None
            and device.total_memory_gb is not None and not fits_resident(o.resident_gb, device.total_memory_gb)):
        offload = "model"
        warnings.append(f"preset {p.name} keeps both experts on the GPU, but the resident weights take "
                        f"{o.resident_gb:.1f} GB (experts in {o.weights_dtype or 'their dtype'}) and a generation "
                        f"needs ~{RESIDENT_HEADROOM_GB:.0f} GB more, over this GPU's {device.total_memory_gb:.1f} "
                        "GB: the idle expert will wait in CPU memory (--convert_model_dtype stores the experts in "
                        "bf16; --offload_model False forces them resident)")

    compile_ = bool(p.compile if o.compile is None else o.compile) and cuda
    if offload == "blocks" and compile_:  # compiled blocks would run the streaming hooks inside the graph
        if o.compile:
            b = words if asked == "blocks" else (
                "a pipeline that streams its blocks" if o.streaming else f"offload='blocks' (preset {p.name})")
            _refuse("compile/blocks", b=b)
        compile_ = False

    if o.host_ram is not None:
        if o.host_ram not in HOST_RAM_MODES:
            raise PlanError(f"unknown host_ram mode {o.host_ram!r}; choose from {', '.join(HOST_RAM_MODES)}")
        if offload != "blocks":
            _refuse("host_ram/offload", a=f"host_ram={o.host_ram!r}", b=f"offload={offload!r}")
        if o.host_ram == "low" and o.checkpoint is False:
            _refuse("host_ram_low/random")
        if o.host_ram == "low" and o.fp8:
            _refuse("host_ram_low/fp8")

    batched = bool(p.use_batched_cfg if o.use_batched_cfg is None else o.use_batched_cfg) and not par.cfg_parallel
    return RunPlan(
        preset=p, options=o, device=device, offload=offload, host_ram=o.host_ram or "auto",
        t5_cpu=(o.t5_cpu or p.t5_cpu) and not par.t5_fsdp,
        triton=bool(p.triton if o.triton is None else o.triton), compile=compile_, compile_mode=o.compile_mode,
        tf32=bool(p.tf32 if o.tf32 is None else o.tf32) and cuda, use_batched_cfg=batched,
        attention=o.attention, fp8=o.fp8, parallel=par,
        stream_from_load=offload == "blocks" and cuda and not o.streaming and not o.loras and not o.fp8,
        warnings=tuple(warnings))
