"""Per-stage wall times of one generation, measured device-synchronised.

    tm = Timings(device="cuda")
    with tm.measure("text_encode"): ...     # a float field: set
    with tm.measure("steps"): ...           # a list field: appended
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-stage wall times (seconds, device-synchronised) and peak GPU memory of one call (None
    off CUDA, where it is not measured)."""
    text_encode: float = 0.0
    image_encode: float = 0.0        # the image-conditioned tasks' VAE encode of the input image
    steps: list = field(default_factory=list)
    moves: list = field(default_factory=list)  # expert placements: before each step, after the last (offload)
    decode: float = 0.0
    total: float = 0.0
    peak_mem_gb: float | None = None  # measured on CUDA only
    experts: list = field(default_factory=list)
    device: str = ""
    cache: object = None  # wan.step_cache.CacheStats of a run with a step cache (None without)

    @property
    def denoise(self) -> float:
        return sum(self.steps)

    @property
    def offload(self) -> float:
        """Seconds spent placing experts: the needed one onto the device, the idle one off (model
        offload), and after the last step into host memory for the decode; no step's time holds them."""
        return sum(self.moves)

    @contextlib.contextmanager
    def measure(self, stage: str):
        """Time the block between two device synchronisations and store it under `stage`."""
        dev = self.device or "cpu"
        sync(dev)
        t0 = time.perf_counter()
        yield
        sync(dev)
        dt = time.perf_counter() - t0
        slot = getattr(self, stage)
        if isinstance(slot, list):
            slot.append(dt)
        else:
            setattr(self, stage, dt)

    def summary(self) -> str:
        mem = f" | peak GPU mem {self.peak_mem_gb:.1f} GB" if self.device.startswith("cuda") else ""
        image = f"image {self.image_encode:.2f}s | " if self.image_encode else ""
        offload = f"offload {self.offload:.2f}s | " if self.offload >= 0.005 else ""
        return (f"text {self.text_encode:.2f}s | {image}denoise {self.denoise:.2f}s ({len(self.steps)} steps) | "
                f"{offload}decode {self.decode:.2f}s | total {self.total:.2f}s{mem}")
