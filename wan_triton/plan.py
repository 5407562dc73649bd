"""One resolved plan: what a run turns on, decided once.

    Options (what the user asked; None: the preset decides)  --+
    a Preset (what a class of GPU turns on, wan_triton.accel)   +--> plan() --> RunPlan (frozen)
    DeviceInfo (the device's facts, read once)                 --+

`plan()` is a pure function: it reads no model, calls no CUDA function and changes nothing; the
facts it needs (device type, GPU memory, compute capability, the fp8 and attention verdicts, the
weights' sizes) come in through `Options` and `DeviceInfo`. It is called once per run: by the
CLIs (wan_triton.request.parse_request, from their flags, before any model is built) and by the
Python API (`wan_triton.optimize`, from its keyword arguments and the pipeline's state). What
comes after (wan_triton.build.build_pipeline, wan_triton.accel.apply, the benchmark's modes)
carries the RunPlan out and decides nothing.

Every refusal is a row of one table, `RULES`: a key, its condition (`when`, over a `Case`: the
options as asked, the preset, the device's facts, the offload mode decided) and its reason (a
one-line message whose fields `says` fills). plan() checks the rows in order and raises the first
that holds. Messages name the options as `wan.naming.Arg`s: `offload='blocks'` in the API, the
flags in the CLIs (wan_triton.flag_words). Adding a rule is one `Rule(...)` row below (where in
the order its message should win) and one case in tests/test_plan.py (`CASES`: the test fails
until every row has a case that reaches it through both the CLI and the API, where both can ask).

Rules about wan's own objects stay in wan and are read from here: where offloading runs
(`wan.offload.offload_runs_on`), torchrun's world (`wan.parallel.check_request`, called by the
CLIs before they plan), the step cache's (`wan.step_cache`: its values, checked before the rows;
the words and conditions of its rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from wan import attention as att
from wan.hostmem import HOST_RAM_MODES
from wan.naming import Arg, Text
from wan.offload import OFFLOAD_MODES, offload_runs_on
from wan.parallel import ParallelRequest
from wan.step_cache import (CFG_PARALLEL_REASON, NO_RATIOS_REASON, CacheError, CachePolicy, cfg_cache_conflicts,
                            no_ratios_args)
from wan.vae import VAE_DTYPES

from . import fp8 as _fp8
from .errors import PlanError
from .fp8_attention import ensure_registered

__all__ = ["Options", "DeviceInfo", "RunPlan", "Case", "Rule", "RULES", "COMPILE_MODES", "plan", "check_rules",
           "fits_resident", "RESIDENT_HEADROOM_GB", "MODES", "cache_policy"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MODES = ("reference", "optimized")  # the benchmark's: the official state first, then the plan's

# Memory a generation needs beyond the resident weights, measured at 1280x720x81 on the H200
# (bench/RESULTS.md): an A14B forward 12.5 GB of activations (41.1 GB peak - 28.6 GB weights),
# the fp32 VAE decode 23.1 GB. A preset that keeps both experts resident does so only when
# the weights plus this headroom fit in the GPU (720p is the largest size: smaller ones fit too).
RESIDENT_HEADROOM_GB = 30.0


def fits_resident(weights_gb: float, gpu_gb: float, headroom_gb: float = RESIDENT_HEADROOM_GB) -> bool:
    return weights_gb + headroom_gb <= gpu_gb


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
    attention: tuple | None = None         # (name, why not ('' when it runs), available backends); None: not asked
    triton_interpret: bool = False         # TRITON_INTERPRET=1: the Triton kernels run on the CPU (slowly)

    @property
    def kernels_run(self) -> bool:
        """Whether the Triton kernels run here: on CUDA, or anywhere under the interpreter."""
        return self.type == "cuda" or self.triton_interpret

    @classmethod
    def of(cls, device=None, fp8: bool = False, attention: str | None = None) -> "DeviceInfo":
        """Read the facts of `device` (default: cuda when available, else cpu); `fp8` also runs the
        fp8 check (a probe product on a GPU), `attention` asks whether that backend runs here."""
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
        backend = None
        if attention not in (None, att.AUTO):
            ensure_registered(attention)
            why = att.unavailable_reason(attention, dev)
            backend = (attention, why, tuple(att.available_backends(dev, lossy=False)) if why else ())
        return cls(str(dev), dev.type, mem, cap, gpu, verdict, backend, os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class Options:
    """What the user asked (None: the preset decides), in API words, and the facts about the
    weights a decision needs. The CLIs build it from their flags (wan_triton.request), optimize()
    from its keyword arguments and the state of the pipeline it is given."""
    offload: str | None = None           # 'none', 'model', 'blocks'
    offload_as: Arg | None = None        # how the offload was asked, for messages (default: offload=<mode>)
    host_ram: str | None = None          # block streaming's host memory: 'auto', 'high', 'low'
    t5_cpu: bool = False                 # asked (or where the pipeline's T5 is); a preset may add it
    triton: bool | None = None           # None: the kernels wherever they run
    compile: bool | None = None
    compile_mode: str = "default"
    tf32: bool | None = None
    use_batched_cfg: bool | None = None
    attention: str | None = None         # a backend name; None leaves the current choice
    fp8: bool | None = None              # True quantizes, False dequantizes, None leaves the experts
    vae_dtype: str | None = None         # the VAE's dtype: 'fp32' (official), 'bf16' (lossy); None leaves it
    parallel: ParallelRequest = field(default_factory=ParallelRequest)
    cache: CachePolicy | None = None     # the step cache (cache_policy()); None leaves the pipeline's
    loras: bool = False                  # LoRAs will be merged into the experts
    fp8_files: bool = False              # the experts are read from fp8 expert files (fp8_dir; wan_triton.fp8_files)
    t5_release: bool | None = None       # free the text encoder after encoding (re-read per video); None: the preset
    dit_models: int = 2                  # DiT models the task runs: 2 experts (A14B), 1 (ti2v-5B)
    modes: tuple = ("optimized",)        # the benchmark may run the reference (official) mode first
    # the weights: where they come from, their size, the state of a pipeline that exists already
    checkpoint: bool | None = None       # weights come from files (None: not known)
    diffusers_layout: bool = False       # ... in the diffusers layout (read whole: not streamed from load)
    experts_gb: float | None = None      # the DiT models' weights on the GPU (fp8 counted when asked); None: unknown
    t5_gb: float = 0.0                   # the text encoder's weights
    weights_dtype: str = ""              # the experts' dtype, for the log
    streaming: bool = False              # the pipeline's blocks stream already


@dataclass(frozen=True)
class RunPlan:
    """Every decision of a run. `offload`: 'none', 'model' (the idle expert waits in host memory)
    or 'blocks' (streamed); `reference_offload`: the benchmark's reference mode's ('model' on CUDA,
    the official default, unless 'none' or 'model' was asked); `build_offload`: where the build
    puts the experts ('blocks': streamed from load, nothing sees a whole expert: no LoRA, no fp8
    unless read from fp8 expert files, no reference mode, not the diffusers layout; 'model': the
    idle expert waits on the host, also until block streaming starts; 'none'). LoRAs always merge
    first, before fp8 and block streaming. `t5_release`: the text encoder's weights are freed
    after encoding, read again for the next video. `warnings`: `wan.naming.Text` lines for the
    log (a decision the user may not expect)."""
    preset: object                       # the Preset it was made with
    options: Options
    device: DeviceInfo
    offload: str = "none"
    reference_offload: str = "none"
    build_offload: str = "none"
    host_ram: str = "auto"
    t5_cpu: bool = False
    triton: bool = True
    compile: bool = False
    compile_mode: str = "default"
    tf32: bool = False
    use_batched_cfg: bool = False
    attention: str | None = None
    fp8: bool | None = None
    vae_dtype: str | None = None         # cast by apply (wan.vae.VAE_DTYPES); bf16 is lossy
    parallel: ParallelRequest = field(default_factory=ParallelRequest)
    cache: CachePolicy | None = None     # switched on by apply (wan.step_cache.enable_step_cache); lossy
    resident_gb: float | None = None     # the weights that stay on the GPU with nothing offloaded
    t5_release: bool = False
    warnings: tuple = ()

    @property
    def stream_from_load(self) -> bool:
        return self.build_offload == "blocks"


# ------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Case:
    """What a rule reads: the options as asked (`o`), the preset, the device's facts and the
    offload mode decided from them (`offload`)."""
    o: Options
    preset: object
    device: DeviceInfo
    offload: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def offload_arg(self) -> Arg:
        """The offload as it was asked (the CLI may have asked offload_model=True), else as decided."""
        return self.o.offload_as or Arg("offload", self.offload if self.o.offload is None else self.o.offload)

    def cuda_asks(self) -> list:
        """The options asked (or the preset's) that need a CUDA GPU, as Args."""
        o, p = self.o, self.preset
        asks = [(self.offload_arg, o.offload is not None and not offload_runs_on(o.offload, self.device.name)),
                (Arg("tf32", True), bool(o.tf32)), (Arg("compile", True), bool(o.compile)),
                (Arg("preset", getattr(p, "name", "")), getattr(p, "min_mem_gb", 0) > 0)]
        return [a for a, on in asks if on]


@dataclass(frozen=True)
class Rule:
    """One refusal: when `when(case)` holds, `error(reason, **says(case))` is raised. `reason` is
    the one-line message; `says` fills its fields (Args for the options, plain facts otherwise)."""
    key: str
    when: Callable[[Case], bool]
    reason: str
    says: Callable[[Case], dict]
    error: type = PlanError

    def refuse(self, **fields) -> Exception:
        """The rule's error with these fields (also for callers that meet the case elsewhere)."""
        return self.error(self.reason, **fields)


def _compile_blocks_with(c: Case) -> dict:
    """Words for compile/blocks: what streams (asked, the pipeline, or the preset)."""
    if c.o.offload == "blocks":
        b, source = c.offload_arg, ""
    elif c.o.streaming:
        b, source = "a pipeline that streams its blocks", ""
    else:
        b, source = Arg("offload", "blocks"), f" (preset {c.preset.name})"
    return dict(a=Arg("compile", True), b=b, source=source, model=Arg("offload", "model"))


RULES = {r.key: r for r in (
    # names that do not exist (the CLIs' choices refuse them first)
    Rule("offload/unknown", lambda c: c.o.offload not in (None, *OFFLOAD_MODES),
         "{a} is not an offload mode; choose from {choices}",
         lambda c: dict(a=c.offload_arg, choices=", ".join(OFFLOAD_MODES))),
    Rule("host_ram/unknown", lambda c: c.o.host_ram not in (None, *HOST_RAM_MODES),
         "{a} is not a host RAM mode; choose from {choices}",
         lambda c: dict(a=Arg("host_ram", c.o.host_ram), choices=", ".join(HOST_RAM_MODES))),
    Rule("vae_dtype/unknown", lambda c: c.o.vae_dtype not in (None, *VAE_DTYPES),
         "{a} is not a VAE dtype; choose from {choices}",
         lambda c: dict(a=Arg("vae_dtype", c.o.vae_dtype), choices=", ".join(VAE_DTYPES))),
    Rule("compile_mode/unknown", lambda c: c.o.compile_mode not in COMPILE_MODES,
         "{a} is not a torch.compile mode; choose from {choices}",
         lambda c: dict(a=Arg("compile_mode", c.o.compile_mode), choices=", ".join(COMPILE_MODES))),
    # what this device or this pipeline cannot run
    Rule("attention/device", lambda c: c.device.attention is not None and c.device.attention[0] == c.o.attention
         and bool(c.device.attention[1]),
         "{a} is not available on {device} (available: {available}): {why}",
         lambda c: dict(a=Arg("attention", c.o.attention), device=c.device.name,
                        available=", ".join(c.device.attention[2]), why=c.device.attention[1])),
    Rule("fp8/device", lambda c: bool(c.o.fp8) and c.device.fp8 is not None and not c.device.fp8[0],
         "{a}: {why}", lambda c: dict(a=Arg("fp8", True), why=c.device.fp8[1]), error=_fp8.Fp8Error),
    Rule("offload/streaming", lambda c: c.o.streaming and c.o.offload not in (None, "blocks"),
         "the pipeline already streams its DiT blocks; {a} would need wan.offload.disable_pipeline_streaming(pipe) "
         "first", lambda c: dict(a=c.offload_arg)),
    Rule("cuda", lambda c: not c.cuda and bool(c.cuda_asks()),
         "{asks} needs a CUDA GPU, and none is in use (device {device})",
         lambda c: dict(asks=c.cuda_asks(), device=c.device.name)),
    # options that do not work together
    Rule("compile/blocks", lambda c: bool(c.o.compile) and c.offload == "blocks",
         "{a} does not work with {b}{source}: compiled blocks would run the streaming hooks inside the graph; use "
         "one or the other ({model} compiles)", _compile_blocks_with),
    Rule("fp8/dit_fsdp", lambda c: bool(c.o.fp8) and c.o.parallel.dit_fsdp,
         "{a} does not work with {b} (the shards hold the bf16 weights): use one or the other",
         lambda c: dict(a=Arg("fp8", True), b=Arg("dit_fsdp", True))),
    Rule("host_ram/offload", lambda c: c.o.host_ram is not None and c.offload != "blocks",
         "{a} applies to block streaming, and the offload mode here is {b}: add {blocks} (CUDA only)",
         lambda c: dict(a=Arg("host_ram", c.o.host_ram), b=Arg("offload", c.offload),
                        blocks=Arg("offload", "blocks"))),
    Rule("host_ram_low/random", lambda c: c.o.host_ram == "low" and c.o.checkpoint is False,
         "{a} re-reads the idle expert from its checkpoint files, and {b} have none: give {ckpt}",
         lambda c: dict(a=Arg("host_ram", "low"), b="random weights", ckpt=Arg("ckpt_dir", "<folder>", literal=True))),
    Rule("host_ram_low/fp8", lambda c: c.o.host_ram == "low" and bool(c.o.fp8) and not c.o.fp8_files,
         "{a} re-reads the idle expert from its files, and with {b} those must be fp8 expert files (the "
         "checkpoint's are bf16): give {fp8_dir} (written there once), or use {high}",
         lambda c: dict(a=Arg("host_ram", "low"), b=Arg("fp8", True),
                        fp8_dir=Arg("fp8_dir", "<folder>", literal=True), high=Arg("host_ram", "high"))),
    Rule("fp8_files/reference", lambda c: c.o.fp8_files and "reference" in c.o.modes,
         "{a} loads fp8 experts, and the reference mode runs the official bf16 ones: use {fp8} (quantized after "
         "the reference run) or {optimized}", lambda c: dict(a=Arg("fp8_dir"), fp8=Arg("fp8", True),
                                                            optimized=Arg("mode", "optimized"))),
    Rule("offload/dit_fsdp", lambda c: c.o.parallel.dit_fsdp and c.o.offload in ("model", "blocks"),
         "{a} cannot be combined with {b} (the sharded experts stay on the GPUs); drop one of them",
         lambda c: dict(a=c.offload_arg, b=Arg("dit_fsdp", True))),
    Rule("use_batched_cfg/cfg_parallel", lambda c: bool(c.o.use_batched_cfg) and c.o.parallel.cfg_parallel,
         "{b} already runs cond and uncond at once, on two halves of the GPUs; drop {a}",
         lambda c: dict(a=Arg("use_batched_cfg", True), b=Arg("cfg_parallel", True))),
    Rule("t5_cpu/t5_fsdp", lambda c: c.o.t5_cpu and c.o.parallel.t5_fsdp,
         "{a} cannot be combined with {b}; drop one of them",
         lambda c: dict(a=Arg("t5_cpu", True), b=Arg("t5_fsdp", True))),
    # the step cache (wan.step_cache; docs/caching.md)
    Rule("cache_threshold/cache", lambda c: c.o.cache is not None and c.o.cache.criterion == "none"
         and c.o.cache.threshold is not None,
         "{a} is the threshold of a step cache, and none is on ({b}): add {easy} or {mag}",
         lambda c: dict(a=Arg("cache_threshold", c.o.cache.threshold), b=Arg("cache", "none"),
                        easy=Arg("cache", "easy"), mag=Arg("cache", "mag"))),
    Rule("cache_mag/random", lambda c: c.o.cache is not None and c.o.cache.criterion == "mag"
         and c.o.cache.ratios_file is None and c.o.checkpoint is False,
         NO_RATIOS_REASON, lambda c: no_ratios_args()),
    Rule("cache_cfg/cfg_parallel", lambda c: cfg_cache_conflicts(c.o.cache, c.o.parallel.cfg_parallel),
         CFG_PARALLEL_REASON, lambda c: dict(a=Arg("cache_cfg", c.o.cache.cfg_interval), b=Arg("cfg_parallel", True))),
    # a task with one DiT model (ti2v-5B; docs/models.md)
    Rule("offload/one_model", lambda c: c.o.dit_models == 1 and c.o.offload == "blocks",
         "{a} streams the blocks of an A14B task's two experts; {b} fits a 24 GB GPU with {model} (the model "
         "leaves the GPU for the VAE decode)",
         lambda c: dict(a=c.offload_arg, b="a one-model task (ti2v-5B)", model=Arg("offload", "model"))),
    Rule("loras/one_model", lambda c: c.o.dit_models == 1 and c.o.loras,
         "{a} merge into an A14B task's experts (high / low noise); {b} is not supported",
         lambda c: dict(a="LoRAs", b="a one-model task (ti2v-5B)")),
    Rule("cache/one_model", lambda c: c.o.dit_models == 1 and c.o.cache is not None and c.o.cache.active,
         "{a} runs in an A14B task's expert loop; {b} is not supported",
         lambda c: dict(a="the step cache", b="a one-model task (ti2v-5B)")),
    Rule("fp8_files/one_model", lambda c: c.o.dit_models == 1 and c.o.fp8_files,
         "{a} are written from an A14B task's two experts; {b} is not supported",
         lambda c: dict(a="fp8 expert files", b="a one-model task (ti2v-5B)")),
)}


def check_rules(case: Case) -> None:
    """Raise the first row of RULES whose condition holds (after the step cache's own value checks,
    wan.step_cache.CachePolicy.check, as PlanErrors)."""
    if case.o.cache is not None:
        try:
            case.o.cache.check()
        except CacheError as err:
            raise PlanError(err.template, **err.fields) from None
    for rule in RULES.values():
        if rule.when(case):
            raise rule.refuse(**rule.says(case))


# ------------------------------------------------------------------ the decisions

def _offload(o: Options, p, device: DeviceInfo, t5_cpu: bool) -> tuple:
    """(mode, resident GB, warnings): what was asked, else the preset's; nothing moves off CUDA and
    sharded experts stay on the GPUs; a preset that keeps both experts resident offloads the idle
    one when the resident weights plus the headroom exceed the GPU."""
    resident = None if o.experts_gb is None else o.experts_gb + (0.0 if t5_cpu else o.t5_gb)
    if o.streaming:  # a pipeline that streams its blocks keeps streaming
        return "blocks", resident, ()
    if device.type != "cuda" or o.parallel.dit_fsdp:
        return "none", resident, ()
    mode = o.offload or p.offload
    if o.dit_models == 1 and o.offload is None and mode == "blocks":  # nothing to stream: one model
        note = Text("preset {preset} streams the DiT blocks of an A14B task; this task has one model, which waits "
                    "in CPU memory during the VAE decode instead ({model})", preset=p.name,
                    model=Arg("offload", "model"))
        return "model", resident, (note,)
    if (mode == "none" and o.offload is None and resident is not None and device.total_memory_gb is not None
            and not fits_resident(resident, device.total_memory_gb)):
        note = Text("preset {preset} keeps both experts on the GPU, but the resident weights take {gb:.1f} GB "
                    "(experts in {dtype}) and a generation needs ~{head:.0f} GB more, over this GPU's {gpu:.1f} GB: "
                    "the idle expert will wait in CPU memory ({convert} stores the experts in bf16; {none} keeps "
                    "them resident)", preset=p.name, gb=resident, dtype=o.weights_dtype or "their dtype",
                    head=RESIDENT_HEADROOM_GB, gpu=device.total_memory_gb,
                    convert=Arg("convert_model_dtype", True), none=Arg("offload", "none"))
        return "model", resident, (note,)
    return mode, resident, ()


def _reference_offload(o: Options, device: DeviceInfo) -> str:
    """The benchmark's reference mode: what was asked when it is 'none' or 'model', else the
    official default ('model' on CUDA); sharded experts stay on the GPUs."""
    if device.type != "cuda" or o.parallel.dit_fsdp:
        return "none"
    return o.offload if o.offload in ("none", "model") else "model"


def _build_offload(o: Options, offload: str, reference: str, cuda: bool) -> str:
    """Where the build puts the experts (see RunPlan)."""
    if o.streaming or not cuda:
        return offload
    if "reference" in o.modes:
        return reference
    if offload == "blocks":
        return "model" if o.loras or (o.fp8 and not o.fp8_files) or o.diffusers_layout else "blocks"
    return offload


def cache_policy(cache=None, cache_threshold=None, cache_cfg=None, cache_ratios=None) -> CachePolicy | None:
    """The step cache asked for, from its API words (the CLIs' --cache, --cache_threshold,
    --cache_cfg, --cache_ratios): a criterion name ('none', 'easy', 'mag') or a whole CachePolicy;
    None when nothing is asked (the pipeline's stays)."""
    if isinstance(cache, CachePolicy):
        if any(v is not None for v in (cache_threshold, cache_cfg, cache_ratios)):
            raise PlanError("{a} holds its threshold, CFG interval and ratios: give them there",
                            a=Arg("cache", "CachePolicy(...)", literal=True))
        return cache
    if all(v is None for v in (cache, cache_threshold, cache_cfg, cache_ratios)):
        return None
    return CachePolicy(cache or "none", cache_threshold, 0 if cache_cfg is None else cache_cfg,
                       ratios_file=None if cache_ratios is None else str(cache_ratios))


def plan(options: Options, preset, device: DeviceInfo) -> RunPlan:
    """Every decision of a run from what was asked, a preset and the device's facts; the first
    row of RULES that holds is raised (a PlanError, or the row's error: Fp8Error for fp8 on a
    device without native e4m3), naming the options as Args. Explicit requests that cannot work
    are errors; a preset's defaults that cannot work here are turned off."""
    o, p, par = options, preset, options.parallel
    cuda = device.type == "cuda"
    t5_cpu = (o.t5_cpu or (p.t5_cpu and "optimized" in o.modes)) and not par.t5_fsdp
    t5_release = (p.t5_release and "optimized" in o.modes if o.t5_release is None else o.t5_release)
    offload, resident, warnings = _offload(o, p, device, t5_cpu)
    check_rules(Case(o, p, device, offload))
    reference = _reference_offload(o, device)
    return RunPlan(
        preset=p, options=o, device=device, offload=offload, reference_offload=reference,
        build_offload=_build_offload(o, offload, reference, cuda), host_ram=o.host_ram or "auto", t5_cpu=t5_cpu,
        triton=device.kernels_run if o.triton is None else o.triton,
        # a preset's compile gives way to streaming (an asked one was refused above)
        compile=bool(p.compile if o.compile is None else o.compile) and cuda and offload != "blocks",
        compile_mode=o.compile_mode, tf32=bool(p.tf32 if o.tf32 is None else o.tf32) and cuda,
        use_batched_cfg=bool(p.use_batched_cfg if o.use_batched_cfg is None else o.use_batched_cfg)
        and not par.cfg_parallel, attention=o.attention, fp8=o.fp8, vae_dtype=o.vae_dtype, parallel=par,
        cache=o.cache, resident_gb=resident, t5_release=bool(t5_release) and not par.t5_fsdp, warnings=warnings)
