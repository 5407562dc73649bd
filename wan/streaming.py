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

Host RAM short: a streamer given a `source` (`wan.hostmem.ExpertSource`) can drop its blocks
from host memory (`evict`: the parameters point at one-element placeholders) and re-read them
from the files (`reload`). Its host bytes are counted in a `HostLedger`, which the two experts
of a pipeline share. When that happens is the pipeline's policy (wan.offload, wan.hostmem).

Not supported: regional `torch.compile` of the blocks (`compile_blocks`): `Module.compile`
runs the module's hooks inside the compiled function, and these hooks touch streams and
re-point parameters. `enable_block_streaming` refuses a compiled block with one line.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from .naming import NamedError

log = logging.getLogger("wan.offload")  # the logger of the whole offload path (streaming, hostmem, offload)

__all__ = ["BlockStreamer", "OffloadError", "StreamStats", "HostLedger", "enable_block_streaming", "streamer_of",
           "placeholder"]

_ALIGN = 512  # byte alignment of each tensor inside a flat buffer (>= what any kernel asks for)


class OffloadError(NamedError):
    """A streaming request that cannot work (compiled blocks, bad ring size, ...): one line."""


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


def placeholder(shape, dtype) -> torch.Tensor:
    """What a parameter out of host memory points at: its shape and dtype over one element of
    storage (a CPU tensor, so `.data` may be swapped back; its values are not the weights)."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
    return flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


class BlockStreamer:
    """Streams `model.blocks` through a ring of `ring` device buffers (see the module docstring).

    Build with `enable_block_streaming(model, device, ring)`; undo with `remove()`.
    `pin=None` pins host buffers when the device is CUDA. `source` (a `wan.hostmem.ExpertSource`:
    `folder`, `read_into(key -> destination view)`) lets the
    blocks leave host memory (`evict()`) and come back from the files (`reload()`); with
    `load=False` they start evicted (the module's own block storage is dropped, never pinned).
    `ledger` counts host bytes (share one between experts).
    """

    def __init__(self, model: nn.Module, device, ring: int = 2, pin: bool | None = None, trace: bool = False,
                 source=None, load: bool = True, ledger: HostLedger | None = None,
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
            raise OffloadError("block streaming does not work with compiled blocks (torch.compile): use one or the "
                               "other")
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
                    e.tensor.data = placeholder(e.shape, e.dtype)  # the original storage is released here
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
                e.tensor.data = placeholder(e.shape, e.dtype)
            self._free_host(i)
        self.stats.evictions += 1
        log.info("host RAM low: dropped the %s expert's blocks from host memory (%.1f GB)", self.label,
                 self.blocks_bytes / 1e9)

    def reload(self) -> float:
        """Re-read the evicted blocks from the safetensors files into new (pinned) host buffers,
        block by block. Returns the seconds it took."""
        if self.resident:
            return 0.0
        t0 = time.perf_counter()
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
