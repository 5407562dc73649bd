"""wan_triton: patch/unpatch exactness, kernel-or-reference dispatch and its counters, patched model
parity (with the kernels proven to have run), switches reaching the pipeline."""
import importlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_triton import kernels
import wan_triton
from wan import attention as att
from wan import dit, pipeline, vae
from wan.configs import TINY
from wan.dit import WanModel
from wan_triton import accel, plan

wpatch = importlib.import_module("wan_triton.patch")  # the module (the package exports the function)

NAMES = [(dit, "rms_norm"), (dit, "rope_apply"), (dit, "rms_norm_rope"), (dit, "modulate"), (dit, "layer_norm"),
         (dit, "gated_residual"), (pipeline, "cfg_combine"), (dit, "modulate_rows"), (dit, "gated_residual_rows"),
         (vae, "rms_norm_silu")]


def originals():
    return {name: getattr(mod, name) for mod, name in NAMES}


def kernel_of(fn):
    """The Triton op a patched name dispatches to (None for a reference function)."""
    return getattr(fn, "__wan_triton_kernel__", None)


def launches():
    return {op: s["launches"] for op, s in wan_triton.kernel_stats().items()}


def fallbacks():
    return {op: s["fallbacks"] for op, s in wan_triton.kernel_stats().items()}


def test_patch_unpatch_restores_the_same_objects():
    before = originals()
    backend = att.get_backend()
    done = wan_triton.patch()
    assert len(done) == len(NAMES) and wan_triton.is_patched()
    for mod, name in NAMES:
        assert kernel_of(getattr(mod, name)) is getattr(kernels, name), name
        assert getattr(mod, name).__wan_triton_reference__ is before[name], name
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
    assert kernel_of(dit.rope_apply) is kernels.rope_apply and kernel_of(dit.gated_residual) is kernels.gated_residual
    assert dit.rms_norm_rope is before["rms_norm_rope"]  # the fused op needs both halves
    wan_triton.unpatch()


def test_patched_context_manager():
    before = originals()
    with wan_triton.patched():
        assert kernel_of(dit.modulate) is kernels.modulate
    assert all(originals()[k] is before[k] for k in before)


def test_fallback_and_strict(monkeypatch, caplog):
    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    monkeypatch.setattr(wpatch, "kernel_support", lambda: (False, "no CUDA device"))
    before = originals()
    with caplog.at_level(logging.WARNING, logger="wan_triton"):
        assert wan_triton.patch() == []
    assert "no CUDA device" in caplog.text
    assert all(originals()[k] is before[k] for k in before)
    with pytest.raises(wpatch.PatchError, match="no CUDA device"):
        wan_triton.patch(strict=True)
    wan_triton.unpatch()


@pytest.mark.parametrize("cuda, interpreted, reason", [
    (True, False, "CUDA"), (True, True, "CUDA under the Triton interpreter (TRITON_INTERPRET=1: slow)"),
    (False, True, "Triton interpreter on CPU")])
def test_kernel_support_says_where_the_kernels_run(monkeypatch, cuda, interpreted, reason):
    """The patch log's reason: the interpreter left set on a GPU machine (25 s for one step of the demo on
    an H100, against a fraction of a second compiled) is said, not hidden behind 'CUDA'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(kernels, "interpret_mode", lambda: interpreted)
    assert wpatch.kernel_support() == (True, reason)


@pytest.mark.skipif(not kernels.interpret_mode(), reason="checks the Triton interpreter this suite runs under")
def test_this_interpreter_runs_the_kernels_loops():
    assert kernels.interpreter_problem() == ""


def test_a_broken_interpreter_is_refused_with_its_reason(monkeypatch):
    """Triton 3.6's interpreter with NumPy 2.4 dies in every kernel loop over a runtime bound (int() of a
    one-element array; the device image, 2026-12-07): the kernels are refused up front with that reason
    (strict: PatchError), not run into an InterpreterError deep inside a forward."""
    from wan_triton.kernels import _utils

    class Broken:  # a probe kernel whose launch fails the way Triton 3.6's interpreter does
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(_utils, "_loop_probe_kernel", Broken())
    monkeypatch.setattr(_utils, "_is_interpreted", lambda kernel: True)
    monkeypatch.setattr(_utils, "interpret_mode", lambda: True)
    monkeypatch.setattr(kernels, "interpret_mode", lambda: True)
    monkeypatch.setattr(_utils, "_INTERPRETER_PROBLEM", None)
    try:
        why = kernels.interpreter_problem()
        assert "cannot run the kernels' loops" in why and "only 0-dimensional" in why and "pip install -U triton" in why
        assert wpatch.kernel_support() == (False, why)
        assert kernels.unsupported_tensors(torch.zeros(2)) == why
        with pytest.raises(wpatch.PatchError, match="cannot run the kernels' loops"):
            wan_triton.patch(strict=True)
    finally:
        wan_triton.unpatch()


# Where the kernels run: the GPU when there is one, else the CPU under TRITON_INTERPRET=1.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(DEV == "cpu" and not kernels.interpret_mode(),
                                   reason="no CUDA device and TRITON_INTERPRET is not set: the kernels cannot run")


@pytest.fixture
def tiny(seed):
    return WanModel.from_config(TINY.dit, device=DEV, seed=seed, zero_head=False)


def _inputs():
    x = torch.randn(2, 16, 3, 6, 10, device=DEV)
    return (x, torch.tensor([950, 300], device=DEV),
            [torch.randn(5, 32, device=DEV), torch.randn(9, 32, device=DEV)])


@needs_kernels
def test_patched_model_matches_reference(tiny):
    """The kernels actually ran (launch counters), none fell back, and the output matches."""
    x, t, ctx = _inputs()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        ref = tiny(x, t, ctx, seq_len=3 * 3 * 5 + 7)
        wan_triton.reset_kernel_stats()
        with wan_triton.patched(strict=True):
            out = tiny(x, t, ctx, seq_len=3 * 3 * 5 + 7)
    n = len(tiny.blocks)
    assert launches() == dict(rms_norm=2 * n, rms_norm_rope=2 * n, rope_apply=0, modulate=2 * n + 1, layer_norm=n,
                              gated_residual=2 * n, cfg_combine=0, modulate_rows=0, gated_residual_rows=0,
                              rms_norm_silu=0), \
        wan_triton.kernel_stats()  # one timestep per sample: the per-token rows kernels do not run
    assert not any(fallbacks().values()), wan_triton.kernel_stats()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def test_unsupported_input_falls_back_visibly(seed, monkeypatch):
    """float64 is not a kernel dtype: the reference runs (same result), the fallback is counted
    with its reason, and strict mode (patch(strict=True) or WAN_TRITON_STRICT=1) raises it."""
    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors on a GPU machine would fall back too
    x = torch.randn(2, 5, 64, dtype=torch.float64, device=dev)
    w = torch.rand(64, dtype=torch.float64, device=dev) + 0.5
    want = originals()["rms_norm"](x, w, 1e-6)
    wan_triton.reset_kernel_stats()
    with wan_triton.patched():
        assert torch.equal(dit.rms_norm(x, w, 1e-6), want)
        dit.rms_norm(x.float(), w.float(), 1e-6)
        monkeypatch.setenv(wpatch.STRICT_ENV, "1")
        with pytest.raises(wan_triton.KernelFallback, match="rms_norm .*float64"):
            dit.rms_norm(x, w, 1e-6)
    st = wan_triton.kernel_stats()["rms_norm"]
    assert st["launches"] == 1 and st["fallbacks"] == 2 and "float64" in st["last_reason"]
    monkeypatch.delenv(wpatch.STRICT_ENV)
    with wan_triton.patched(strict=True):
        with pytest.raises(wan_triton.KernelFallback, match="float64"):
            dit.modulate(x, x[:, :1], x[:, :1], 1e-6)
    assert wan_triton.kernel_stats()["modulate"]["fallbacks"] == 1
    wan_triton.reset_kernel_stats()
    assert not any(fallbacks().values()) and not any(launches().values())


def test_fallback_reference_is_the_original_function(seed, monkeypatch):
    """Unsupported shapes run the original wan.dit function object, whatever the patch state."""
    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    ref = originals()["rms_norm_rope"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors on a GPU machine fall back for that reason
    x = torch.randn(2, 7, 64, device=dev)
    g, fr = torch.tensor([[1, 2, 3], [1, 1, 7]]), dit.rope_freqs(32).to(dev)
    with wan_triton.patched():
        # num_heads=3 does not divide C=64 -> reference; the reference raises the same error
        with pytest.raises(RuntimeError):
            ref(x, None, 1e-6, 3, g, fr)
        with pytest.raises(RuntimeError):
            dit.rms_norm_rope(x, None, 1e-6, 3, g, fr)
        assert "num_heads=3" in wan_triton.kernel_stats()["rms_norm_rope"]["last_reason"]


@needs_kernels
def test_instance_patch_leaves_globals_alone(tiny):
    before = originals()
    x, t, ctx = _inputs()
    ref = tiny(x, t, ctx)
    wan_triton.patch(tiny, attention=None)
    assert all(originals()[k] is before[k] for k in before)
    wan_triton.reset_kernel_stats()
    out = tiny(x, t, ctx)
    assert launches()["modulate"] == 2 * len(tiny.blocks) + 1, "the instance forward did not use the kernels"
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
    pipe = pipeline.WanT2V.from_config("tiny", device="cpu")
    applied = wan_triton.optimize(pipe, "cpu", triton=True, use_batched_cfg=True, attention="math")
    assert pipe.use_batched_cfg and applied.use_batched_cfg
    assert kernel_of(dit.modulate) is kernels.modulate and att.resolve_backend(torch.device("cpu")) == "math"
    assert applied.offload == "none" and pipe.offload == "none" and applied.compile is False
    wan_triton.unpatch()
    att.set_backend("auto")
    if not torch.cuda.is_available():
        with pytest.raises(accel.AccelError, match="compile=True needs a CUDA GPU"):
            wan_triton.optimize(pipe, "cpu", compile=True)
        with pytest.raises(accel.AccelError, match="tf32=True needs a CUDA GPU"):
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
    assert plan.fits_resident(bf16, h200) and not plan.fits_resident(fp32, h200)
    assert not plan.fits_resident(bf16, h100)


def test_optimize_offloads_when_the_experts_do_not_fit(monkeypatch, caplog):
    """A preset that keeps both experts resident offloads instead when the weights plus the measured
    headroom exceed the GPU (checked with a fake CUDA device: no GPU needed); the pipeline runs the
    decision (its `offload`)."""
    import types

    tiny_pipe = pipeline.WanT2V.from_config("tiny", device="cpu")
    need = sum(p.numel() * p.element_size() for m in (
        tiny_pipe.high_noise_model, tiny_pipe.low_noise_model, tiny_pipe.text_encoder.model)
        for p in m.parameters()) / 1e9
    resident = accel.Preset("resident", offload="none")
    for gpu_gb, offload in ((need + plan.RESIDENT_HEADROOM_GB + 1e-3, "none"),
                            (need + plan.RESIDENT_HEADROOM_GB - 1e-3, "model")):
        fake = types.SimpleNamespace(device=torch.device("cuda"), high_noise_model=tiny_pipe.high_noise_model,
                                     low_noise_model=tiny_pipe.low_noise_model, dit_models=tiny_pipe.dit_models,
                                     text_encoder=tiny_pipe.text_encoder, vae=tiny_pipe.vae, t5_cpu=False,
                                     use_batched_cfg=False,
                                     offload="model")
        monkeypatch.setattr(plan.DeviceInfo, "of", classmethod(
            lambda cls, dev=None, fp8=False, attention=None, gb=gpu_gb: plan.DeviceInfo("cuda", "cuda", gb)))
        caplog.clear()
        applied = wan_triton.optimize(fake, resident, triton=False)
        assert applied.offload == fake.offload == offload
        assert ("the idle expert will wait in CPU memory" in caplog.text) is (offload == "model")
    att.set_backend("auto")


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import wan, wan_triton, wan_triton.kernels, wan.dit as d, wan.pipeline as p; "
            "assert d.modulate.__module__ == 'wan.dit' and p.cfg_combine.__module__ == 'wan.pipeline'; "
            "assert not wan_triton.is_patched()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reference_never_imports_triton():
    import subprocess
    import sys

    code = ("import sys, wan, wan.dit, wan.pipeline, wan.t5, wan.vae, wan.schedulers, wan.attention, "
            "wan.checkpoint; bad = [m for m in sys.modules if m == 'triton' or m.startswith("
            "'wan_triton')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_kernels
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
    with torch.autocast(DEV, dtype=torch.bfloat16):
        tiny(x, t, ctx, seq_len=3 * 3 * 5 + 4)  # padded: the masked-attention path too
    del blk.forward
    with wan_triton.patched(), torch.autocast(DEV, dtype=torch.bfloat16):
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


def test_patch_leaves_the_attention_choice_alone():
    """patch()'s default does not touch the backend; a backend patch set is restored exactly."""
    att.set_backend("math")
    try:
        wan_triton.patch()
        assert att.get_backend() == "math"
        wan_triton.unpatch()
        assert att.get_backend() == "math"
        with wan_triton.patched():
            att.set_backend("sdpa")  # the user's own choice inside the block is kept
        assert att.get_backend() == "sdpa"
        att.set_backend("math")
        wan_triton.patch(attention="sdpa")
        wan_triton.patch(attention="auto")  # twice: the first saved choice is what comes back
        assert att.get_backend() == "auto"
        wan_triton.unpatch()
        assert att.get_backend() == "math"
    finally:
        wan_triton.unpatch()
        att.set_backend("auto")


def test_dispatcher_counts_and_strict(monkeypatch):
    from wan_triton.dispatch import Dispatcher

    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    d = Dispatcher()
    assert d.use_kernel("a", True, "") and not d.use_kernel("a", False, "float64 input")
    assert d.snapshot(["a", "b"]) == {"a": dict(launches=1, fallbacks=1, last_reason="float64 input"),
                                      "b": dict(launches=0, fallbacks=0, last_reason="")}
    d.strict = True
    with pytest.raises(wan_triton.KernelFallback, match="a fell back to the reference: float64 input"):
        d.use_kernel("a", False, "float64 input")
    assert d.snapshot(["a"])["a"]["fallbacks"] == 2  # counted before it raised
    d.strict = False
    monkeypatch.setenv(wpatch.STRICT_ENV, "1")
    with pytest.raises(wan_triton.KernelFallback):
        d.use_kernel("a", False, "float64 input")
    d.reset(["a"])
    assert d.snapshot(["a"])["a"] == dict(launches=0, fallbacks=0, last_reason="")


@needs_kernels
def test_patch_and_fp8_share_one_dispatcher(monkeypatch, caplog):
    """fp8's activation quantizers count in the same place as the patched ops, warn once per
    reason, and patch(strict=True) is strict mode for them as well."""
    from wan_triton import fp8
    from wan_triton.dispatch import DISPATCH

    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    monkeypatch.setattr(DISPATCH, "warned", set())  # no reason warned about yet
    x = torch.randn(3, 16, dtype=torch.float64, device=DEV)  # the kernels take fp32/bf16/fp16 only
    fp8.reset_fp8_stats()
    with caplog.at_level(logging.WARNING, logger="wan_triton"):
        fp8.quantize_input(x)
        fp8.quantize_input(x)
    assert fp8.fp8_stats()["quant_fp8"]["fallbacks"] == 2 and "float64" in fp8.fp8_stats()["quant_fp8"]["last_reason"]
    assert len([r for r in caplog.records if "quant_fp8" in r.getMessage()]) == 1  # once per reason
    with wan_triton.patched(strict=True):
        with pytest.raises(wan_triton.KernelFallback, match="quant_fp8 fell back"):
            fp8.quantize_input(x)
    fp8.quantize_input(x)  # strict mode ended with the patch
    assert fp8.fp8_stats()["quant_fp8"]["fallbacks"] == 4
    fp8.reset_fp8_stats()


@needs_kernels
def test_instance_patch_sets_nothing_on_the_model_but_its_forward(tiny):
    before, backend = set(vars(tiny)), att.get_backend()
    wan_triton.patch(tiny, attention="math")
    assert set(vars(tiny)) - before == {"forward"}
    wan_triton.patch(tiny, rms_norm=False)  # again: new flags, same wrapper
    assert set(vars(tiny)) - before == {"forward"}
    wan_triton.unpatch(tiny)
    assert set(vars(tiny)) == before and att.get_backend() == backend


@needs_kernels
def test_instance_strict_covers_its_own_ops_only(tiny, monkeypatch):
    """patch(model, strict=True): a fallback of that model's patched ops raises during its forward,
    while the process's strict mode (DISPATCH.strict, which the fp8 activation kernels obey) stays
    as it was: one model's forward switches no global state (issue 30, item 4)."""
    from wan_triton import fp8
    from wan_triton.dispatch import DISPATCH

    monkeypatch.delenv(wpatch.STRICT_ENV, raising=False)
    x64 = torch.randn(2, 5, 64, dtype=torch.float64, device=DEV)  # no kernel takes float64
    seen = []

    def inside_forward(block, args):
        fp8.quantize_input(x64)  # not an op of this model's patch: the torch formula, counted
        with pytest.raises(wan_triton.KernelFallback, match="modulate .*float64"):
            dit.modulate(x64, x64[:, :1], x64[:, :1], 1e-6)
        seen.append(DISPATCH.is_strict())

    tiny.blocks[0].register_forward_pre_hook(inside_forward)
    names = wan_triton.patch(tiny, strict=True)
    tiny(*_inputs())
    wan_triton.unpatch(tiny)
    assert seen == [False]
    assert names == ["wan.dit.rms_norm", "wan.dit.rope_apply", "wan.dit.rms_norm_rope", "wan.dit.modulate",
                     "wan.dit.modulate_rows", "wan.dit.layer_norm", "wan.dit.gated_residual", "wan.dit.gated_residual_rows",
                     "wan.pipeline.cfg_combine"]  # named as patch() names them


def test_patch_says_what_it_takes():
    """Anything but None, a WanModel or a diffusers Wan model/pipeline is one TypeError that says
    what patch() takes (issue 31, item 5: a Linear was 'patched', a string died in weakref), and
    nothing is changed: no op, no attention backend, no wrapper."""
    before, backend = originals(), att.get_backend()
    lin = torch.nn.Linear(2, 2)
    for bad in (lin, "foo", 3):
        with pytest.raises(TypeError, match=r"patch\(\) takes None .*, one wan\.dit\.WanModel, or a diffusers "
                                            r"WanTransformer3DModel or pipeline .*; got (Linear|str|int)$") as err:
            wan_triton.patch(bad, attention="math")
        assert "\n" not in str(err.value)
        with pytest.raises(TypeError, match="patch"):
            with wan_triton.patched(bad):
                pass
    pipe = pipeline.WanT2V.from_config("tiny", device="cpu")
    with pytest.raises(TypeError, match=r"got WanT2V; for a WanT2V, patch\(\) with no argument"):
        wan_triton.patch(pipe)
    assert originals() == before and att.get_backend() == backend
    assert "forward" not in vars(lin) and lin not in wpatch._instances and not wan_triton.is_patched()


def test_import_is_light_and_patch_stays_the_function():
    """`import wan_triton` imports neither torch nor triton (torch's registration of the Triton ops
    imports torch._inductor: 0.9 s of the 2.6 s, issue 31 item 9); each name loads its module when
    used; `wan_triton.patch` is the function, also after its submodule is imported."""
    code = ("import sys, wan_triton\n"
            "heavy = [m for m in ('torch', 'triton', 'torch._inductor', 'wan_triton.kernels') if m in sys.modules]\n"
            "import wan_triton.request, wan_triton.patch as p\n"
            "from wan_triton import patch, optimize\n"
            "print(heavy, callable(wan_triton.patch), p is patch, wan_triton.patch is patch, optimize.__module__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "True", "True", "True", "wan_triton.accel"]
    assert wan_triton.patch is wpatch.patch and all(hasattr(wan_triton, n) for n in wan_triton.__all__)
