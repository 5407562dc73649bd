"""Acceleration layers on top of the reference pipeline: TF32, regional torch.compile,
batched CFG, attention choice, hardware presets, and `optimize()` that applies them.

None of these re-implement the model: they flip switches on the `wan` objects. What to switch
is decided by wan_triton.plan (`plan()`, one table of rules); `optimize()` makes the plan from its
arguments and the pipeline's state, then `apply()` carries it out.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from wan import attention as att
from wan.parallel import ParallelRequest
from wan.streaming import OffloadError

from . import fp8 as _fp8
from .errors import AccelError, PlanError
from .fp8_attention import ensure_registered
from .patch import patch
from .plan import RULES, DeviceInfo, Options, RunPlan, check_cuda_only, plan, preset_offload

log = logging.getLogger("wan_triton")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


# ------------------------------------------------------------------ TF32

def set_tf32(matmul: bool, cudnn: bool) -> dict:
    """Set TF32 for fp32 matmuls and for cuDNN convolutions; returns the previous settings."""
    prev = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
    return prev


def enable_tf32(enabled: bool = True) -> dict:
    """Allow TF32 in fp32 matmuls and convolutions; returns the previous settings for restore_tf32."""
    return set_tf32(enabled, enabled)


def official_tf32() -> dict:
    """PyTorch's defaults, which the official code runs under: fp32 matmuls exact (no TF32),
    cuDNN convolutions (the VAE) with TF32. Returns the previous settings."""
    return set_tf32(matmul=False, cudnn=True)


def restore_tf32(prev: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = prev["matmul"]
    torch.backends.cudnn.allow_tf32 = prev["cudnn"]


# ------------------------------------------------------------------ torch.compile

def compile_blocks(model, mode: str = "default", dynamic: bool | None = False):
    """Regional compile: each DiT block is compiled in place (the 40 blocks share one graph,
    so it compiles once). The patched Triton kernels are custom ops, traced without breaks."""
    if mode not in COMPILE_MODES:
        raise AccelError(f"unknown compile mode {mode!r}; choose from {COMPILE_MODES}")
    if getattr(model, "_block_streamer", None) is not None:
        raise PlanError(RULES["compile/blocks"].message(b="a model that streams its blocks"))
    for blk in model.blocks:
        blk.compile(mode=mode, dynamic=dynamic)
    return model


# ------------------------------------------------------------------ presets

@dataclass(frozen=True)
class Preset:
    """What to turn on for a class of GPU (memory decides offloading and T5 placement).
    `note` is the one-line reason, shown in --help and in the start-up log."""
    name: str
    offload_model: bool
    t5_cpu: bool
    use_batched_cfg: bool = False
    compile: bool = False
    tf32: bool = False
    triton: bool = True
    min_mem_gb: float = 0.0
    note: str = ""
    offload: str = ""  # "blocks": stream the DiT blocks (wan.streaming); "" follows offload_model


# Chosen from measurements on an H200 (bench/RESULTS.md, 2026-11-30), not from hopes:
# - Triton kernels: 1.15x per A14B forward at 720p, 1.26x at 480p -> on wherever they run.
# - batched CFG: no faster than two calls (22.45 s vs 22.11 s per 720p step; the forward is
#   compute-bound) and 9.6 GB more memory -> off; --use_batched_cfg turns it on.
# - regional compile: ~1% per forward after an 11-28 s first call -> off for one video;
#   --compile pays off in a process that makes several.
# - TF32: only the tiny fp32 GEMMs (time embedding, head) would change -> off (exactness).
# So a preset decides what memory decides: whether the idle expert and the T5 leave the GPU.
PRESETS = {p.name: p for p in (
    Preset("h200", offload_model=False, t5_cpu=False, min_mem_gb=120,
           note="both bf16 experts (57 GB) and the T5 (11 GB) stay on the GPU"),
    Preset("h100", offload_model=True, t5_cpu=False, min_mem_gb=75,
           note="one expert on the GPU (28.6 GB + 12.5 GB of 720p activations + T5 11 GB); the idle one waits "
                "in CPU memory"),
    Preset("a100-40g", offload_model=True, t5_cpu=False, min_mem_gb=38, offload="blocks",
           note="one expert on the GPU at 720p needs 41.1 GB: DiT blocks stream from pinned CPU memory (~15 GB "
                "on the GPU), T5 stays on the GPU"),
    Preset("l40s", offload_model=True, t5_cpu=True, min_mem_gb=44,
           note="one expert on the GPU (41.1 GB at 720p), T5 on the CPU"),
    Preset("rtx4090", offload_model=True, t5_cpu=True, min_mem_gb=22, offload="blocks",
           note="A14B at 720p in 24 GB: DiT blocks stream from pinned CPU memory (57 GB of host RAM for both "
                "experts), T5 on the CPU"),
    Preset("cpu", offload_model=False, t5_cpu=False, triton=False, note="no GPU: reference ops"),
)}
# Other names for the same settings (an 80 GB A100 is an H100 for memory purposes): defined
# once above, listed under both names.
PRESET_ALIASES = {"a100-80g": "h100"}
PRESETS.update({alias: replace(PRESETS[name], name=alias) for alias, name in PRESET_ALIASES.items()})
# What --preset accepts: auto (detect the GPU), none (no preset: only the flags), then the presets.
PRESET_CHOICES = ("auto", "none", *PRESETS)


def preset_help() -> str:
    """One line per preset, for --help."""
    alias = {v: k for k, v in PRESET_ALIASES.items()}
    return "; ".join(f"{n}{' (= ' + alias[n] + ')' if n in alias else ''}: {p.note}" for n, p in PRESETS.items()
                     if n not in PRESET_ALIASES)


def detect_preset(device=None) -> Preset:
    """Pick a preset from the GPU's name and memory ('cpu' without CUDA)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return PRESETS["cpu"]
    return preset_for(DeviceInfo.of(device or "cuda"))


def preset_for(info: DeviceInfo) -> Preset:
    """The preset of a device, from its facts: 'cpu' off CUDA, else by the GPU's name, else by its
    memory."""
    if info.type != "cuda":
        return PRESETS["cpu"]
    mem = info.total_memory_gb or 0.0
    name = info.gpu_name.lower()
    for key in ("h200", "h100", "l40s", "4090"):
        if key in name:
            return PRESETS["rtx4090" if key == "4090" else key]
    for p in sorted((p for p in PRESETS.values() if p.name != "cpu"), key=lambda p: -p.min_mem_gb):
        if mem >= p.min_mem_gb:
            return p
    return PRESETS["rtx4090"]


def preset_flags(p: Preset) -> str:
    """The CLI flags a preset amounts to, for messages."""
    return f"--offload {preset_offload(p)}" + (" --t5_cpu" if p.t5_cpu else "")


def oom_hint(device=None) -> str:
    """What to try after an out-of-memory error: the preset that fits this GPU, else the
    smallest footprint (block streaming, T5 on CPU: 1280*720 fits 24 GB)."""
    try:
        p = detect_preset(device)
    except (RuntimeError, AssertionError):
        p = PRESETS["cpu"]
    small = "--offload blocks --t5_cpu (fits 24 GB at 1280*720)"
    if p.name == "cpu":
        return f"try {small}"
    return f"try --preset {p.name} ({preset_flags(p)}), or if that ran, {small}"


def no_preset(device) -> Preset:
    """`--preset none`: only what the flags say, the official offloading default (on with CUDA),
    and the kernels wherever they can run (CUDA, or the Triton interpreter on CPU)."""
    device = torch.device(device)
    kernels_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return Preset("none", offload_model=device.type == "cuda", t5_cpu=False, triton=kernels_here,
                  note="only the flags")


def find_preset(name: str, info: DeviceInfo) -> Preset:
    """A preset by name for a device of known facts: 'auto' picks it (preset_for), 'none' is
    `no_preset`. Whether it can run there is the plan's rule (a GPU preset needs CUDA)."""
    if name == "auto":
        return preset_for(info)
    if name == "none":
        return no_preset(info.name)
    if name not in PRESETS:
        raise AccelError(f"unknown preset {name!r}; choose from {', '.join(PRESET_CHOICES)}")
    return PRESETS[name]


def get_preset(name: str = "auto", device=None) -> Preset:
    """A preset by name for `device` (default: cuda when available): 'auto' detects the GPU, 'none'
    is `no_preset(device)`; a GPU preset without CUDA is a PlanError (the plan's rule)."""
    info = DeviceInfo.of(device)
    p = find_preset(name, info)
    check_cuda_only(Options(), p, info)
    return p


# ------------------------------------------------------------------ optimize

def resident_gb(pipeline) -> float:
    """GB of weights that stay on the GPU when nothing is offloaded: the DiT models (both experts,
    or ti2v-5B's one), plus the T5 unless it runs on the CPU."""
    mods = list(pipeline.dit_models())
    if not pipeline.t5_cpu:
        mods.append(pipeline.text_encoder.model)
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters()) / 1e9


@dataclass(frozen=True)
class Optimized:
    """What `optimize()` applied. Pass `offload_model` to generate(); give `tf32_prev` to
    restore_tf32() to undo the TF32 switch (None when TF32 was not touched)."""
    preset: str
    note: str
    triton: bool
    patched: tuple = ()
    compile: bool = False
    compile_mode: str = "default"
    tf32: bool = False
    use_batched_cfg: bool = False
    offload_model: bool = False      # offload == "model"
    offload: str = "none"            # 'none', 'model' (the idle expert in CPU memory) or 'blocks' (streamed)
    attention: str | None = None
    fp8: bool = False                # the experts' block linears in e4m3 (wan_triton.fp8; lossy)
    tf32_prev: dict | None = field(default=None, compare=False)

    def summary(self) -> str:
        """One readable line for the start-up log."""
        onoff = {True: "on", False: "off"}
        kern = f"on ({len(self.patched)} ops)" if self.patched else ("off" if not self.triton else "unavailable")
        comp = f"on ({self.compile_mode})" if self.compile else "off"
        att = f", attention {self.attention}" if self.attention else ""
        where = ("DiT blocks streamed from CPU memory" if self.offload == "blocks"
                 else f"idle expert offloaded to CPU: {'yes' if self.offload_model else 'no'}")
        return (f"preset {self.preset} ({self.note}): Triton kernels {kern}, torch.compile {comp}, "
                f"TF32 {onoff[self.tf32]}, batched CFG {onoff[self.use_batched_cfg]}, "
                f"{where}{att}{', fp8 linears on (lossy)' if self.fp8 else ''}")


def pipeline_options(pipeline, options: Options) -> Options:
    """`options` with the facts of an existing pipeline: whether its blocks stream, where its
    weights come from, the size of the weights that would stay on the GPU."""
    experts = pipeline.dit_models()
    cuda = pipeline.device.type == "cuda"
    return replace(options, streaming=getattr(pipeline, "offload", "none") == "blocks", dit_models=len(experts),
                   checkpoint=getattr(pipeline, "ckpt_dir", None) is not None,
                   resident_gb=resident_gb(pipeline) if cuda else None,
                   weights_dtype=str(next(experts[0].parameters()).dtype).replace("torch.", ""))


def optimize(pipeline, preset: str | Preset = "auto", *, triton: bool | None = None, compile: bool | None = None,
             compile_mode: str = "default", tf32: bool | None = None, use_batched_cfg: bool | None = None,
             attention: str | None = None, offload: str | None = None, host_ram: str | None = None,
             fp8: bool | None = None, parallel: ParallelRequest | None = None, **patch_kw) -> Optimized:
    """Apply a preset (explicit arguments win) to a `wan.WanT2V`; returns an `Optimized`.

    attention: a backend name sets it (also with triton off); None leaves the current choice
    alone. offload: 'none', 'model' or 'blocks' (None: the preset's; on CUDA only); 'blocks'
    turns on block streaming here (`WanT2V.enable_block_streaming`). The result's
    `offload_model` is what the caller passes to generate(). host_ram: 'auto', 'high' or 'low',
    the host-memory mode of block streaming (wan.hostmem.host_plan; None: auto). fp8: True
    quantizes both experts' block linears to e4m3 in place (wan_triton.fp8.quantize_model; lossy,
    the bf16 weights are freed: reload to go back), False switches fp8 off where the bf16 layers
    were kept (quantize_model(keep_original=True)), None leaves the experts as they are.
    parallel: the pipeline's wan.parallel.ParallelRequest (default: one process).
    Every decision is wan_triton.plan.plan()'s; a combination its table refuses is a PlanError
    (an AccelError) naming the arguments.
    """
    p = get_preset(preset, pipeline.device) if isinstance(preset, str) else preset
    options = Options(triton=triton, compile=compile, compile_mode=compile_mode, tf32=tf32,
                      use_batched_cfg=use_batched_cfg, attention=attention, offload=offload, host_ram=host_ram,
                      fp8=fp8, parallel=parallel or ParallelRequest())
    return optimize_options(pipeline, p, options, **patch_kw)


def optimize_options(pipeline, preset: Preset, options: Options, **patch_kw) -> Optimized:
    """optimize() for options made already (the CLIs'): plan with the pipeline's state, apply."""
    options = pipeline_options(pipeline, options)
    device = DeviceInfo.of(pipeline.device, fp8=bool(options.fp8))
    run = plan(options, preset, device)
    if switch_fp8(pipeline, run.fp8):  # fp8 experts take half the bytes: the fit decision sees them
        run = plan(pipeline_options(pipeline, options), preset, device)
    return apply(pipeline, run, **patch_kw)


def switch_fp8(pipeline, on: bool | None) -> bool:
    """Quantize (True) or dequantize (False) both experts' block linears; None leaves them. True
    when an expert changed."""
    if on is None:
        return False
    done, changed = [], False
    for m in pipeline.dit_models():
        if on and not _fp8.is_quantized(m):
            done.append(_fp8.quantize_model(m, progress=getattr(pipeline, "progress", True), log_line=False))
        elif not on and _fp8.is_quantized(m):
            _fp8.dequantize_model(m)
            changed = True
    if done:  # one line for both experts: lossy, and native or emulated
        log.warning("%s", _fp8.Fp8Summary.total(done).line())
    return changed or bool(done)


def apply(pipeline, run: RunPlan, **patch_kw) -> Optimized:
    """Carry a plan out on a pipeline: TF32, the kernels and the attention backend, batched CFG,
    block streaming, regional compile (fp8: `switch_fp8`, before the plan's memory decision)."""
    for line in run.warnings:
        log.warning("%s", line)
    tf32_prev = enable_tf32(True) if run.tf32 else None
    if run.triton:  # patch() sets the backend and unpatch() restores the previous one
        patched = tuple(patch(attention=run.attention, **patch_kw))
    else:
        patched = ()
        if run.attention is not None:
            ensure_registered(run.attention)
            att.set_backend(run.attention)
    pipeline.use_batched_cfg = run.use_batched_cfg
    if run.offload == "blocks" and getattr(pipeline, "offload", "none") != "blocks":
        try:
            pipeline.enable_block_streaming(host_ram=run.host_ram)
        except OffloadError as err:
            raise AccelError(str(err)) from None
    if run.compile:
        for m in pipeline.dit_models():
            compile_blocks(m, run.compile_mode)
    p = run.preset
    res = Optimized(preset=p.name, note=p.note, triton=run.triton, patched=patched, compile=run.compile,
                    compile_mode=run.compile_mode, tf32=run.tf32, use_batched_cfg=run.use_batched_cfg,
                    offload_model=run.offload_model, offload=run.offload, attention=run.attention,
                    fp8=any(_fp8.is_quantized(m) for m in pipeline.dit_models()),
                    tf32_prev=tf32_prev)
    log.info("%s", res.summary())
    return res
