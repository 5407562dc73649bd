"""Host memory for block streaming: how much the host can give, which experts' blocks it holds
(`HostRamChoice`), and re-reading an expert's blocks from its safetensors files.

Host RAM short (`host_ram="low"`): both A14B experts' blocks are 57 GB of pinned host memory.
When the host cannot hold that plus headroom (`choose_host_ram`, from `host_memory()`: a cgroup limit
minus its usage, else MemAvailable), only the active expert's blocks stay in (pinned) host
memory; the idle expert's parameters point at a 1-element placeholder (right shape, no
storage). At the expert switch (high -> low, once per video) the idle expert is evicted first,
then the other one is re-read block by block from its safetensors files (`ExpertSource`:
memory-mapped with `safe_open`, each tensor cast to the parameter's dtype the way
`WanModel.from_pretrained` casts it, so the bytes are the loaded ones), into freshly pinned
buffers. The streamers' host bytes are counted in a `HostLedger` shared by both experts: its
peak is one expert's blocks.

Loading for streaming reads the choice's inputs from the files' headers before any weight
(`block_bytes_in_files`); in low mode the low-noise expert is loaded without its blocks
(`load_dit_without_blocks`). The pipeline-level policy (which expert when) is wan.offload.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

from .checkpoint import (CheckpointError, check_keys, check_shape, dit_weight_files, read_dit_config,
                         safetensors_header)
from .configs import DiTConfig
from .dit import WanModel
from .naming import Arg
from .streaming import OffloadError, placeholder

log = logging.getLogger("wan.offload")

__all__ = ["HOST_RAM_MODES", "HEADROOM_BYTES", "HostMemory", "HostRamChoice", "ExpertSource", "host_memory",
           "host_available_bytes", "choose_host_ram", "block_bytes_in_files", "stored_block_dtype",
           "load_dit_without_blocks"]

HOST_RAM_MODES = ("auto", "high", "low")  # high: both experts' blocks pinned; low: the active one only
HEADROOM_BYTES = 8 * 10 ** 9  # host memory kept free beyond the pinned blocks (T5 on CPU, frames, the OS)


def host_available_bytes() -> int | None:
    """Host memory available now: psutil if importable, else MemAvailable from /proc/meminfo.
    None when neither can be read. (On some VMs MemTotal grows after start: this is a snapshot.)"""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class HostMemory:
    """What the host can still give: `available` bytes, and where the figure comes from."""
    available: int | None
    source: str


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            v = f.read().strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None  # "max" (v2, no limit) -> None


def _cgroup_limit() -> tuple[int, int, str] | None:
    """(limit, usage, name) of this process's memory cgroup when it has a limit (v2, then v1)."""
    for lim, cur, name in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup memory.max"),
                           ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                            "/sys/fs/cgroup/memory/memory.usage_in_bytes", "cgroup memory.limit_in_bytes")):
        limit, used = _read_int(lim), _read_int(cur)
        if limit is not None and limit < 2 ** 60 and used is not None:  # v1 "no limit" is ~2^63
            return limit, used, name
    return None


def host_memory() -> HostMemory:
    """Host memory this process may still use: a cgroup limit minus the cgroup's usage when a limit
    is set (containers; on some VMs MemTotal grows as memory is used, so MemAvailable understates
    what can be had), else MemAvailable (psutil or /proc/meminfo)."""
    cg = _cgroup_limit()
    if cg is not None:
        limit, used, name = cg
        return HostMemory(max(limit - used, 0), f"{name} {limit / 1e9:.1f} GB minus {used / 1e9:.1f} GB in use")
    avail = host_available_bytes()
    return HostMemory(avail, "MemAvailable" if avail is not None else "unknown")


class ExpertSource:
    """An expert's blocks in its official safetensors folder (`diffusion_pytorch_model*.safetensors`,
    sharded with an index or not). Only headers are read here (checkpoint.safetensors_header);
    `read_into` maps the files (`safe_open`) and copies each block tensor into a destination view,
    casting to its dtype."""

    def __init__(self, folder, model: nn.Module):
        self.folder = str(folder)
        self.file_of: dict[str, str] = {}
        shapes: dict[str, tuple] = {}
        try:
            for fname in dit_weight_files(folder):
                for k, info in safetensors_header(fname).items():
                    if k.startswith("blocks."):
                        self.file_of[k] = fname
                        shapes[k] = info.shape
        except CheckpointError as err:
            raise OffloadError(f"cannot re-read the idle expert: {err}") from None
        for i, blk in enumerate(model.blocks):
            for name, t in [*blk.named_parameters(), *blk.named_buffers()]:
                key = f"blocks.{i}.{name}"
                if key not in shapes:
                    raise OffloadError(f"{self.folder} has no {key}: it is not this expert's checkpoint")
                if shapes[key] != tuple(t.shape):
                    raise OffloadError(f"{self.folder}: {key} has shape {shapes[key]}, the model {tuple(t.shape)}")

    def read_into(self, dests: dict[str, torch.Tensor]) -> None:
        """key -> destination tensor: fill each from the files (one file open at a time)."""
        by_file: dict[str, list[str]] = {}
        for k in dests:
            by_file.setdefault(self.file_of[k], []).append(k)
        for fname, keys in by_file.items():
            with safe_open(fname, framework="pt", device="cpu") as f:
                for k in keys:
                    dests[k].copy_(f.get_tensor(k))  # copy_ casts as Tensor.to does (the loader's cast)


@dataclass(frozen=True)
class HostRamChoice:
    """The host-memory mode of block streaming and why (GB are 1e9 bytes)."""
    mode: str                  # "high": both experts' blocks pinned; "low": the active expert's only
    asked: str                 # auto / high / low
    need_gb: float             # both experts' blocks
    one_gb: float              # the larger expert's blocks
    available_gb: float | None
    reason: str


def choose_host_ram(both_bytes: int, one_bytes: int, asked: str = "auto", held_bytes: int = 0,
                    can_reload: bool = True, why_not: str = "", memory: HostMemory | None = None,
                    headroom: int = HEADROOM_BYTES) -> HostRamChoice:
    """Choose the host-memory mode. `held_bytes` of blocks already sit in host memory (experts
    loaded on the CPU: pinning swaps their storage block by block, so they are not needed twice);
    high needs `both_bytes - held_bytes + headroom` more than is there now. `can_reload` is False
    without checkpoint files for both experts (`why_not` says why): then low cannot be chosen.
    Raises OffloadError for a forced low that cannot work or an unknown mode."""
    if asked not in HOST_RAM_MODES:
        raise OffloadError("unknown host RAM mode {a}; choose from {modes}", a=Arg("host_ram", asked),
                           modes=", ".join(HOST_RAM_MODES))
    mem = host_memory() if memory is None else memory
    gb = lambda n: n / 1e9  # noqa: E731
    need_more = max(both_bytes - held_bytes, 0) + headroom
    have = (f"{gb(mem.available):.1f} GB available ({mem.source})" if mem.available is not None
            else "host memory unknown")
    facts = (f"both experts' blocks need {gb(both_bytes):.1f} GB pinned, {gb(held_bytes):.1f} GB of them already "
             f"in host memory, + {gb(headroom):.0f} GB headroom; {have}")
    choice = lambda mode, why: HostRamChoice(mode, asked, gb(both_bytes), gb(one_bytes),  # noqa: E731
                                             None if mem.available is None else gb(mem.available), why)
    if asked == "low":
        if not can_reload:
            raise OffloadError("{a} re-reads the idle expert from its checkpoint files: {why}",
                               a=Arg("host_ram", "low"), why=why_not)
        return choice("low", f"forced (host_ram='low'); {facts}")
    if asked == "high":
        return choice("high", f"forced (host_ram='high'); {facts}")
    if mem.available is None or need_more <= mem.available:
        return choice("high", f"{facts}: both fit" if mem.available is not None else f"{have}; pinning both")
    if not can_reload:
        return choice("high", f"{facts}: short, but low cannot be used ({why_not}); pinning both anyway")
    return choice("low", f"{facts}: short, so only the active expert's blocks stay in host memory "
                       f"({gb(one_bytes):.1f} GB) and the other is re-read at the switch")


def _stored_dtype(info) -> torch.dtype:
    """The torch dtype a header entry loads as (float32 for a name this torch lacks)."""
    return info.torch_dtype or torch.float32


def block_bytes_in_files(folder, dtype=None) -> int:
    """Bytes the expert's blocks take in `dtype` (None: as stored), from the safetensors headers."""
    total = 0
    for fname in dit_weight_files(folder):
        for k, info in safetensors_header(fname).items():
            if k.startswith("blocks."):
                total += math.prod(info.shape) * (dtype or _stored_dtype(info)).itemsize
    return total


def stored_block_dtype(folder) -> torch.dtype | None:
    """The dtype an expert's files store its blocks in (the official checkpoints: float32), from
    the first header; None when the files cannot be read (loading them says why)."""
    try:
        for fname in dit_weight_files(folder):
            for k, info in safetensors_header(fname).items():
                if k.startswith("blocks."):
                    return _stored_dtype(info)
    except (CheckpointError, OSError):
        return None
    return None


def load_dit_without_blocks(folder, dtype=None) -> nn.Module:
    """`WanModel.from_pretrained` (on the CPU) that reads only what is outside the blocks: every block parameter is
    a placeholder (right shape and dtype, one element of storage), to be read later by a
    `BlockStreamer` with `load=False` (`model._blocks_deferred` is True until then)."""
    cfg = DiTConfig.from_dict(read_dit_config(folder))
    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict = {}
    for fname in dit_weight_files(folder):
        header = safetensors_header(fname)
        with safe_open(fname, framework="pt", device="cpu") as f:
            for k in sorted(header):  # safe_open's order
                if k not in expected or k in sd:
                    raise CheckpointError(f"{fname}: unexpected or duplicate key {k}")
                if k.startswith("blocks."):
                    check_shape(k, header[k].shape, expected[k], fname)
                    sd[k] = placeholder(expected[k], dtype or _stored_dtype(header[k]))
                    continue
                t = f.get_tensor(k)
                check_shape(k, t.shape, expected[k], fname)
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    check_keys(expected, sd.keys(), folder)
    model.load_state_dict(sd, strict=True, assign=True)
    model._blocks_deferred = True
    return model.eval().requires_grad_(False)
