"""Block streaming for a `WanModel`: the DiT's blocks live in host memory and visit the GPU one
at a time, through a small ring of GPU buffers filled ahead of compute.

The model is not forked: the same `WanModel.forward` runs, with a forward pre-hook and a
forward hook around each block.

    host:    flat[i]   one (pinned) byte buffer per block i, holding all its parameters
    device:  ring[s]   K byte buffers, each as large as the largest block (s = 0..K-1)

    block i runs in slot s(i) = i mod K. Before block i computes, blocks i .. i+K-1 have been
    issued: copy flat[j] -> ring[s(j)] on a dedicated copy stream, after the copy stream waited
    on free[s(j)] (the event recorded on the compute stream when the slot's previous owner,
    block j-K, finished). The compute stream waits on ready[s(i)] (the copy's event), the
    block's parameters are re-pointed (`param.data = view`) at views of ring[s(i)], the block
    runs; its forward hook records free[s(i)] on the compute stream and re-points the
    parameters at their host views again (so the model reads the same values wherever it is
    inspected from).

Values are bytes copied verbatim and the parameters keep dtype, shape and (contiguous)
strides, so the output is bit-identical to the resident model. With K = 2 the copy of block
i+1 overlaps the compute of block i: at 720p an A14B block computes for ~0.28 s (H200) while
its 0.71 GB of bf16 weights cross PCIe in ~13 ms (pinned, 55 GB/s).

Everything outside `model.blocks` (patch/text/time embeddings, time projection, head; 0.46 GB
in bf16 for A14B) stays resident on the device. On a CPU device the "copies" are plain tensor
copies through the same ring, hooks and bookkeeping, so the logic is testable without a GPU.

Host RAM short (`host_ram="low"`): both A14B experts' blocks are 57 GB of pinned host memory.
When the host cannot hold that plus headroom, only the active expert's blocks stay in (pinned)
host memory; the idle expert's parameters point at a 1-element placeholder (right shape, no
storage). At the expert switch (high -> low, once per video) the idle expert is evicted first,
then the other one is re-read block by block from its safetensors files (memory-mapped with
`safe_open`, each tensor cast to the parameter's dtype the way `load_dit` casts it, so the bytes
are the loaded ones), into freshly pinned buffers. The streamer's host bytes are counted in a
`HostLedger` shared by both experts: its peak is one expert's blocks.

Not supported: regional `torch.compile` of the blocks (`compile_blocks`): `Module.compile`
runs the module's hooks inside the compiled function, and these hooks touch streams and
re-point parameters. `enable_block_streaming` refuses a compiled block with one line.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

log = logging.getLogger("wan.offload")

__all__ = ["BlockStreamer", "OffloadError", "StreamStats", "check_offload_device", "enable_block_streaming",
           "host_available_bytes",
           "OFFLOAD_MODES", "HOST_RAM_MODES", "HostLedger", "HostMemory", "ExpertSource", "host_memory", "host_plan"]

OFFLOAD_MODES = ("none", "model", "blocks")
HOST_RAM_MODES = ("auto", "high", "low")  # high: both experts' blocks pinned; low: the active one only
HEADROOM_BYTES = 8 * 10 ** 9  # host memory kept free beyond the pinned blocks (T5 on CPU, frames, the OS)
_ALIGN = 512  # byte alignment of each tensor inside a flat buffer (>= what any kernel asks for)


class OffloadError(ValueError):
    """A streaming request that cannot work (compiled blocks, bad ring size, ...): one line."""


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


class HostLedger:
    """Bytes of host buffers held by the streamers that share this ledger (both experts), and
    the most ever held at once."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def sub(self, n: int) -> None:
        self.current -= n


class ExpertSource:
    """An expert's blocks in its official safetensors folder (`diffusion_pytorch_model*.safetensors`,
    sharded with an index or not). Only headers are read here; `read_into` maps the files
    (`safe_open`) and copies each block tensor into a destination view, casting to its dtype."""

    def __init__(self, folder, model: nn.Module):
        from safetensors import safe_open

        from .checkpoint import CheckpointError, dit_weight_files

        self.folder = str(folder)
        try:
            files = dit_weight_files(folder)
        except CheckpointError as err:
            raise OffloadError(f"cannot re-read the idle expert: {err}") from None
        self.file_of: dict[str, str] = {}
        shapes: dict[str, tuple] = {}
        for fname in files:
            with safe_open(fname, framework="pt", device="cpu") as f:
                for k in f.keys():
                    if k.startswith("blocks."):
                        self.file_of[k] = fname
                        shapes[k] = tuple(f.get_slice(k).get_shape())
        for i, blk in enumerate(model.blocks):
            for name, t in [*blk.named_parameters(), *blk.named_buffers()]:
                key = f"blocks.{i}.{name}"
                if key not in shapes:
                    raise OffloadError(f"{self.folder} has no {key}: it is not this expert's checkpoint")
                if shapes[key] != tuple(t.shape):
                    raise OffloadError(f"{self.folder}: {key} has shape {shapes[key]}, the model {tuple(t.shape)}")

    def read_into(self, dests: dict[str, torch.Tensor]) -> None:
        """key -> destination tensor: fill each from the files (one file open at a time)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in dests:
            by_file.setdefault(self.file_of[k], []).append(k)
        for fname, keys in by_file.items():
            with safe_open(fname, framework="pt", device="cpu") as f:
                for k in keys:
                    dests[k].copy_(f.get_tensor(k))  # copy_ casts as Tensor.to does (load_dit's cast)


def host_rss_bytes() -> int | None:
    """Resident set size of this process (VmRSS), or None."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class StreamStats:
    """What the streamer did: copies issued, bytes moved, the most blocks held at once."""
    copies: int = 0
    bytes: int = 0
    max_in_ring: int = 0
    forwards: int = 0
    evictions: int = 0     # times the blocks left host memory (host_ram low)
    reloads: int = 0       # times they were re-read from the safetensors files
    reload_s: float = 0.0  # seconds spent re-reading (and pinning)
    log: list = field(default_factory=list)  # (event, block, slot) when `trace` is on


@dataclass(frozen=True)
class _Entry:
    tensor: torch.Tensor  # the Parameter (or buffer) object whose .data is re-pointed
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    key: str = ""  # name in the checkpoint (blocks.<i>.<name>)


def _placeholder(e: _Entry) -> torch.Tensor:
    """What an evicted parameter points at: its shape and dtype over one element of storage
    (a CPU tensor, so `.data` may be swapped back; its values are not the weights)."""
    return placeholder(e.shape, e.dtype)


def placeholder(shape, dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
    return flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


class BlockStreamer:
    """Streams `model.blocks` through a ring of `ring` device buffers (see the module docstring).

    Build with `enable_block_streaming(model, device, ring)`; undo with `remove()`.
    `pin=None` pins host buffers when the device is CUDA. `source` (an `ExpertSource`) lets the
    blocks leave host memory (`evict()`) and come back from the files (`reload()`); with
    `load=False` they start evicted (the module's own block storage is dropped, never pinned).
    `ledger` counts host bytes (share one between experts).
    """

    def __init__(self, model: nn.Module, device, ring: int = 2, pin: bool | None = None, trace: bool = False,
                 source: ExpertSource | None = None, load: bool = True, ledger: HostLedger | None = None,
                 label: str = "expert"):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise OffloadError("block streaming needs a model with a non-empty `blocks` ModuleList")
        if not isinstance(ring, int) or ring < 1:
            raise OffloadError(f"ring must be a positive number of blocks, got {ring!r}")
        if getattr(model, "_block_streamer", None) is not None:
            raise OffloadError("block streaming is already enabled on this model")
        if any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks):
            raise OffloadError("block streaming does not work with compiled blocks (--compile): use one or the other")
        if not load and source is None:
            raise OffloadError("blocks can start out of host memory only with a source to re-read them from")
        self.model, self.device, self.trace = model, device, trace
        self.source, self.ledger, self.label = source, ledger or HostLedger(), label
        self.n = len(blocks)
        self.k = min(ring, self.n)
        self.cuda = device.type == "cuda"
        self.pin = self.cuda if pin is None else bool(pin)
        self.stats = StreamStats()
        self._registered: set[int] = set()
        self._warned_pin = False
        self.timing = False  # True: time every copy with CUDA events (copy_bandwidth())
        self._timed: list = []

        # host side: one flat buffer per block, parameters re-pointed at views of it
        self.entries: list[list[_Entry]] = []
        self.host: list[torch.Tensor | None] = []
        self.sizes: list[int] = []
        for i, blk in enumerate(blocks):
            entries, off = [], 0
            for name, t in [*blk.named_parameters(), *blk.named_buffers()]:
                if load and not t.is_contiguous():
                    raise OffloadError(f"block tensor {name} is not contiguous; streaming keeps strides as they are")
                n = t.numel() * t.element_size()
                entries.append(_Entry(t, off, n, t.dtype, tuple(t.shape), f"blocks.{i}.{name}"))
                off = _align(off + n)
            self.entries.append(entries)
            self.sizes.append(max(off, _ALIGN))
            if not load:
                self.host.append(None)
                for e in entries:
                    e.tensor.data = _placeholder(e)  # the original storage is released here
                continue
            flat = self._host_buffer(self.sizes[-1])
            for e in entries:
                _view(flat, e).copy_(e.tensor.data)
                e.tensor.data = _view(flat, e)  # the original storage (CPU or device) is released here
            self.host.append(flat)
        self.block_bytes = max(self.sizes)

        # device side: the ring (allocated lazily), its owners and events
        self.ring: list[torch.Tensor] | None = None
        self.owner: list[int | None] = [None] * self.k
        self.ready: list = [None] * self.k
        self.free: list = [None] * self.k
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._issued: set[int] = set()
        self._fresh = False
        self._running: int | None = None

        self.place(device)
        self._handles = [model.register_forward_pre_hook(self._on_model_start)]
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(blk.register_forward_hook(self._make_post(i)))
        model._block_streamer = self

    # ------------------------------------------------------------------ host memory
    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """A byte buffer in host memory, page-locked when `pin`. Pinning registers a plain
        allocation (cudaHostRegister) rather than asking torch's pinned allocator, which rounds
        every request up to a power of two (a 0.70 GB block would lock 1.07 GB)."""
        flat = torch.empty(nbytes, dtype=torch.uint8)
        self.ledger.add(nbytes)
        if not self.pin:
            return flat
        rt = torch.cuda.cudart()
        if rt.cudaHostRegister(flat.data_ptr(), nbytes, 0) == rt.cudaError.success:
            self._registered.add(flat.data_ptr())
            return flat
        if not self._warned_pin:
            log.warning("cudaHostRegister failed: pinning through torch's allocator (rounds sizes up to 2^k)")
            self._warned_pin = True
        return flat.pin_memory()

    def _free_host(self, i: int) -> None:
        """Drop block i's host buffer (unregistering it first when it was registered)."""
        flat = self.host[i]
        if flat is None:
            return
        if flat.data_ptr() in self._registered:
            rt = torch.cuda.cudart()
            rt.cudaHostUnregister(flat.data_ptr())
            self._registered.discard(flat.data_ptr())
        self.ledger.sub(flat.numel())
        self.host[i] = None

    # ------------------------------------------------------------------ sizes
    @property
    def host_bytes(self) -> int:
        return sum(f.numel() for f in self.host if f is not None)

    @property
    def blocks_bytes(self) -> int:
        """Host bytes of all the blocks when they are in host memory."""
        return sum(self.sizes)

    @property
    def resident(self) -> bool:
        """The blocks are in host memory (not evicted)."""
        return all(f is not None for f in self.host)

    # ------------------------------------------------------------------ host RAM short
    def evict(self) -> None:
        """Drop the blocks from host memory (needs a `source`); the expert must be idle. Parameters
        point at placeholders until `reload()` (which a forward does by itself)."""
        if self.source is None:
            raise OffloadError(f"the {self.label} expert has no checkpoint folder to re-read its blocks from")
        if all(f is None for f in self.host):
            return
        self.release_ring()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read the host buffers
        for i in range(self.n):
            for e in self.entries[i]:
                e.tensor.data = _placeholder(e)
            self._free_host(i)
        self.stats.evictions += 1
        log.info("host RAM low: dropped the %s expert's blocks from host memory (%.1f GB)", self.label,
                 self.blocks_bytes / 1e9)

    def reload(self) -> float:
        """Re-read the evicted blocks from the safetensors files into new (pinned) host buffers,
        block by block. Returns the seconds it took."""
        import time

        if self.resident:
            return 0.0
        t0 = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=self.n, desc=f"re-read {self.label} expert", unit="block", leave=False,
                   disable=not log.isEnabledFor(logging.INFO) or self.n < 8, dynamic_ncols=True)
        for i in range(self.n):
            if self.host[i] is not None:
                continue
            flat = self._host_buffer(self.sizes[i])
            self.source.read_into({e.key: _view(flat, e) for e in self.entries[i]})
            for e in self.entries[i]:
                e.tensor.data = _view(flat, e)
            self.host[i] = flat
            bar.update(1)
        bar.close()
        dt = time.perf_counter() - t0
        self.stats.reloads += 1
        self.stats.reload_s += dt
        log.info("host RAM low: re-read the %s expert's %d blocks (%.1f GB) from %s in %.1f s", self.label, self.n,
                 self.blocks_bytes / 1e9, self.source.folder, dt)
        return dt

    @property
    def ring_bytes(self) -> int:
        return self.k * self.block_bytes

    def copy_bandwidth(self) -> tuple[float, float]:
        """(seconds spent copying, GB/s) over the copies timed since `timing` was set (CUDA);
        synchronises. Each copy is timed from after its wait for the slot to its end."""
        if not self._timed:
            return 0.0, 0.0
        torch.cuda.synchronize(self.device)
        sec = sum(a.elapsed_time(b) for a, b, _ in self._timed) / 1e3
        nbytes = sum(n for _, _, n in self._timed)
        self._timed = []
        return sec, nbytes / sec / 1e9

    def in_ring(self) -> int:
        """Blocks whose weights the ring holds now (issued and not yet overwritten)."""
        return sum(o is not None for o in self.owner)

    # ------------------------------------------------------------------ placement
    def place(self, device) -> None:
        """Move everything outside the blocks to `device` (the blocks stay in host memory)."""
        for child in self.model.children():
            if child is not self.model.blocks:
                child.to(device)
        for t in [*self.model._parameters.values(), *self.model._buffers.values()]:
            if t is not None:
                t.data = t.data.to(device)

    def release_ring(self) -> None:
        """Free the device ring (an idle expert holds no GPU memory for its blocks)."""
        if self.ring is None:
            return
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.ring = None
        self.owner = [None] * self.k
        self.ready = [None] * self.k
        self.free = [None] * self.k
        self._issued = set()

    def park(self, device="cpu") -> None:
        """Expert goes idle: release the ring and move the non-block parts to `device`."""
        self.release_ring()
        self.place(device)

    # ------------------------------------------------------------------ ring mechanics
    def _ensure_ring(self) -> list[torch.Tensor]:
        if self.ring is None:
            self.ring = [torch.empty(self.block_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.k)]
        return self.ring

    def _issue(self, j: int) -> None:
        """Start copying block j into its slot (after the slot's previous owner has finished)."""
        ring = self._ensure_ring()
        s = j % self.k
        assert self._running is None or self.owner[s] != self._running, "overwriting the running block's slot"
        n = self.host[j].numel()
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.free[s] is not None:
                    self.copy_stream.wait_event(self.free[s])
                start = torch.cuda.Event(enable_timing=True) if self.timing else None
                if start is not None:
                    start.record(self.copy_stream)  # after the wait: the pair times the copy alone
                ring[s][:n].copy_(self.host[j], non_blocking=True)
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record(self.copy_stream)
            self.ready[s] = ev
            if start is not None:
                self._timed.append((start, ev, n))
        else:
            ring[s][:n].copy_(self.host[j])
        self.owner[s] = j
        self._issued.add(j)
        self.stats.copies += 1
        self.stats.bytes += n
        self.stats.max_in_ring = max(self.stats.max_in_ring, self.in_ring())
        if self.trace:
            self.stats.log.append(("copy", j, s))

    def _prefetch(self, i: int) -> None:
        for j in range(i, min(i + self.k, self.n)):
            if j not in self._issued:
                self._issue(j)

    def _on_model_start(self, module, args, kwargs=None):
        if not self.resident:  # evicted (host RAM low) and called without the pipeline's switch
            self.reload()
        self._issued = set()
        self._fresh = True
        self.stats.forwards += 1
        self._prefetch(0)  # overlaps the first copies with the embeddings

    def _make_pre(self, i: int):
        def pre(module, args):
            if i == 0:
                if not self._fresh:  # block 0 called without the model's forward: a new pass
                    self._issued = set()
                self._fresh = False
            self._prefetch(i)
            s = i % self.k
            assert self.owner[s] == i, f"block {i} is not in its slot {s} (holds {self.owner[s]})"
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            slot = self.ring[s]
            for e in self.entries[i]:
                e.tensor.data = _view(slot, e)
            self._running = i
            if self.trace:
                self.stats.log.append(("run", i, s))
        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            s = i % self.k
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.free[s] = ev
            flat = self.host[i]
            for e in self.entries[i]:
                e.tensor.data = _view(flat, e)
            self._running = None
            if self.trace:
                self.stats.log.append(("done", i, s))
        return post

    # ------------------------------------------------------------------ undo
    def remove(self, device=None) -> nn.Module:
        """Undo streaming: hooks off, ring freed, every block tensor back in its own storage on
        `device` (default: the streaming device; "cpu" gives a normal CPU model). Exact bytes."""
        device = self.device if device is None else torch.device(device)
        self.reload()  # an evicted expert comes back from its files first
        for h in self._handles:
            h.remove()
        self._handles = []
        self.release_ring()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read the host buffers
        for i in range(self.n):  # block by block: the host never holds two copies of the model
            flat = self.host[i]
            for e in self.entries[i]:
                v = _view(flat, e)
                e.tensor.data = v.clone() if device.type == "cpu" else v.to(device)
            self._free_host(i)
        self.host = []
        self.place(device)
        self.model._block_streamer = None
        return self.model


def enable_block_streaming(model: nn.Module, device, ring: int = 2, pin: bool | None = None,
                           trace: bool = False, **kw) -> BlockStreamer:
    """Stream `model.blocks` from host memory through `ring` device buffers; the rest of the
    model moves to `device`. Returns the handle; `handle.remove()` restores a normal model.
    Keyword arguments (source, load, ledger, label) go to `BlockStreamer`."""
    s = BlockStreamer(model, device, ring=ring, pin=pin, trace=trace, **kw)
    where = (f"in {'pinned' if s.pin else 'pageable'} host memory ({s.host_bytes / 1e9:.1f} GB)" if s.resident
             else f"out of host memory until used (re-read from {s.source.folder})")
    log.info("block streaming (%s): %d blocks of %.2f GB %s, ring of %d on %s (%.2f GB)", s.label, s.n,
             s.block_bytes / 1e9, where, s.k, s.device, s.ring_bytes / 1e9)
    return s


def streamer_of(model) -> BlockStreamer | None:
    return getattr(model, "_block_streamer", None)


def check_offload_device(mode: str, device, what: str | None = None) -> None:
    """The one rule for where offloading runs: 'model' and 'blocks' move weights between host memory
    and a CUDA device; on a CPU the weights already sit in host memory and there is nothing to
    save. Raises OffloadError naming `what` (default: "offload <mode>")."""
    dev = torch.device(device)
    if mode != "none" and dev.type != "cuda":
        raise OffloadError(f"{what or f'offload {mode}'} needs a CUDA GPU, and none is in use (device {dev})")


def resolve_offload(offload: str | None, offload_model: bool | None, no_offload: bool, preset_mode: str,
                    device_type: str, compile: bool | None) -> str:
    """One offload mode from the flags: `--offload {none,model,blocks}`, the official
    `--offload_model True/False` (= model / none) and `--no-offload` (= none); any two that
    disagree are an error. Without any of them the preset's mode holds. Raises OffloadError."""
    asked = []
    if offload is not None:
        asked.append((f"--offload {offload}", offload))
    if offload_model is not None:
        asked.append((f"--offload_model {offload_model}", "model" if offload_model else "none"))
    if no_offload:
        asked.append(("--no-offload", "none"))
    for flag, mode in asked[1:]:
        if mode != asked[0][1]:
            raise OffloadError(f"{asked[0][0]} conflicts with {flag}: give one of them")
    mode = asked[0][1] if asked else preset_mode
    if mode not in OFFLOAD_MODES:
        raise OffloadError(f"unknown offload mode {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")
    if asked:
        check_offload_device(mode, device_type, what=asked[0][0])
    if mode == "blocks" and compile:
        raise OffloadError("--offload blocks does not work with --compile (compiled blocks run the streaming "
                           "hooks inside the graph): use one or the other")
    return mode if device_type == "cuda" else "none"


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


@dataclass(frozen=True)
class HostPlan:
    """The host-memory mode of block streaming and why (GB are 1e9 bytes)."""
    mode: str                  # "high": both experts' blocks pinned; "low": the active expert's only
    asked: str                 # auto / high / low
    need_gb: float             # both experts' blocks
    one_gb: float              # the larger expert's blocks
    available_gb: float | None
    reason: str

    def __getitem__(self, key):  # plan["mode"] (the dict this used to be)
        return getattr(self, key)


def host_plan(both_bytes: int, one_bytes: int, asked: str = "auto", held_bytes: int = 0,
              can_reload: bool = True, why_not: str = "", memory: HostMemory | None = None,
              headroom: int = HEADROOM_BYTES) -> HostPlan:
    """Choose the host-memory mode. `held_bytes` of blocks already sit in host memory (experts
    loaded on the CPU: pinning swaps their storage block by block, so they are not needed twice);
    high needs `both_bytes - held_bytes + headroom` more than is there now. `can_reload` is False
    without checkpoint files for both experts (`why_not` says why): then low cannot be chosen.
    Raises OffloadError for a forced low that cannot work or an unknown mode."""
    if asked not in HOST_RAM_MODES:
        raise OffloadError(f"unknown host RAM mode {asked!r}; choose from {', '.join(HOST_RAM_MODES)}")
    mem = host_memory() if memory is None else memory
    gb = lambda n: n / 1e9  # noqa: E731
    need_more = max(both_bytes - held_bytes, 0) + headroom
    have = (f"{gb(mem.available):.1f} GB available ({mem.source})" if mem.available is not None
            else "host memory unknown")
    facts = (f"both experts' blocks need {gb(both_bytes):.1f} GB pinned, {gb(held_bytes):.1f} GB of them already "
             f"in host memory, + {gb(headroom):.0f} GB headroom; {have}")
    plan = lambda mode, why: HostPlan(mode, asked, gb(both_bytes), gb(one_bytes),  # noqa: E731
                                      None if mem.available is None else gb(mem.available), why)
    if asked == "low":
        if not can_reload:
            raise OffloadError(f"--host_ram low re-reads the idle expert from its checkpoint files: {why_not}")
        return plan("low", f"forced (--host_ram low); {facts}")
    if asked == "high":
        return plan("high", f"forced (--host_ram high); {facts}")
    if mem.available is None or need_more <= mem.available:
        return plan("high", f"{facts}: both fit" if mem.available is not None else f"{have}; pinning both")
    if not can_reload:
        return plan("high", f"{facts}: short, but low cannot be used ({why_not}); pinning both anyway")
    return plan("low", f"{facts}: short, so only the active expert's blocks stay in host memory "
                       f"({gb(one_bytes):.1f} GB) and the other is re-read at the switch")


def _expert_folders(pipe, ckpt_dir) -> tuple[dict | None, str]:
    """{"high": folder, "low": folder} of the experts' safetensors, or (None, why not)."""
    from pathlib import Path

    ckpt = ckpt_dir if ckpt_dir is not None else getattr(pipe, "ckpt_dir", None)
    if ckpt is None:
        return None, "the pipeline has random weights and no checkpoint folder (give ckpt_dir)"
    try:
        from .lora import loaded_loras
        if loaded_loras(pipe.high_noise_model) or loaded_loras(pipe.low_noise_model):
            return None, "LoRAs are merged into the experts, and the files hold the weights without them"
    except ImportError:
        pass
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None and any(p.dtype == f8 for m in (pipe.high_noise_model, pipe.low_noise_model)
                              for p in m.parameters()):
        return None, "the experts are quantized to fp8 in memory, and the files hold the unquantized weights"
    cfg = pipe.config
    return {"high": Path(ckpt) / cfg.high_noise_checkpoint, "low": Path(ckpt) / cfg.low_noise_checkpoint}, ""


def enable_pipeline_streaming(pipe, ring: int = 2, pin: bool | None = None, host_ram: str = "auto",
                              ckpt_dir=None, plan: HostPlan | None = None, allow_cpu: bool = False
                              ) -> list[BlockStreamer]:
    """`WanT2V.enable_block_streaming`: stream both experts; both start idle (nothing on the
    device) and the pipeline's expert switch places the active one's non-block parts.

    host_ram: "high" keeps both experts' blocks in pinned host memory; "low" keeps the one in
    use only and re-reads the other from `ckpt_dir` (default: the folder the pipeline was loaded
    from) at the switch; "auto" picks low when the host is short (`host_plan`, logged). `plan`:
    one made already (`load_experts_for_streaming`, before the experts were read). A pipeline on
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
    if plan is None:
        held -= sum(n for n, (label, _) in zip(sizes, experts) if label in deferred)
        plan = host_plan(sum(sizes), max(sizes), host_ram, held, folders is not None, why_not)
    log.info("block streaming host RAM: %s (%s)", plan.mode, plan.reason)
    ledger, handles = HostLedger(), []
    for label, m in experts:
        low = plan.mode == "low"
        src = ExpertSource(folders[label], m) if low or label in deferred else None
        # low: the high-noise expert (the first a video uses) stays in host memory, the other waits in its files
        load = (not low or label == "high") and label not in deferred
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
    pipe.host_plan = plan
    pipe.host_ledger = ledger
    return handles


def disable_pipeline_streaming(pipe, device=None) -> None:
    """Undo `enable_pipeline_streaming`: both experts become normal models on `device`
    (default: the CPU, as the official offload keeps idle experts)."""
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        s = streamer_of(m)
        if s is not None:
            s.remove("cpu" if device is None else device)
    pipe.offload = "none"


@torch.no_grad()
def build_streamable_expert(config, device, dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    """A random-weight `WanModel` whose blocks never sit on `device` together: the non-block parts
    are materialised and initialised on `device` by `WanModel.init_weights` (the official init),
    then each block in turn on `device` in float32 (the peak is one block, ~1.4 GB for A14B),
    initialised with the same rules (xavier-uniform linears with zero bias, unit norms,
    modulation ~ N(0, 1) / sqrt(dim)) from a generator seeded (seed, block), cast to `dtype`
    and moved to host memory. Its values differ from `WanModel.from_config(seed=seed)` (another
    random stream), its distribution does not. Used by `WanT2V.from_preset(offload="blocks")`."""
    from .dit import WanModel, init_linears_and_norms_

    device = torch.device(device)
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
    for i, blk in enumerate(blocks):
        blk.to_empty(device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1_000_003 + i + 1)
        init_linears_and_norms_(blk, gen)
        blk.modulation.normal_(generator=gen).div_(model.dim ** 0.5)
        blk.to(dtype).to("cpu")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------ loading for streaming

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _block_bytes_in_files(folder, dtype) -> int:
    """Bytes the expert's blocks take in `dtype` (None: as stored), from the safetensors headers."""
    import math

    from safetensors import safe_open

    from .checkpoint import dit_weight_files

    total = 0
    for fname in dit_weight_files(folder):
        with safe_open(fname, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k.startswith("blocks."):
                    sl = f.get_slice(k)
                    dt = dtype or _ST_DTYPES.get(sl.get_dtype(), torch.float32)
                    total += math.prod(sl.get_shape()) * torch.empty((), dtype=dt).element_size()
    return total


def load_dit_without_blocks(folder, dtype=None) -> nn.Module:
    """`load_dit` (on the CPU) that reads only what is outside the blocks: every block parameter is
    a placeholder (right shape and dtype, one element of storage), to be read later by a
    `BlockStreamer` with `load=False` (`model._blocks_deferred` is True until then)."""
    from safetensors import safe_open

    from .checkpoint import CheckpointError, check_keys, check_shape, dit_weight_files, read_dit_config
    from .configs import DiTConfig
    from .dit import WanModel

    cfg = DiTConfig.from_dict(read_dit_config(folder))
    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict = {}
    for fname in dit_weight_files(folder):
        with safe_open(fname, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k not in expected or k in sd:
                    raise CheckpointError(f"{fname}: unexpected or duplicate key {k}")
                if k.startswith("blocks."):
                    sl = f.get_slice(k)
                    check_shape(k, tuple(sl.get_shape()), expected[k], fname)
                    sd[k] = placeholder(expected[k], dtype or _ST_DTYPES.get(sl.get_dtype(), torch.float32))
                    continue
                t = f.get_tensor(k)
                check_shape(k, t.shape, expected[k], fname)
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    check_keys(expected, sd.keys(), folder)
    model.load_state_dict(sd, strict=True, assign=True)
    model._blocks_deferred = True
    return model.eval().requires_grad_(False)


def load_experts_for_streaming(ckpt, config, dtype=None, host_ram: str = "auto", progress: bool = False):
    """(low, high, plan): both experts of an official folder, for block streaming. The host-memory
    plan is made first, from the files' headers (nothing read yet): in low mode the low-noise
    expert's blocks are not read at all (the switch reads them), so loading never holds both."""
    from pathlib import Path

    from .checkpoint import load_dit

    ckpt = Path(ckpt)
    folders = {"high": ckpt / config.high_noise_checkpoint, "low": ckpt / config.low_noise_checkpoint}
    sizes = [_block_bytes_in_files(folders[e], dtype) for e in ("high", "low")]
    plan = host_plan(sum(sizes), max(sizes), host_ram, held_bytes=0)
    high = load_dit(folders["high"], dtype=dtype, device="cpu", progress=progress)
    if plan.mode == "low":
        log.info("host RAM low: the low-noise expert's blocks are read at the expert switch, not now")
        low = load_dit_without_blocks(folders["low"], dtype=dtype)
    else:
        low = load_dit(folders["low"], dtype=dtype, device="cpu", progress=progress)
    return low, high, plan
