"""wan_triton: patch/unpatch exactness, patched model parity, switches reaching the pipeline."""
import importlib
import logging

import pytest
import torch

import kernels
import wan_triton
from wan import attention as att
from wan import dit, pipeline
from wan.configs import TINY
from wan.dit import WanModel
from wan_triton import accel

wpatch = importlib.import_module("wan_triton.patch")  # the module (the package exports the function)

NAMES = [(dit, "rms_norm"), (dit, "rope_apply"), (dit, "rms_norm_rope"), (dit, "modulate"),
         (dit, "gated_residual"), (pipeline, "cfg_combine")]


def originals():
    return {name: getattr(mod, name) for mod, name in NAMES}


def test_patch_unpatch_restores_the_same_objects():
    before = originals()
    backend = att.get_backend()
    done = wan_triton.patch()
    assert len(done) == 6 and wan_triton.is_patched()
    for mod, name in NAMES:
        assert getattr(mod, name) is getattr(kernels, name), name
    wan_triton.patch()  # twice is harmless: the originals are still remembered
    wan_triton.unpatch()
    after = originals()
    assert all(after[k] is before[k] for k in before)
    assert att.get_backend() == backend and not wan_triton.is_patched()
    wan_triton.unpatch()  # unpatching when nothing is patched is a no-op
    assert all(originals()[k] is before[k] for k in before)


def test_patch_subset_only_swaps_what_was_asked():
    before = originals()
    wan_triton.patch(rms_norm=False, modulation=False, cfg=False)
    assert dit.rms_norm is before["rms_norm"] and dit.modulate is before["modulate"]
    assert dit.rope_apply is kernels.rope_apply and dit.gated_residual is kernels.gated_residual
    assert dit.rms_norm_rope is before["rms_norm_rope"]  # the fused op needs both halves
    wan_triton.unpatch()


def test_patched_context_manager():
    before = originals()
    with wan_triton.patched():
        assert dit.modulate is kernels.modulate
    assert all(originals()[k] is before[k] for k in before)


def test_fallback_and_strict(monkeypatch, caplog):
    monkeypatch.setattr(wpatch, "kernel_support", lambda: (False, "no CUDA device"))
    before = originals()
    with caplog.at_level(logging.WARNING, logger="wan_triton"):
        assert wan_triton.patch() == []
    assert "no CUDA device" in caplog.text
    assert all(originals()[k] is before[k] for k in before)
    with pytest.raises(wpatch.PatchError, match="no CUDA device"):
        wan_triton.patch(strict=True)
    wan_triton.unpatch()


@pytest.fixture
def tiny(seed):
    return WanModel.from_config(TINY.dit, seed=seed, zero_head=False)


def _inputs():
    x = torch.randn(2, 16, 3, 6, 10)
    return x, torch.tensor([950, 300]), [torch.randn(5, 32), torch.randn(9, 32)]


def test_patched_model_matches_reference(tiny):
    x, t, ctx = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny(x, t, ctx, seq_len=3 * 3 * 5 + 7)
        with wan_triton.patched():
            out = tiny(x, t, ctx, seq_len=3 * 3 * 5 + 7)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def test_instance_patch_leaves_globals_alone(tiny):
    before = originals()
    x, t, ctx = _inputs()
    ref = tiny(x, t, ctx)
    wan_triton.patch(tiny, attention=None)
    assert all(originals()[k] is before[k] for k in before)
    calls = []
    real = kernels.modulate

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    kernels.modulate = spy
    try:
        out = tiny(x, t, ctx)
    finally:
        kernels.modulate = real
    assert calls, "the instance forward did not use the kernels"
    assert all(originals()[k] is before[k] for k in before)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    wan_triton.unpatch(tiny)
    assert "forward" not in vars(tiny)


def test_tf32_switch_returns_previous():
    prev = wan_triton.enable_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    wan_triton.restore_tf32(prev)
    assert torch.backends.cuda.matmul.allow_tf32 == prev["matmul"]
    assert torch.backends.cudnn.allow_tf32 == prev["cudnn"]


def test_presets_and_cuda_only_errors():
    assert set(accel.PRESETS) >= {"h200", "h100", "a100-80g", "a100-40g", "l40s", "rtx4090"}
    if not torch.cuda.is_available():
        assert accel.detect_preset().name == "cpu"
        with pytest.raises(accel.AccelError, match="needs a CUDA GPU"):
            accel.get_preset("h200")
    with pytest.raises(accel.AccelError, match="unknown preset"):
        accel.get_preset("tpu-v9")
    with pytest.raises(accel.AccelError, match="compile mode"):
        accel.compile_blocks(WanModel.from_config(TINY.dit), "fastest")


def test_optimize_flags_reach_the_pipeline():
    pipe = pipeline.WanT2V.from_preset("tiny", device="cpu")
    applied = wan_triton.optimize(pipe, "cpu", triton=True, use_batched_cfg=True, attention="math")
    assert pipe.use_batched_cfg and applied["use_batched_cfg"]
    assert dit.modulate is kernels.modulate and att.resolve_backend(torch.device("cpu")) == "math"
    assert applied["offload_model"] is False and applied["compile"] is False
    wan_triton.unpatch()
    att.set_backend("auto")
    if not torch.cuda.is_available():
        with pytest.raises(accel.AccelError, match="--compile needs a CUDA GPU"):
            wan_triton.optimize(pipe, "cpu", compile=True)
        with pytest.raises(accel.AccelError, match="--tf32 needs a CUDA GPU"):
            wan_triton.optimize(pipe, "cpu", tf32=True)


def test_resident_fit_at_a14b_sizes():
    """Both A14B experts stay resident on a 143 GB H200 in bf16, not in fp32 (the stored dtype),
    and not on an 80 GB card."""
    from wan.configs import T2V_A14B
    from wan.t5 import T5Encoder

    with torch.device("meta"):
        n_dit = sum(p.numel() for p in WanModel(T2V_A14B.dit).parameters())
        n_t5 = sum(p.numel() for p in T5Encoder(T2V_A14B.t5).parameters())
    h200, h100 = 143_771 * 2**20 / 1e9, 80.0
    bf16 = (2 * n_dit * 2 + n_t5 * 2) / 1e9
    fp32 = (2 * n_dit * 4 + n_t5 * 2) / 1e9
    assert 68 < bf16 < 70 and 125 < fp32 < 127
    assert accel.fits_resident(bf16, h200) and not accel.fits_resident(fp32, h200)
    assert not accel.fits_resident(bf16, h100)


def test_optimize_offloads_when_the_experts_do_not_fit(monkeypatch, caplog):
    """A preset that keeps both experts resident offloads instead when the weights plus the measured
    headroom exceed the GPU (checked with a fake CUDA device: no GPU needed)."""
    import types

    tiny_pipe = pipeline.WanT2V.from_preset("tiny", device="cpu")
    fake = types.SimpleNamespace(device=torch.device("cuda"), high_noise_model=tiny_pipe.high_noise_model,
                                 low_noise_model=tiny_pipe.low_noise_model, text_encoder=tiny_pipe.text_encoder,
                                 t5_cpu=False, use_batched_cfg=False)
    need = accel.resident_gb(fake)
    assert need == pytest.approx(sum(p.numel() * p.element_size() for m in (
        tiny_pipe.high_noise_model, tiny_pipe.low_noise_model, tiny_pipe.text_encoder.model)
        for p in m.parameters()) / 1e9)
    resident = accel.Preset("resident", offload_model=False, t5_cpu=False, triton=False)
    for gpu_gb, offload in ((need + accel.RESIDENT_HEADROOM_GB + 1e-3, False),
                            (need + accel.RESIDENT_HEADROOM_GB - 1e-3, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev, gb=gpu_gb: types.SimpleNamespace(total_memory=gb * 1e9))
        caplog.clear()
        applied = wan_triton.optimize(fake, resident)
        assert applied["offload_model"] is offload
        assert ("the idle expert will wait in CPU memory" in caplog.text) is offload
    att.set_backend("auto")


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import wan, wan_triton, kernels, wan.dit as d, wan.pipeline as p; "
            "assert d.modulate.__module__ == 'wan.dit' and p.cfg_combine.__module__ == 'wan.pipeline'; "
            "assert not wan_triton.is_patched()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reference_never_imports_triton():
    import subprocess
    import sys

    code = ("import sys, wan, wan.dit, wan.pipeline, wan.t5, wan.vae, wan.schedulers, wan.attention, "
            "wan.checkpoint; bad = [m for m in sys.modules if m == 'triton' or m.startswith(('kernels', "
            "'wan_triton'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_patched_block_traces_without_graph_breaks(tiny):
    """Regional compile keeps the kernels: a patched DiT block is one dynamo graph."""
    x, t, ctx = _inputs()
    seen = {}
    blk = tiny.blocks[0]
    real_forward = blk.forward

    def grab(*a, **k):
        seen["args"] = a
        return real_forward(*a, **k)

    blk.forward = grab
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny(x, t, ctx, seq_len=3 * 3 * 5 + 4)  # padded: the masked-attention path too
    del blk.forward
    with wan_triton.patched(), torch.autocast("cpu", dtype=torch.bfloat16):
        ex = torch._dynamo.explain(tiny.blocks[1])(*seen["args"])
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_patched_restores_attention_choice(tiny):
    att.set_backend("math")
    try:
        with wan_triton.patched(tiny, attention="sdpa"):
            assert att.get_backend() == "sdpa"
        assert att.get_backend() == "math"
        with wan_triton.patched(attention="sdpa"):
            assert att.get_backend() == "sdpa"
        assert att.get_backend() == "math" and not wan_triton.is_patched()
    finally:
        att.set_backend("auto")
