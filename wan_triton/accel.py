"""Acceleration layers on top of the reference pipeline: TF32, regional torch.compile,
batched CFG, attention choice, hardware presets, and `optimize()` that applies them.

None of these re-implement the model: they flip switches on the `wan` objects.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import torch

log = logging.getLogger("wan_triton")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class AccelError(ValueError):
    """An option that cannot work on this machine (e.g. a CUDA-only option without CUDA)."""


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
    """What to turn on for a class of GPU (memory decides offloading and T5 placement)."""
    name: str
    offload_model: bool
    t5_cpu: bool
    use_batched_cfg: bool = False
    compile: bool = False
    tf32: bool = False
    triton: bool = True
    min_mem_gb: float = 0.0
    note: str = ""
    offload: str = ""  # "blocks": stream the DiT blocks (wan.offload); "" follows offload_model


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
           note="both bf16 experts (57 GB) and the T5 (11 GB) stay resident"),
    Preset("h100", offload_model=True, t5_cpu=False, min_mem_gb=75,
           note="one expert resident (28.6 GB + 12.5 GB of 720p activations + T5 11 GB); the idle one waits "
                "in CPU memory"),
    Preset("a100-80g", offload_model=True, t5_cpu=False, min_mem_gb=75,
           note="one expert resident; the idle one waits in CPU memory"),
    Preset("a100-40g", offload_model=True, t5_cpu=False, min_mem_gb=38, offload="blocks",
           note="one resident expert at 720p needs 41.1 GB: blocks stream from pinned CPU memory (~15 GB), "
                "T5 stays on the GPU"),
    Preset("l40s", offload_model=True, t5_cpu=True, min_mem_gb=44,
           note="one expert resident (41.1 GB at 720p), T5 on CPU"),
    Preset("rtx4090", offload_model=True, t5_cpu=True, min_mem_gb=22, offload="blocks",
           note="A14B at 720p in 24 GB: blocks stream from pinned CPU memory (57 GB of host RAM for both "
                "experts), T5 on CPU"),
    Preset("cpu", offload_model=False, t5_cpu=False, triton=False, note="no GPU: reference ops"),
)}


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


def preset_flags(p: Preset) -> str:
    """The CLI flags a preset amounts to, for messages."""
    mode = p.offload or ("model" if p.offload_model else "none")
    return f"--offload {mode}" + (" --t5_cpu" if p.t5_cpu else "")


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


def flags_preset(device) -> Preset:
    """No preset: only what the flags say, the official offloading default (on with CUDA), and
    the kernels wherever they can run (CUDA, or the Triton interpreter on CPU)."""
    import os

    device = torch.device(device)
    kernels_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return Preset("flags", offload_model=device.type == "cuda", t5_cpu=False, triton=kernels_here)


def get_preset(name: str = "auto", device=None) -> Preset:
    if name == "auto":
        return detect_preset(device)
    if name not in PRESETS:
        raise AccelError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
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


def optimize(pipeline, preset: str | Preset = "auto", *, triton: bool | None = None, compile: bool | None = None,
             compile_mode: str = "default", tf32: bool | None = None, use_batched_cfg: bool | None = None,
             attention: str = "auto", **patch_kw) -> dict:
    """Apply a preset (explicit arguments win) to a `wan.WanT2V`; returns what was applied.

    The returned dict also carries `offload_model`, which the caller passes to generate().
    """
    from .patch import patch

    p = get_preset(preset, pipeline.device) if isinstance(preset, str) else preset
    on_cuda = pipeline.device.type == "cuda"
    applied = dict(preset=p.name,
                   triton=p.triton if triton is None else triton,
                   compile=p.compile if compile is None else compile,
                   tf32=p.tf32 if tf32 is None else tf32,
                   use_batched_cfg=p.use_batched_cfg if use_batched_cfg is None else use_batched_cfg,
                   offload_model=p.offload_model and on_cuda,
                   offload=(p.offload or ("model" if p.offload_model else "none")) if on_cuda else "none",
                   compile_mode=compile_mode, attention=attention)
    if not on_cuda:  # explicit CUDA-only requests are errors; preset defaults just turn off
        for opt, asked in (("compile", compile), ("tf32", tf32)):
            if asked:
                raise AccelError(f"--{opt} needs a CUDA GPU, and the pipeline runs on {pipeline.device}")
            applied[opt] = False
    if applied["offload"] == "blocks" and compile:
        raise AccelError(f"--compile does not work with block streaming (preset {p.name}): use one or the other")
    if applied["offload"] == "blocks":
        applied["compile"] = False
    if on_cuda and not applied["offload_model"]:
        need = resident_gb(pipeline)
        gpu = torch.cuda.get_device_properties(pipeline.device).total_memory / 1e9
        if not fits_resident(need, gpu):
            applied["offload_model"] = True
            dt = next(pipeline.high_noise_model.parameters()).dtype
            log.warning("preset %s keeps both experts on the GPU, but the resident weights take %.1f GB "
                        "(experts in %s) and a generation needs ~%.0f GB more, over this GPU's %.1f GB: "
                        "the idle expert will wait in CPU memory (--convert_model_dtype stores the experts "
                        "in bf16; --offload_model False forces them resident)",
                        p.name, need, str(dt).replace("torch.", ""), RESIDENT_HEADROOM_GB, gpu)
    if applied["tf32"]:
        applied["tf32_prev"] = enable_tf32(True)
    applied["patched"] = patch(attention=attention, **patch_kw) if applied["triton"] else []
    if not applied["triton"]:
        from wan import attention as att
        att.set_backend(attention)
    pipeline.use_batched_cfg = applied["use_batched_cfg"]
    if applied["compile"]:
        for m in (pipeline.high_noise_model, pipeline.low_noise_model):
            compile_blocks(m, compile_mode)
    log.info("wan_triton.optimize: %s", {k: v for k, v in applied.items() if k != "tf32_prev"})
    return applied
