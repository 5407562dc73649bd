"""Acceleration layers on top of the reference pipeline: TF32, regional torch.compile,
batched CFG, attention choice, hardware presets, and `optimize()` that applies them.

None of these re-implement the model: they flip switches on the `wan` objects. What to switch
is decided by wan_triton.plan (`plan()`, one table of rules); `optimize()` makes the plan from its
arguments and the pipeline's state, then `apply()` carries it out: after it, `pipe.generate(prompt)`
runs as planned (the offload mode is the pipeline's `offload`, batched CFG its `use_batched_cfg`).
"""
from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass, field, replace

import torch

from wan import attention as att
from wan.naming import Arg
from wan.parallel import ParallelRequest
from wan.step_cache import enable_step_cache
from wan.streaming import OffloadError
from wan.vae import VAE_DTYPES

from . import fp8 as _fp8
from .errors import AccelError
from .fp8_attention import ensure_registered
from .patch import patch
from .plan import COMPILE_MODES, RULES, Case, DeviceInfo, Options, RunPlan, cache_policy, check_rules, plan

log = logging.getLogger("wan_triton")


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
        raise RULES["compile_mode/unknown"].refuse(a=Arg("compile_mode", mode), choices=", ".join(COMPILE_MODES))
    if getattr(model, "_block_streamer", None) is not None:
        raise RULES["compile/blocks"].refuse(a=Arg("compile", True), b="a model that streams its blocks", source="",
                                             model=Arg("offload", "model"))
    for blk in model.blocks:
        blk.compile(mode=mode, dynamic=dynamic)
    return model


# ------------------------------------------------------------------ presets

@dataclass(frozen=True)
class Preset:
    """What to turn on for a class of GPU (its memory decides where the weights wait and where the
    T5 runs). `offload`: 'none' (both experts on the GPU), 'model' (the idle expert in CPU memory)
    or 'blocks' (the DiT blocks stream from CPU memory). `note` is the one-line reason, shown in
    --help and in the start-up log. The Triton kernels are on wherever they run (the plan)."""
    name: str
    offload: str
    t5_cpu: bool = False
    use_batched_cfg: bool = False
    compile: bool = False
    tf32: bool = False
    min_mem_gb: float = 0.0
    note: str = ""
    t5_release: bool = False  # the text encoder's weights leave its device after encoding (re-read per video)


# Chosen from measurements on an H200 (bench/RESULTS.md, 2026-11-30), not from hopes:
# - Triton kernels: 1.15x per A14B forward at 720p, 1.26x at 480p -> on wherever they run.
# - batched CFG: no faster than two calls (22.45 s vs 22.11 s per 720p step; the forward is
#   compute-bound) and 9.6 GB more memory -> off; --use_batched_cfg turns it on.
# - regional compile: ~1% per forward after an 11-28 s first call -> off for one video;
#   --compile pays off in a process that makes several.
# - TF32: only the tiny fp32 GEMMs (time embedding, head) would change -> off (exactness).
# So a preset decides what memory decides: whether the idle expert and the T5 leave the GPU.
PRESETS = {p.name: p for p in (
    Preset("h200", offload="none", min_mem_gb=120,
           note="both bf16 experts (57 GB) and the T5 (11 GB) stay on the GPU"),
    Preset("h100", offload="model", min_mem_gb=75,
           note="one expert on the GPU (28.6 GB + 12.5 GB of 720p activations + T5 11 GB); the idle one waits "
                "in CPU memory"),
    Preset("a100-40g", offload="blocks", min_mem_gb=38,
           note="one expert on the GPU at 720p needs 41.1 GB: DiT blocks stream from pinned CPU memory (~15 GB "
                "on the GPU), T5 stays on the GPU"),
    Preset("l40s", offload="model", t5_cpu=True, min_mem_gb=44,
           note="one expert on the GPU (41.1 GB at 720p), T5 on the CPU"),
    Preset("rtx4090", offload="blocks", min_mem_gb=22, t5_release=True,
           note="A14B at 720p in 24 GB: DiT blocks stream from pinned CPU memory (57 GB of host RAM for both bf16 "
                "experts; --host_ram low 28 GB; --fp8_dir 14 GB), T5 on the GPU for the encode, then freed"),
    Preset("cpu", offload="none", note="no GPU: reference ops (the Triton kernels only under TRITON_INTERPRET=1)"),
)}
# Other names for the same settings (an 80 GB A100 is an H100 for memory purposes): defined
# once above, listed under both names.
PRESET_ALIASES = {"a100-80g": "h100"}
PRESETS.update({alias: replace(PRESETS[name], name=alias) for alias, name in PRESET_ALIASES.items()})
# `--preset none`: only what the flags say, the official offloading default ('model' on CUDA; nothing
# moves on a CPU), the kernels wherever they run
NO_PRESET = Preset("none", offload="model", note="only the flags")
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
    return f"--offload {p.offload}" + (" --t5_cpu" if p.t5_cpu else "")


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


def find_preset(name: str, info: DeviceInfo) -> Preset:
    """A preset by name for a device of known facts: 'auto' picks it (preset_for), 'none' is
    NO_PRESET. Whether it can run there is the plan's rule (a GPU preset needs CUDA)."""
    if name == "auto":
        return preset_for(info)
    if name == "none":
        return NO_PRESET
    if name not in PRESETS:
        raise AccelError("unknown {a}; choose from {choices}", a=Arg("preset", name), choices=", ".join(PRESET_CHOICES))
    return PRESETS[name]


def get_preset(name: str = "auto", device=None) -> Preset:
    """A preset by name for `device` (default: cuda when available): 'auto' detects the GPU, 'none'
    is NO_PRESET; a GPU preset without CUDA is a PlanError (the plan's rule)."""
    info = DeviceInfo.of(device)
    p = find_preset(name, info)
    check_rules(Case(Options(), p, info, "none"))
    return p


# ------------------------------------------------------------------ optimize

@dataclass(frozen=True)
class Optimized:
    """What `optimize()` applied (the pipeline runs it: `pipe.generate(prompt)` needs no extra
    argument). Give `tf32_prev` to restore_tf32() to undo the TF32 switch (None when TF32 was not
    touched)."""
    preset: str
    note: str
    triton: bool
    patched: tuple = ()
    compile: bool = False
    compile_mode: str = "default"
    tf32: bool = False
    use_batched_cfg: bool = False
    offload: str = "none"            # 'none', 'model' (the idle expert in CPU memory) or 'blocks' (streamed)
    t5_cpu: bool = False
    attention: str | None = None
    fp8: bool = False                # the experts' block linears in e4m3 (wan_triton.fp8; lossy)
    vae_dtype: str = "fp32"          # what the VAE runs in (wan.vae.VAE_DTYPES); bf16 is lossy
    cache: str = "off"               # the step cache (wan.step_cache), its summary; lossy when on
    tf32_prev: dict | None = field(default=None, compare=False)

    def summary(self) -> str:
        """One readable line for the start-up log."""
        onoff = {True: "on", False: "off"}
        kern = f"on ({len(self.patched)} ops)" if self.patched else ("off" if not self.triton else "unavailable")
        comp = f"on ({self.compile_mode})" if self.compile else "off"
        att_ = f", attention {self.attention}" if self.attention else ""
        where = ("DiT blocks streamed from CPU memory" if self.offload == "blocks"
                 else f"idle expert offloaded to CPU: {'yes' if self.offload == 'model' else 'no'}")
        return (f"preset {self.preset} ({self.note}): Triton kernels {kern}, torch.compile {comp}, "
                f"TF32 {onoff[self.tf32]}, batched CFG {onoff[self.use_batched_cfg]}, "
                f"{where}{', T5 on the CPU' if self.t5_cpu else ''}{att_}"
                f"{', fp8 linears on (lossy)' if self.fp8 else ''}"
                f"{f', VAE in {self.vae_dtype} (lossy)' if self.vae_dtype != 'fp32' else ''}"
                f"{f', step cache {self.cache} (lossy)' if self.cache != 'off' else ''}")


def _gb(mods, size=lambda m: sum(p.numel() * p.element_size() for p in m.parameters())) -> float:
    return sum(size(m) for m in mods) / 1e9


def pipeline_options(pipeline, options: Options) -> Options:
    """`options` with the facts of an existing pipeline: where its T5 runs, whether its blocks
    stream, where its weights come from, its DiT models (both experts, or ti2v-5B's one) and their
    size on the GPU (after fp8 when fp8 is asked), the size of its text encoder."""
    experts = pipeline.dit_models()
    quantize = options.fp8 and not any(_fp8.is_quantized(m) for m in experts)
    return replace(options, t5_cpu=options.t5_cpu or pipeline.t5_cpu,
                   streaming=getattr(pipeline, "offload", "none") == "blocks", dit_models=len(experts),
                   checkpoint=getattr(pipeline, "ckpt_dir", None) is not None,
                   fp8_files=getattr(getattr(pipeline, "expert_files", None), "kind", "") == "fp8",
                   experts_gb=_gb(experts, _fp8.quantized_bytes) if quantize else _gb(experts),
                   t5_gb=_gb([pipeline.text_encoder.model]),
                   weights_dtype=str(next(experts[0].parameters()).dtype).replace("torch.", ""))


def _kernel_switches() -> tuple:
    """The keyword arguments optimize() passes on to patch(): its switches (rms_norm=, rope=, ...)."""
    return tuple(n for n, prm in inspect.signature(patch).parameters.items()
                 if prm.kind is inspect.Parameter.KEYWORD_ONLY and n != "attention")


def check_kernel_switches(kernels: dict) -> None:
    """An argument optimize() does not know is an AccelError naming it (and the closest one)."""
    known = ("preset", "triton", "compile", "compile_mode", "tf32", "use_batched_cfg", "attention", "offload",
             "host_ram", "fp8", "vae_dtype", "parallel", "cache", "cache_threshold", "cache_cfg", "cache_ratios",
             *_kernel_switches())
    for name in kernels:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            raise AccelError("optimize() has no argument {a}{hint}; it takes {known}", a=Arg(name),
                             hint=f" (did you mean {near[0]}?)" if near else "", known=", ".join(known))


def optimize(pipeline, preset: str | Preset = "auto", *, triton: bool | None = None, compile: bool | None = None,
             compile_mode: str = "default", tf32: bool | None = None, use_batched_cfg: bool | None = None,
             attention: str | None = None, offload: str | None = None, host_ram: str | None = None,
             fp8: bool | None = None, vae_dtype: str | None = None, parallel: ParallelRequest | None = None,
             t5_release: bool | None = None, cache=None, cache_threshold: float | None = None,
             cache_cfg: int | None = None, cache_ratios=None, **kernels) -> Optimized:
    """Plan a run for a `wan.WanT2V` (a preset, explicit arguments winning) and apply it; returns
    the `Optimized` record. Afterwards `pipe.generate(prompt)` runs as planned (an explicit
    `offload_model=` to generate() still wins).

    attention: a backend name sets it (also with triton off); None leaves the current choice
    alone. offload: 'none', 'model' or 'blocks' (None: the preset's; on CUDA only); 'blocks'
    turns on block streaming here (`WanT2V.enable_block_streaming`). host_ram: 'auto', 'high' or
    'low', the host-memory mode of block streaming (wan.hostmem.choose_host_ram; None: auto). fp8:
    True quantizes both experts' block linears to e4m3 in place (wan_triton.fp8.quantize_model;
    lossy, the bf16 weights are freed: reload to go back), False switches fp8 off where the bf16
    layers were kept (quantize_model(keep_original=True)), None leaves the experts as they are.
    vae_dtype: 'fp32' (the official decode) or 'bf16' (lossy: half the VAE's memory, faster; its
    loss is on the quality gate, docs/quality.md) casts the VAE in place (None: as it is; back to
    fp32 after bf16 keeps the rounded weights: reload for the exact ones). parallel: the
    pipeline's wan.parallel.ParallelRequest (default: one process). t5_release: the text
    encoder's weights are freed after encoding and read again for the next video (None: the
    preset's; `WanT2V.t5_release`). cache: the step cache (lossy, docs/caching.md): 'easy', 'mag'
    or 'none', with its cache_threshold, cache_cfg (the CFG-branch cache's interval) and
    cache_ratios (mag: a ratio file or folder; default <ckpt_dir>/mag_ratios), or a whole
    wan.step_cache.CachePolicy; None leaves the pipeline's. `kernels`: patch()'s switches
    (rms_norm=False, ...). Every decision is wan_triton.plan.plan()'s, under the rules the CLIs
    obey; what it refuses, and any argument it does not know, is an AccelError naming the
    arguments (nothing is changed then).
    """
    check_kernel_switches(kernels)
    info = DeviceInfo.of(pipeline.device, fp8=bool(fp8), attention=attention)
    p = find_preset(preset, info) if isinstance(preset, str) else preset
    options = pipeline_options(pipeline, Options(
        triton=triton, compile=compile, compile_mode=compile_mode, tf32=tf32, use_batched_cfg=use_batched_cfg,
        attention=attention, offload=offload, host_ram=host_ram, fp8=fp8, vae_dtype=vae_dtype,
        parallel=parallel or ParallelRequest(),
        t5_release=t5_release, cache=cache_policy(cache, cache_threshold, cache_cfg, cache_ratios)))
    return apply(pipeline, plan(options, p, info), **kernels)


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


def set_vae_dtype(pipeline, name: str | None) -> None:
    """Cast the pipeline's VAE to wan.vae.VAE_DTYPES[name] in place (None: leave it)."""
    if name is not None and pipeline.vae.dtype_name != name:
        pipeline.vae.to(VAE_DTYPES[name])
        if name != "fp32":
            log.warning("the VAE runs in %s: lossy (its frames against the fp32 decode: docs/quality.md)", name)


def _cache_summary(pipeline) -> str:
    c = getattr(pipeline, "step_cache", None)
    return "off" if c is None else c.summary()


def place_text_encoder(pipeline, cpu: bool) -> None:
    """Run the text encoder on the CPU (`cpu`) or on the pipeline's device."""
    if pipeline.t5_cpu == cpu:
        return
    pipeline.text_encoder.to("cpu" if cpu else pipeline.device)
    pipeline.t5_cpu = cpu
    if cpu and pipeline.device.type == "cuda":
        torch.cuda.empty_cache()


def apply(pipeline, run: RunPlan, say=str, **kernels) -> Optimized:
    """Carry a plan out on a pipeline, deciding nothing: fp8, TF32, the kernels and the attention
    backend, batched CFG, the T5's place, the offload mode (`pipe.offload`; block streaming starts
    here when the plan streams and the pipeline does not yet), regional compile, the step cache
    (wan.step_cache.enable_step_cache: it reads and checks a mag cache's ratios). Its warnings are
    logged in `say`'s words (the CLIs: flags)."""
    for line in run.warnings:
        log.warning("%s", line.say(say))
    switch_fp8(pipeline, run.fp8)
    set_vae_dtype(pipeline, run.vae_dtype)
    tf32_prev = enable_tf32(True) if run.tf32 else None
    if run.triton:  # patch() sets the backend and unpatch() restores the previous one
        patched = tuple(patch(attention=run.attention, **kernels))
    else:
        patched = ()
        if run.attention is not None:
            ensure_registered(run.attention)
            att.set_backend(run.attention)
    pipeline.use_batched_cfg = run.use_batched_cfg
    place_text_encoder(pipeline, run.t5_cpu)
    encoder = pipeline.text_encoder
    if run.t5_release and getattr(encoder, "source", None) is None:
        log.warning("t5_release: this text encoder cannot be read again (no source), so it stays loaded")
    pipeline.t5_release = run.t5_release and getattr(encoder, "source", None) is not None
    if run.offload == "blocks" and getattr(pipeline, "offload", "none") != "blocks":
        try:
            pipeline.enable_block_streaming(host_ram=run.host_ram)
        except OffloadError as err:
            raise AccelError(err.template, **err.fields) from None
    elif run.offload != "blocks":
        pipeline.offload = run.offload
    if run.compile:
        for m in pipeline.dit_models():
            compile_blocks(m, run.compile_mode)
    if run.cache is not None:
        enable_step_cache(pipeline, run.cache)
    p = run.preset
    res = Optimized(preset=p.name, note=p.note, triton=run.triton, patched=patched, compile=run.compile,
                    compile_mode=run.compile_mode, tf32=run.tf32, use_batched_cfg=run.use_batched_cfg,
                    offload=run.offload, t5_cpu=run.t5_cpu, attention=run.attention,
                    fp8=any(_fp8.is_quantized(m) for m in pipeline.dit_models()),
                    vae_dtype=pipeline.vae.dtype_name, cache=_cache_summary(pipeline), tf32_prev=tf32_prev)
    log.info("%s", res.summary())
    return res
