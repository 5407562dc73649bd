"""Model offload's kept host copies (wan/parking.py). On the CPU a `remote` predicate stands in
for "on the GPU" (every tensor counts as remote), so the bookkeeping runs without CUDA; the
GPU-marked test runs the real thing: pinned slots, reused across generations, same latents."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from wan.parking import HostSlots, slots_of, to_host


def _model():
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    m.register_buffer("table", torch.arange(6.0))
    return m


def _tensors(m):
    return [*m.parameters(), *m.buffers()]


def _leave(m):
    """What a move to the device does to the model: every tensor gets new storage."""
    m._apply(lambda t: t.clone())


def test_slots_hold_the_model_and_are_kept_from_one_offload_to_the_next(seed):
    m = _model()
    slots = HostSlots(pin=False, remote=lambda t: True)
    want = [t.detach().clone() for t in _tensors(m)]
    _leave(m)
    slots.fill(m)
    ptrs = [s.data_ptr() for s in slots.slots]
    assert [t.data_ptr() for t in _tensors(m)] == ptrs  # the model points at its slots
    assert all(torch.equal(t, w) for t, w in zip(_tensors(m), want))
    assert isinstance(m[0].weight, nn.Parameter) and slots.nbytes == sum(t.numel() * 4 for t in want)
    _leave(m)
    with torch.no_grad():
        m[0].weight.add_(1.0)  # changed "on the device" (a LoRA merged): the next offload copies it
    slots.fill(m)
    assert [s.data_ptr() for s in slots.slots] == ptrs  # the same host memory, no new allocation
    assert torch.equal(m[0].weight, want[0] + 1.0) and torch.equal(slots.slots[0], want[0] + 1.0)


def test_a_tensor_that_changed_shape_or_dtype_gets_a_new_slot(seed):
    m = _model()
    slots = HostSlots(pin=False, remote=lambda t: True)
    _leave(m)
    slots.fill(m)
    ptrs = [s.data_ptr() for s in slots.slots]
    m[2] = nn.Linear(16, 5)          # new shapes at slots 4 and 5 (weight, bias)
    m.table = m.table.double()       # a new dtype at the last slot
    _leave(m)
    slots.fill(m)
    new = [s.data_ptr() for s in slots.slots]
    assert new[:4] == ptrs[:4] and all(a != b for a, b in zip(new[4:], ptrs[4:]))
    assert slots.slots[4].shape == (5, 16) and slots.slots[-1].dtype == torch.float64
    del m[2]                          # fewer tensors (as when fp8 layers replace bf16 ones): no slot is left behind
    _leave(m)
    slots.fill(m)
    assert len(slots.slots) == 5 and slots.nbytes == sum(t.numel() * t.element_size() for t in _tensors(m))
    slots.release()
    assert slots.slots == []


def test_only_remote_tensors_move():
    m = _model()
    slots = HostSlots(pin=False, remote=lambda t: t.dim() == 2)  # the two weights only
    before = [t.data_ptr() for t in _tensors(m)]
    slots.fill(m)
    after = [t.data_ptr() for t in _tensors(m)]
    moved = [a != b for a, b in zip(before, after)]
    assert moved == [True, False, False, False, True, False, False]


def test_to_host_leaves_a_cpu_model_alone():
    m = _model()
    ptrs = [t.data_ptr() for t in _tensors(m)]
    to_host(m)
    assert slots_of(m) is None and [t.data_ptr() for t in _tensors(m)] == ptrs


@pytest.mark.gpu
def test_cuda_model_offload_reuses_pinned_slots_and_keeps_the_latents(seed):
    """Two generations under model offload: the experts wait in pinned slots, the second run's
    offloads reuse the first run's memory, and the latents equal a run with nothing offloaded."""
    from wan.pipeline import WanT2V

    pipe = WanT2V.from_config("tiny", device="cuda", seed=0)
    args = dict(size="128*128", frame_num=5, sampling_steps=4, seed=3, progress=False, return_latents=True)
    ref = pipe.generate("a red fox", offload_model=False, **args)
    a = pipe.generate("a red fox", offload_model=True, **args)
    ptrs = {n: [s.data_ptr() for s in slots_of(m).slots] for n, m in
            (("high", pipe.high_noise_model), ("low", pipe.low_noise_model))}
    b = pipe.generate("a red fox", offload_model=True, **args)
    for name, m in (("high", pipe.high_noise_model), ("low", pipe.low_noise_model)):
        s = slots_of(m)
        assert [x.data_ptr() for x in s.slots] == ptrs[name], name
        assert s.pin and s._registered, f"{name}: slots not page-locked"
        assert all(p.device.type == "cpu" for p in m.parameters())
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert pipe.last_timings.offload > 0 and len(pipe.last_timings.moves) == 5


def test_pin_only_where_the_host_has_room(monkeypatch, caplog):
    """Page-locked slots only when the model's bytes plus the headroom are free (or unknown)."""
    import wan.parking as wp
    from wan.hostmem import HEADROOM_BYTES, HostMemory

    m = _model()
    need = sum(t.numel() * t.element_size() for t in _tensors(m))
    for free, want in ((None, True), (need + HEADROOM_BYTES, True), (need + HEADROOM_BYTES - 1, False)):
        monkeypatch.setattr(wp, "host_memory", lambda free=free: HostMemory(available=free, source="test"))
        assert wp._room_to_pin(m) is want, free
    assert "stays pageable" in caplog.text


def test_block_streaming_drops_the_kept_copies(seed):
    """A pipeline that ran under model offload (kept host copies) and then streams its blocks (the
    benchmark's reference, then its optimized mode) does not hold its experts twice."""
    from wan.offload import enable_pipeline_streaming
    from wan.pipeline import WanT2V

    pipe = WanT2V.from_config("tiny", device="cpu", seed=0)
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        m._host_slots = HostSlots(pin=False, remote=lambda t: True)
        _leave(m)
        m._host_slots.fill(m)
    enable_pipeline_streaming(pipe, allow_cpu=True)
    assert slots_of(pipe.high_noise_model) is None and slots_of(pipe.low_noise_model) is None
    out = pipe.generate("a red fox", size="128*128", frame_num=5, sampling_steps=2, seed=1, progress=False,
                        return_latents=True)
    assert torch.isfinite(out).all()
