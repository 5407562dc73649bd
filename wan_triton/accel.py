"""Acceleration layers on top of the reference pipeline: TF32, regional torch.compile,
batched CFG, attention choice, hardware presets, and `optimize()` that applies them.

None of these re-implement the model: they flip switches on the `wan` objects.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from wan import attention as att
from wan.offload import OFFLOAD_MODES, OffloadError, check_offload_device

from . import fp8 as _fp8
from .errors import AccelError
from .fp8_attention import ensure_registered
from .patch import patch

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
        raise AccelError("--compile does not work with --offload blocks: use one or the other")
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
    dev = torch.device(device or "cuda")
    props = torch.cuda.get_device_properties(dev)
    mem = props.total_memory / 1e9
    name = props.name.lower()
    for key in ("h200", "h100", "l40s", "4090"):
        if key in name:
            return PRESETS["rtx4090" if key == "4090" else key]
    for p in sorted((p for p in PRESETS.values() if p.name != "cpu"), key=lambda p: -p.min_mem_gb):
        if mem >= p.min_mem_gb:
            return p
    return PRESETS["rtx4090"]


def preset_offload(p: Preset) -> str:
    """A preset's offload mode: 'blocks' (stream the DiT blocks), 'model' (the idle expert in CPU
    memory) or 'none'."""
    return p.offload or ("model" if p.offload_model else "none")


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


def get_preset(name: str = "auto", device=None) -> Preset:
    """A preset by name: 'auto' detects the GPU, 'none' is `no_preset(device)`."""
    if name == "auto":
        return detect_preset(device)
    if name == "none":
        return no_preset(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if name not in PRESETS:
        raise AccelError(f"unknown preset {name!r}; choose from {', '.join(PRESET_CHOICES)}")
    p = PRESETS[name]
    if p.name != "cpu" and not torch.cuda.is_available():
        raise AccelError(f"preset {name!r} needs a CUDA GPU, and none is available")
    return p


# ------------------------------------------------------------------ optimize

# Memory a generation needs beyond the resident weights, measured at 1280x720x81 on the H200
# (bench/RESULTS.md): an A14B forward 12.5 GB of activations (41.1 GB peak - 28.6 GB weights),
# the fp32 VAE decode 23.1 GB. A preset that keeps both experts resident does so only when
# the weights plus this headroom fit in the GPU.
RESIDENT_HEADROOM_GB = 30.0


def resident_gb(pipeline) -> float:
    """GB of weights that stay on the GPU when nothing is offloaded: both experts, plus the T5
    unless it runs on the CPU."""
    mods = [pipeline.high_noise_model, pipeline.low_noise_model]
    if not pipeline.t5_cpu:
        mods.append(pipeline.text_encoder.model)
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters()) / 1e9


def fits_resident(weights_gb: float, gpu_gb: float, headroom_gb: float = RESIDENT_HEADROOM_GB) -> bool:
    return weights_gb + headroom_gb <= gpu_gb


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


def _offload_mode(pipeline, p: Preset, offload: str | None, on_cuda: bool) -> str:
    """The offload mode optimize() applies: the explicit one, else the preset's; 'none' off CUDA.
    A pipeline that already streams its blocks keeps streaming."""
    if offload is not None and offload not in OFFLOAD_MODES:
        raise AccelError(f"unknown offload mode {offload!r}; choose from {', '.join(OFFLOAD_MODES)}")
    if getattr(pipeline, "offload", "none") == "blocks":
        if offload not in (None, "blocks"):
            raise AccelError(f"the pipeline already streams its DiT blocks; --offload {offload} would need "
                             "wan.offload.disable_pipeline_streaming(pipe) first")
        return "blocks"
    try:  # the rule of wan.offload, the one --offload and enable_block_streaming obey
        check_offload_device(offload or "none", pipeline.device, what=f"--offload {offload}")
    except OffloadError as err:
        raise AccelError(str(err)) from None
    if not on_cuda:
        return "none"
    return offload or preset_offload(p)


def optimize(pipeline, preset: str | Preset = "auto", *, triton: bool | None = None, compile: bool | None = None,
             compile_mode: str = "default", tf32: bool | None = None, use_batched_cfg: bool | None = None,
             attention: str | None = None, offload: str | None = None, host_ram: str | None = None,
             fp8: bool | None = None,
             **patch_kw) -> Optimized:
    """Apply a preset (explicit arguments win) to a `wan.WanT2V`; returns an `Optimized`.

    attention: a backend name sets it (also with triton off); None leaves the current choice
    alone. offload: 'none', 'model' or 'blocks' (None: the preset's; on CUDA only); 'blocks'
    turns on block streaming here (`WanT2V.enable_block_streaming`). The result's
    `offload_model` is what the caller passes to generate(). host_ram: 'auto', 'high' or 'low',
    the host-memory mode of block streaming (wan.hostmem.host_plan; None: auto). fp8: True
    quantizes both experts' block linears to e4m3 in place (wan_triton.fp8.quantize_model; lossy,
    the bf16 weights are freed: reload to go back), False switches fp8 off where the bf16 layers
    were kept (quantize_model(keep_original=True)), None leaves the experts as they are.
    """
    p = get_preset(preset, pipeline.device) if isinstance(preset, str) else preset
    on_cuda = pipeline.device.type == "cuda"
    want = dict(triton=p.triton if triton is None else triton,
                compile=p.compile if compile is None else compile,
                tf32=p.tf32 if tf32 is None else tf32,
                use_batched_cfg=p.use_batched_cfg if use_batched_cfg is None else use_batched_cfg,
                offload=_offload_mode(pipeline, p, offload, on_cuda))
    if not on_cuda:  # explicit CUDA-only requests are errors; preset defaults just turn off
        for opt, asked in (("compile", compile), ("tf32", tf32)):
            if asked:
                raise AccelError(f"--{opt} needs a CUDA GPU, and the pipeline runs on {pipeline.device}")
            want[opt] = False
    if host_ram not in (None, "auto") and want["offload"] != "blocks":
        raise AccelError(f"--host_ram {host_ram} applies to block streaming (--offload blocks), and the offload "
                         f"mode here is {want['offload']}")
    if want["offload"] == "blocks":  # compiled blocks would run the streaming hooks inside the graph
        if compile:
            raise AccelError(f"--compile does not work with block streaming (--offload blocks or preset "
                             f"{p.name}): use one or the other")
        want["compile"] = False
    if fp8 is not None:  # before the memory check below: fp8 experts take half the bytes
        if fp8:
            _fp8.check_fp8_device(pipeline.device)  # as --fp8: native e4m3 products, else Fp8Error (one line)
        done = []
        for m in (pipeline.high_noise_model, pipeline.low_noise_model):
            if fp8 and not _fp8.is_quantized(m):
                done.append(_fp8.quantize_model(m, progress=getattr(pipeline, "progress", True), log_line=False))
            elif not fp8 and _fp8.is_quantized(m):
                _fp8.dequantize_model(m)
        if done:  # one line for both experts: lossy, and native or emulated
            log.warning("%s", _fp8.Fp8Summary.total(done).line())
    if on_cuda and want["offload"] == "none" and offload is None:
        need = resident_gb(pipeline)
        gpu = torch.cuda.get_device_properties(pipeline.device).total_memory / 1e9
        if not fits_resident(need, gpu):
            want["offload"] = "model"
            dt = next(pipeline.high_noise_model.parameters()).dtype
            log.warning("preset %s keeps both experts on the GPU, but the resident weights take %.1f GB "
                        "(experts in %s) and a generation needs ~%.0f GB more, over this GPU's %.1f GB: "
                        "the idle expert will wait in CPU memory (--convert_model_dtype stores the experts "
                        "in bf16; --offload_model False forces them resident)",
                        p.name, need, str(dt).replace("torch.", ""), RESIDENT_HEADROOM_GB, gpu)
    tf32_prev = enable_tf32(True) if want["tf32"] else None
    if want["triton"]:  # patch() sets the backend and unpatch() restores the previous one
        patched = tuple(patch(attention=attention, **patch_kw))
    else:
        patched = ()
        if attention is not None:
            ensure_registered(attention)
            att.set_backend(attention)
    pipeline.use_batched_cfg = want["use_batched_cfg"]
    if want["offload"] == "blocks" and getattr(pipeline, "offload", "none") != "blocks":
        try:
            pipeline.enable_block_streaming(host_ram=host_ram or "auto")
        except OffloadError as err:
            raise AccelError(str(err)) from None
    if want["compile"]:
        for m in (pipeline.high_noise_model, pipeline.low_noise_model):
            compile_blocks(m, compile_mode)
    res = Optimized(preset=p.name, note=p.note, patched=patched, compile_mode=compile_mode, attention=attention,
                    fp8=any(_fp8.is_quantized(m) for m in (pipeline.high_noise_model, pipeline.low_noise_model)),
                    tf32_prev=tf32_prev, offload_model=want["offload"] == "model", **want)
    log.info("%s", res.summary())
    return res
