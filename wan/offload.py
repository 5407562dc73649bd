"""The pipeline's offload policy: where the DiT weights wait between uses.

    none     both experts stay on the device
    model    the idle expert waits in host memory (the official `offload_model=True`, and the
             official default on one GPU: `default_offload`)
    blocks   both experts' blocks stream from host memory, block by block (wan.streaming), with
             the host memory chosen by wan.hostmem (both experts' blocks held, or the active
             one's only, the other re-read from its files at the switch)

A `WanT2V` records its mode in `pipe.offload`; `generate()` follows it unless told otherwise.
`offload_runs_on` is the rule for where offloading runs (`check_offload_device` raises it;
wan_triton.plan's table reads it). Under block streaming `enable_pipeline_streaming` sets a `WanT2V` up,
`switch_experts` runs at the expert switch (high -> low, once per video) and `park_all` after
the denoising loop; `build_streamable_expert` and `load_experts_for_streaming` make experts
whose blocks never sit on the device (random weights) or in host memory twice (a checkpoint).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from . import lora
from .dit import WanModel, init_linears_and_norms_
from .hostmem import ExpertFiles, ExpertSource, HostRamChoice, choose_host_ram
from .naming import Arg
from .parking import forget
from .streaming import BlockStreamer, HostLedger, OffloadError, enable_block_streaming, streamer_of

log = logging.getLogger("wan.offload")

__all__ = ["OFFLOAD_MODES", "default_offload", "offload_runs_on", "check_offload_device", "switch_experts", "park_all",
           "enable_pipeline_streaming", "disable_pipeline_streaming", "build_streamable_expert", "random_expert_shell",
           "random_blocks",
           "load_experts_for_streaming"]

OFFLOAD_MODES = ("none", "model", "blocks")


def default_offload(device) -> str:
    """The official default on one GPU: 'model' (the idle expert waits in host memory) on CUDA;
    'none' elsewhere (on a CPU the weights sit in host memory already)."""
    return "model" if torch.device(device).type == "cuda" else "none"


def offload_runs_on(mode: str, device) -> bool:
    """The one rule for where offloading runs: 'model' and 'blocks' move weights between host memory
    and a CUDA device; on a CPU the weights already sit in host memory and there is nothing to
    save."""
    return mode == "none" or torch.device(device).type == "cuda"


def check_offload_device(mode: str, device, what: Arg | str | None = None) -> None:
    """`offload_runs_on`, raised: OffloadError naming `what` (default: the argument offload=<mode>)."""
    if not offload_runs_on(mode, device):
        raise OffloadError("{what} needs a CUDA GPU, and none is in use (device {dev})",
                           what=Arg("offload", mode) if what is None else what, dev=torch.device(device))


def _on_device(model: nn.Module, device) -> bool:
    d, want = model.patch_embedding.weight.device, torch.device(device)
    return d.type == want.type and (want.index is None or d.index == want.index)


def switch_experts(use: nn.Module, idle: nn.Module, device) -> None:
    """Expert switch under streaming: the idle expert frees its ring and its non-block parts
    leave the device; the active one's non-block parts come (its blocks stream as they run).
    Host RAM low: the idle expert's blocks leave host memory first, then the active one's are
    re-read from its files (so host memory never holds both)."""
    si, su = streamer_of(idle), streamer_of(use)
    if si is not None and (si.ring is not None or _on_device(idle, device)):
        si.park("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if su is not None and not su.resident:
        if si is not None and si.source is not None:
            si.evict()
        su.reload()
    if su is not None and not _on_device(use, device):
        su.place(device)


def park_all(*models) -> None:
    """After the denoising loop: every streamed expert frees its ring and leaves the device
    (the VAE decode gets the memory)."""
    cuda = False
    for m in models:
        s = streamer_of(m)
        if s is not None:
            s.park("cpu")
            cuda = cuda or s.cuda
    if cuda:
        torch.cuda.empty_cache()


def _expert_folders(pipe, ckpt_dir) -> tuple[dict | None, str]:
    """{"high": folder, "low": folder} of the experts' safetensors, or (None, why not): `ckpt_dir`'s
    official folders when given, else the files the experts were read from (`pipe.expert_files`:
    official or fp8 ones), else the official folders of `pipe.ckpt_dir`."""
    cfg = pipe.config
    files = getattr(pipe, "expert_files", None) if ckpt_dir is None else ExpertFiles.official(ckpt_dir, cfg)
    if files is None and getattr(pipe, "ckpt_dir", None) is not None:
        files = ExpertFiles.official(pipe.ckpt_dir, cfg)
    if files is None:
        return None, "the pipeline has random weights and no checkpoint folder (give ckpt_dir)"
    if lora.loaded_loras(pipe.high_noise_model) or lora.loaded_loras(pipe.low_noise_model):
        return None, "LoRAs are merged into the experts, and the files hold the weights without them"
    f8 = getattr(torch, "float8_e4m3fn", None)
    if files.kind == "official" and f8 is not None and any(
            p.dtype == f8 for m in (pipe.high_noise_model, pipe.low_noise_model) for p in m.parameters()):
        return None, ("the experts are quantized to fp8 in memory, and the files hold the unquantized weights "
                      "(fp8 expert files: wan_triton.fp8_files)")
    return {"high": files.high, "low": files.low}, ""


def enable_pipeline_streaming(pipe, ring: int = 2, pin: bool | None = None, host_ram: str = "auto",
                              ckpt_dir=None, choice: HostRamChoice | None = None, allow_cpu: bool = False
                              ) -> list[BlockStreamer]:
    """`WanT2V.enable_block_streaming`: stream both experts; both start idle (nothing on the
    device) and the pipeline's expert switch places the active one's non-block parts.

    host_ram: "high" keeps both experts' blocks in pinned host memory; "low" keeps the one in
    use only and re-reads the other from `ckpt_dir` (default: the folder the pipeline was loaded
    from) at the switch; "auto" picks low when the host is short (`choose_host_ram`, logged).
    `choice`: one made already (`load_experts_for_streaming`, before the experts were read). A pipeline on
    the CPU is refused (check_offload_device) unless `allow_cpu`: the machinery then runs there
    anyway, saving nothing (the tests check it on the CPU)."""
    if not allow_cpu:
        check_offload_device("blocks", pipe.device, what="block streaming")
    if pipe.device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadError("block streaming on CUDA needs a CUDA device")
    experts = (("high", pipe.high_noise_model), ("low", pipe.low_noise_model))
    sizes = [sum(p.numel() * p.element_size() for p in m.blocks.parameters()) for _, m in experts]
    held = sum(n for n, (_, m) in zip(sizes, experts) if next(m.blocks.parameters()).device.type == "cpu")
    folders, why_not = _expert_folders(pipe, ckpt_dir)
    deferred = {label for label, m in experts if getattr(m, "_blocks_deferred", False)}
    if deferred and folders is None:
        raise OffloadError(f"the {'/'.join(sorted(deferred))}-noise expert's blocks were not read, and they cannot "
                           f"be: {why_not}")
    if choice is None:
        held -= sum(n for n, (label, _) in zip(sizes, experts) if label in deferred)
        choice = choose_host_ram(sum(sizes), max(sizes), host_ram, held, folders is not None, why_not)
    log.info("block streaming host RAM: %s (%s)", choice.mode, choice.reason)
    ledger, handles = HostLedger(), []
    for label, m in experts:
        low = choice.mode == "low"
        src = ExpertSource(folders[label], m) if low or label in deferred else None
        # low: the high-noise expert (the first a video uses) stays in host memory, the other waits in its files
        load = (not low or label == "high") and label not in deferred
        forget(m)  # model offload's kept host copies (wan.parking): the streamer's buffers replace them
        h = enable_block_streaming(m, pipe.device, ring=ring, pin=pin, source=src, load=load, ledger=ledger,
                                   label=f"{label}-noise")
        if not low and not h.resident:  # read lazily, but both are to be held: read it now
            h.reload()
        m._blocks_deferred = False
        h.park("cpu")
        handles.append(h)
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.offload = "blocks"
    pipe.host_ram_choice = choice
    pipe.host_ledger = ledger
    return handles


def disable_pipeline_streaming(pipe, device=None) -> None:
    """Undo `enable_pipeline_streaming`: both experts become normal models on `device` (default:
    the CPU, as the official offload keeps idle experts); the pipeline's mode becomes the official
    default (`default_offload`)."""
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        s = streamer_of(m)
        if s is not None:
            s.remove("cpu" if device is None else device)
    pipe.offload = default_offload(pipe.device)


@torch.no_grad()
def random_expert_shell(config, device, dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    """A random-weight `WanModel` whose parts outside the blocks are materialised and initialised on
    `device` by `WanModel.init_weights` (the official init) in `dtype`; its blocks are still on
    `meta` (fill them with `random_blocks`)."""
    with torch.device("meta"):
        model = WanModel(config)
    blocks = model.blocks
    model.blocks = nn.ModuleList()
    try:
        model.to_empty(device=device)
        model.init_weights(seed=seed, zero_head=False)
        model.to(dtype)
    finally:
        model.blocks = blocks
    return model


@torch.no_grad()
def random_blocks(model: nn.Module, device, dtype=torch.bfloat16, seed: int = 0):
    """Yield (i, block) for each block of `random_expert_shell`'s model, materialised on `device` in
    float32 (the peak is one block, ~1.4 GB for A14B), initialised with the official rules
    (xavier-uniform linears with zero bias, unit norms, modulation ~ N(0, 1) / sqrt(dim)) from a
    generator seeded (seed, block), then cast to `dtype`. The caller moves each block on."""
    for i, blk in enumerate(model.blocks):
        blk.to_empty(device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1_000_003 + i + 1)
        init_linears_and_norms_(blk, gen)
        blk.modulation.normal_(generator=gen).div_(model.dim ** 0.5)
        yield i, blk.to(dtype)


@torch.no_grad()
def build_streamable_expert(config, device, dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    """A random-weight `WanModel` whose blocks never sit on `device` together: the non-block parts
    on `device` (`random_expert_shell`), then each block in turn built on `device` and moved to
    host memory (`random_blocks`). Its values differ from `WanModel.from_config(seed=seed)`
    (another random stream), its distribution does not. Used by `WanT2V.from_config(offload="blocks")`."""
    model = random_expert_shell(config, device, dtype, seed)
    for _, blk in random_blocks(model, device, dtype, seed):
        blk.to("cpu")
    return model.eval().requires_grad_(False)


def load_experts_for_streaming(files: ExpertFiles, host_ram: str = "auto", progress: bool = False):
    """(low, high, choice): both experts of `files` (official folders, or another layout's), for
    block streaming. The host-memory mode is chosen first, from the files' headers (nothing read
    yet): in low mode the low-noise expert's blocks are not read at all (the switch reads them),
    so loading never holds both."""
    sizes = files.block_bytes()
    choice = choose_host_ram(sum(sizes), max(sizes), host_ram, held_bytes=0)
    high = files.load(files.high, progress)
    if choice.mode == "low":
        log.info("host RAM low: the low-noise expert's blocks are read at the expert switch, not now")
        low = files.load_without_blocks(files.low)
    else:
        low = files.load(files.low, progress)
    return low, high, choice
