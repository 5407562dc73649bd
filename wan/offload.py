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

__all__ = ["BlockStreamer", "OffloadError", "StreamStats", "enable_block_streaming", "host_available_bytes",
           "OFFLOAD_MODES"]

OFFLOAD_MODES = ("none", "model", "blocks")
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
    log: list = field(default_factory=list)  # (event, block, slot) when `trace` is on


@dataclass(frozen=True)
class _Entry:
    tensor: torch.Tensor  # the Parameter (or buffer) object whose .data is re-pointed
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
    return flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


class BlockStreamer:
    """Streams `model.blocks` through a ring of `ring` device buffers (see the module docstring).

    Build with `enable_block_streaming(model, device, ring)`; undo with `remove()`.
    `pin=None` pins host buffers when the device is CUDA.
    """

    def __init__(self, model: nn.Module, device, ring: int = 2, pin: bool | None = None, trace: bool = False):
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
        self.model, self.device, self.trace = model, device, trace
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
        self.host: list[torch.Tensor] = []
        for blk in blocks:
            entries, off = [], 0
            for name, t in [*blk.named_parameters(), *blk.named_buffers()]:
                if not t.is_contiguous():
                    raise OffloadError(f"block tensor {name} is not contiguous; streaming keeps strides as they are")
                n = t.numel() * t.element_size()
                entries.append(_Entry(t, off, n, t.dtype, tuple(t.shape)))
                off = _align(off + n)
            flat = self._host_buffer(max(off, _ALIGN))
            for e in entries:
                _view(flat, e).copy_(e.tensor.data)
                e.tensor.data = _view(flat, e)  # the original storage (CPU or device) is released here
            self.entries.append(entries)
            self.host.append(flat)
        self.block_bytes = max(f.numel() for f in self.host)

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
        if flat is not None and flat.data_ptr() in self._registered:
            rt = torch.cuda.cudart()
            rt.cudaHostUnregister(flat.data_ptr())
            self._registered.discard(flat.data_ptr())
        self.host[i] = None

    # ------------------------------------------------------------------ sizes
    @property
    def host_bytes(self) -> int:
        return sum(f.numel() for f in self.host)

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
                           trace: bool = False) -> BlockStreamer:
    """Stream `model.blocks` from host memory through `ring` device buffers; the rest of the
    model moves to `device`. Returns the handle; `handle.remove()` restores a normal model."""
    s = BlockStreamer(model, device, ring=ring, pin=pin, trace=trace)
    log.info("block streaming: %d blocks of %.2f GB in %s host memory (%.1f GB), ring of %d on %s (%.2f GB)",
             s.n, s.block_bytes / 1e9, "pinned" if s.pin else "pageable", s.host_bytes / 1e9, s.k, s.device,
             s.ring_bytes / 1e9)
    return s


def streamer_of(model) -> BlockStreamer | None:
    return getattr(model, "_block_streamer", None)


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
    if asked and mode != "none" and device_type != "cuda":
        raise OffloadError(f"{asked[0][0]} needs a CUDA GPU, and none is in use (device {device_type})")
    if mode == "blocks" and compile:
        raise OffloadError("--offload blocks does not work with --compile (compiled blocks run the streaming "
                           "hooks inside the graph): use one or the other")
    return mode if device_type == "cuda" else "none"


def _on_device(model: nn.Module, device) -> bool:
    d, want = model.patch_embedding.weight.device, torch.device(device)
    return d.type == want.type and (want.index is None or d.index == want.index)


def switch_experts(use: nn.Module, idle: nn.Module, device) -> None:
    """Expert switch under streaming: the idle expert frees its ring and its non-block parts
    leave the device; the active one's non-block parts come (its blocks stream as they run)."""
    si, su = streamer_of(idle), streamer_of(use)
    if si is not None and (si.ring is not None or _on_device(idle, device)):
        si.park("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
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


def host_plan(streamed_bytes: int, other_host_bytes: int = 0) -> dict:
    """Decide (and explain) the host-memory mode for streaming: the blocks of both experts stay
    in pinned host memory. They already sit in host memory once loaded on the CPU (pinning
    swaps each block's storage for a pinned one, block by block), so the extra peak is one
    block; the check warns when MemAvailable says the host is short anyway."""
    avail = host_available_bytes()
    plan = dict(mode="pinned-both", streamed_gb=streamed_bytes / 1e9, available_gb=None if avail is None
                else avail / 1e9, reason="")
    if avail is None:
        plan["reason"] = "host memory unknown; pinning both experts' blocks"
    elif streamed_bytes + other_host_bytes > avail:
        plan["reason"] = (f"both experts' blocks need {streamed_bytes / 1e9:.1f} GB pinned but only "
                          f"{avail / 1e9:.1f} GB is available now; pinning anyway (the active-expert-only "
                          f"mode that reloads at the switch is not implemented)")
    else:
        plan["reason"] = f"{streamed_bytes / 1e9:.1f} GB of blocks fit the {avail / 1e9:.1f} GB available"
    return plan


def enable_pipeline_streaming(pipe, ring: int = 2, pin: bool | None = None) -> list[BlockStreamer]:
    """`WanT2V.enable_block_streaming`: stream both experts; both start idle (nothing on the
    device) and the pipeline's expert switch places the active one's non-block parts."""
    if pipe.device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadError("block streaming on CUDA needs a CUDA device")
    experts = (pipe.high_noise_model, pipe.low_noise_model)
    need = sum(p.numel() * p.element_size() for m in experts for p in m.blocks.parameters())
    plan = host_plan(need)
    log.info("block streaming host memory: %s (%s)", plan["mode"], plan["reason"])
    handles = []
    for m in experts:
        h = enable_block_streaming(m, pipe.device, ring=ring, pin=pin)
        h.park("cpu")
        handles.append(h)
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.offload = "blocks"
    pipe.host_plan = plan
    return handles


def disable_pipeline_streaming(pipe, device=None) -> None:
    """Undo `enable_pipeline_streaming`: both experts become normal models on `device`
    (default: the CPU, as the official offload keeps idle experts)."""
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        s = streamer_of(m)
        if s is not None:
            s.remove("cpu" if device is None else device)
    pipe.offload = "none"
