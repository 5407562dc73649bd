"""Model offload's host memory: where an expert's weights wait while the other expert runs.

`model.to("cpu")` (what the official `offload_model=True` does) allocates fresh pageable host
memory at every offload and copies into it: on an H100 a 28.6 GB A14B expert took ~22 s that way
(bench/RESULTS.md section 17), and a 40-step video offloads three times (the switch, the end). Here
each model keeps its host copies from one offload to the next (`HostSlots`, one tensor per
parameter and buffer, in the order `nn.Module._apply` visits them), page-locked on CUDA
(`cudaHostRegister` on a plain allocation, as wan.streaming pins its blocks: no power-of-two
rounding), so both directions run at pinned speed (55 GB/s measured: ~0.5 s per expert) and no
page is faulted in twice. Where the host has not the model's bytes free plus wan.hostmem's
headroom, or registering fails, the slots stay pageable, said once.

Host memory: the slots of both experts (57 GB for A14B in bf16) stay allocated once each expert
has been offloaded, where `.to("cpu")` held the idle expert only between switches (and both
during one). The content is always copied from the device at offload, so weights changed on the
device in between (a LoRA merged, fp8 layers swapped in) are what the slots hold; a model whose
tensors changed shape or dtype gets new slots for them.

    to_host(model)             the model's device tensors copied into its slots; the model now
                               points at them; the device memory is released to the allocator
    to_device(model, device)   model.to(device), asynchronous from pinned slots (the stream
                               orders the forwards after the copies)
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch
import torch.nn as nn

from .hostmem import HEADROOM_BYTES, host_memory

log = logging.getLogger("wan.parking")

__all__ = ["HostSlots", "to_host", "to_device", "slots_of", "forget"]


class HostSlots:
    """One model's host copies, reused from one offload to the next. `pin`: page-lock them
    (CUDA); `remote`: which tensors leave the device (default: those on a CUDA device)."""

    def __init__(self, pin: bool, remote: Callable[[torch.Tensor], bool] | None = None):
        self.pin = pin
        self.remote = remote or (lambda t: t.device.type == "cuda")
        self.slots: list[torch.Tensor | None] = []
        self._registered: set[int] = set()
        self._warned = False

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots if s is not None)

    def _new(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype)
        if self.pin and host.numel():
            rt = torch.cuda.cudart()
            err = rt.cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
            if err == rt.cudaError.success:
                self._registered.add(host.data_ptr())
            elif not self._warned:
                log.warning("cudaHostRegister failed (%s): an offloaded expert waits in pageable host memory "
                            "(copies at pageable speed)", err)
                self._warned = True
        return host

    def _drop(self, i: int) -> None:
        old = self.slots[i]
        if old is not None and old.data_ptr() in self._registered:
            torch.cuda.cudart().cudaHostUnregister(old.data_ptr())
            self._registered.discard(old.data_ptr())
        self.slots[i] = None

    def slot(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Slot i for a tensor like t: the kept one when shape and dtype match, else a new one."""
        if i < len(self.slots) and self.slots[i] is not None and self.slots[i].shape == t.shape \
                and self.slots[i].dtype == t.dtype:
            return self.slots[i]
        if i >= len(self.slots):
            self.slots.extend([None] * (i + 1 - len(self.slots)))
        self._drop(i)
        self.slots[i] = self._new(t)
        return self.slots[i]

    def release(self) -> None:
        """Unregister and drop every slot (the model must no longer point at them)."""
        for i in range(len(self.slots)):
            self._drop(i)
        self.slots = []

    def fill(self, model: nn.Module) -> None:
        """Copy the model's remote tensors into the slots and point the model at them."""
        order = itertools.count()

        def copy_to_slot(t: torch.Tensor) -> torch.Tensor:
            i = next(order)
            if not self.remote(t):
                if i < len(self.slots):
                    self._drop(i)  # nothing of this model waits there any more
                return t
            host = self.slot(i, t)
            host.copy_(t, non_blocking=self.pin)
            return host

        with torch.no_grad():
            model._apply(copy_to_slot)
        used = next(order)
        for i in range(used, len(self.slots)):  # a model with fewer tensors than before (fp8 layers swapped in)
            self._drop(i)
        del self.slots[used:]

    def __del__(self):  # registered memory is unregistered before it is freed
        try:
            self.release()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


def slots_of(model: nn.Module) -> HostSlots | None:
    return getattr(model, "_host_slots", None)


def forget(model: nn.Module) -> None:
    """Drop a model's kept host copies (unregistered first). Block streaming calls it before it
    takes the weights into its own host buffers: a slot the model still points at stays valid
    (pageable) until the streamer has copied it, and no expert is held twice."""
    slots = slots_of(model)
    if slots is not None:
        slots.release()
        del model._host_slots


def to_host(model: nn.Module, pin: bool | None = None) -> None:
    """Model offload: the model's CUDA tensors into its kept host slots (made on the first call;
    `pin=None`: page-locked where the host has room, `_room_to_pin`), then the device memory back
    to the allocator."""
    cuda = any(t.device.type == "cuda" for t in itertools.chain(model.parameters(), model.buffers()))
    if not cuda:
        return
    slots = slots_of(model)
    if slots is None:
        slots = HostSlots(pin=_room_to_pin(model) if pin is None else pin)
        model._host_slots = slots
    slots.fill(model)
    torch.cuda.synchronize()  # the copies are done before anything reads the slots
    torch.cuda.empty_cache()


def _room_to_pin(model: nn.Module) -> bool:
    """Page-lock a model's slots only where the host has them free plus wan.hostmem's headroom
    (locked pages cannot be reclaimed; unknown free memory: pin, as block streaming does)."""
    need = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    free = host_memory().available
    if free is None or need + HEADROOM_BYTES <= free:
        return True
    log.warning("%.1f GB free in host memory for a %.1f GB model (+ %.0f GB headroom): its offloaded copy stays "
                "pageable (slower copies)", free / 1e9, need / 1e9, HEADROOM_BYTES / 1e9)
    return False


def to_device(model: nn.Module, device) -> None:
    """Back onto the device (asynchronous from pinned slots; the stream orders what follows)."""
    model.to(device, non_blocking=True)
