"""wan.attention: backend selection and its log, the flash paths' argument plumbing (with fake
flash modules implementing the official semantics in float64), the fp8 quantization kernel vs
float64 formulas, `--attention fp8` on a machine without CUDA; on a GPU each available backend
vs a float64 reference, with and without padded keys."""
import logging
import math
import sys
import types

import pytest
import torch

from wan import attention as att
from tests.conftest import DEVICE, HAS_CUDA

# fp8 attention on Hopper writes an e4m3 output: one e4m3 rounding alone is ~3.6 % RMS; measured
# 5.8e-2..6.1e-2 on random inputs (H200, cuDNN 9.19). Exact backends stay under 1e-2 here.
FP8_TOL = 8e-2

ALL_FLASH = {"flash_attn.cute", "flash_attn_interface", "flash_attn.flash_attn_interface"}


@pytest.fixture(autouse=True)
def clean_attention():
    """Each test starts from 'auto', no registered backends, no cached probes; all restored after."""
    backend, registry, probes, eager = att.get_backend(), dict(att._registry), dict(att._probes), dict(att._eager_fns)
    att._registry.clear()
    att._reset_probes()
    att._eager_fns.clear()
    att.set_backend("auto")
    yield
    att._registry.clear()
    att._registry.update(registry)
    att._reset_probes()
    att._probes.update(probes)
    att._eager_fns.clear()
    att._eager_fns.update(eager)
    att.set_backend(backend)


# --- fakes: the official flash semantics in float64, recording what they were given ---------------

def _ref(q, k, v, k_lens=None):
    """float64 softmax(q k^T / sqrt(D)) v over [B, L, H, D]; keys >= k_lens[b] masked."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens.cpu()[:, None]
        s = s.masked_fill(~keep[:, None, None, :].to(s.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def _segments(x, cu):
    return [x[int(cu[i]):int(cu[i + 1])] for i in range(len(cu) - 1)]


def _fake_module(name, calls, returns_lse):
    m = types.ModuleType(name)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):
        assert softmax_scale is None and not causal
        calls.append(("dense", q.shape, k.shape))
        o = _ref(q, k, v).to(q.dtype)
        return (o, None) if returns_lse else o

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               *a, seqused_k=None, **kw):
        calls.append(dict(q=q.shape, k=k.shape, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q,
                          max_k=max_seqlen_k, seqused_k=seqused_k))
        if seqused_k is not None:  # batched tensors, keys >= seqused_k[b] masked (FA4 varlen on 4-D)
            assert q.dim() == 4 and seqused_k.dtype == torch.int32 and cu_seqlens_k is None
            o = _ref(q, k, v, seqused_k).to(q.dtype)
        else:  # packed [total, H, D] with cumulative lengths
            assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
            qs, ks, vs = _segments(q, cu_seqlens_q), _segments(k, cu_seqlens_k), _segments(v, cu_seqlens_k)
            assert max_seqlen_q == max(len(s) for s in qs) and max_seqlen_k == max(len(s) for s in ks)
            o = torch.cat([_ref(a_[None], b_[None], c_[None])[0] for a_, b_, c_ in zip(qs, ks, vs)]).to(q.dtype)
        return (o, None) if returns_lse else o

    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


@pytest.fixture
def fake_flash(monkeypatch):
    """All three flash packages 'installed' as fakes on a fake sm90 device; returns the call log."""
    calls = []
    mods = {"flash_attn.cute": _fake_module("flash_attn.cute", calls, True),
            "flash_attn_interface": _fake_module("flash_attn_interface", calls, True),
            "flash_attn.flash_attn_interface": _fake_module("flash_attn.flash_attn_interface", calls, False)}
    monkeypatch.setattr(att, "_find", lambda mod: mod in mods)
    monkeypatch.setattr(att, "_import", lambda mod: mods[mod])
    monkeypatch.setattr(att, "_capability", lambda device: (9, 0))
    return calls


CUDA = torch.device("cuda")  # a device object only: nothing runs on it in the CPU tests


# --- selection ----------------------------------------------------------------------------------

def test_auto_order_and_log_with_every_package(fake_flash, caplog):
    assert att.available_backends(CUDA) == ["fa4", "fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa", "math"]
    with caplog.at_level(logging.INFO, logger="wan.attention"):
        assert att.resolve_backend(CUDA) == "fa4"
        att.resolve_backend(CUDA)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attention backend on cuda: fa4"]  # once per device


@pytest.mark.parametrize("cap,first", [((9, 0), "fa4"), ((10, 0), "fa4"), ((8, 0), "fa2"), ((12, 0), "fa2")])
def test_auto_follows_the_gpu_generation(fake_flash, monkeypatch, cap, first):
    monkeypatch.setattr(att, "_capability", lambda device: cap)
    assert att.resolve_backend(CUDA) == first
    assert ("fa3" in att.available_backends(CUDA)) == (cap[0] == 9)


def test_installed_but_broken_fa4_is_left_out_and_logged_once(fake_flash, monkeypatch, caplog):
    real = att._import

    def broken(mod):
        if mod == "flash_attn.cute":
            raise ModuleNotFoundError("No module named 'cutlass'")
        return real(mod)

    monkeypatch.setattr(att, "_import", broken)
    with caplog.at_level(logging.WARNING, logger="wan.attention"):
        assert att.available_backends(CUDA)[:2] == ["fa3", "fa2"]
        att.available_backends(CUDA)
        assert att.resolve_backend(CUDA) == "fa3"
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, warns
    assert "fa4" in warns[0] and "does not import" in warns[0] and "cutlass" in warns[0]
    assert "dsl_packages" in warns[0]  # the pip --target hint
    att.set_backend("fa4")
    with pytest.raises(RuntimeError, match="'fa4' is not available on cuda.*does not import"):
        att.resolve_backend(CUDA)


def test_fa4_alone_does_not_make_fa2_available(tmp_path, monkeypatch):
    """FA4's wheel installs `flash_attn/cute` without `flash_attn/__init__.py`: a namespace
    package. Real find_spec on a fake layout: fa4 found, fa2 (flash_attn.flash_attn_interface) not."""
    pkg = tmp_path / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def flash_attn_func(*a, **k): pass\n"
                                     "def flash_attn_varlen_func(*a, **k): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(att, "_capability", lambda device: (9, 0))
    try:
        avail = att.available_backends(CUDA)
        assert avail[0] == "fa4" and "fa2" not in avail and "fa3" not in avail
        assert "not installed" in att.unavailable_reason("fa2", CUDA)
    finally:
        for m in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[m]


def test_nothing_installed_on_cpu_and_cuda(monkeypatch):
    monkeypatch.setattr(att, "_find", lambda mod: False)
    monkeypatch.setattr(att, "_capability", lambda device: (9, 0))
    assert att.available_backends("cpu") == ["sdpa", "math"]
    assert att.available_backends(CUDA) == ["sdpa-cudnn", "sdpa-flash", "sdpa", "math"]
    assert "pip install flash-attn-4" in att.unavailable_reason("fa4", CUDA)
    assert att.unavailable_reason("fa4", "cpu") == "fa4 needs a CUDA device"


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown attention backend 'fa5'"):
        att.set_backend("fa5")
    with pytest.raises(ValueError, match="built in"):
        att.register_backend("sdpa", lambda *a: None)
    assert "unknown" in att.unavailable_reason("fa5", "cpu")


def test_registered_lossy_backend_is_never_auto(caplog):
    probed = []
    att.register_backend("lossy8", lambda q, k, v, k_lens: q, lossy=True, note="test fp8",
                         available=lambda d: probed.append(d) or (True, ""))
    assert att.resolve_backend(torch.device("cpu")) == "sdpa" and not probed  # auto does not even probe it
    att.register_backend("exact-x", lambda q, k, v, k_lens: q, available=lambda d: (False, "not here"))
    assert "lossy8" in att.backend_names() and att.available_backends("cpu") == ["lossy8", "sdpa", "math"]
    assert att.resolve_backend(torch.device("cpu")) == "sdpa"
    assert att.unavailable_reason("exact-x", "cpu") == "not here"
    att.set_backend("lossy8")
    with caplog.at_level(logging.INFO, logger="wan.attention"):
        assert att.resolve_backend(torch.device("cpu")) == "lossy8"
    rec = caplog.records[-1]
    assert rec.levelno == logging.WARNING and "LOSSY: test fp8" in rec.getMessage()
    att.unregister_backend("lossy8")
    assert att.get_backend() == "auto" and "lossy8" not in att.backend_names()


def test_registered_exact_backend_runs_through_attention(seed):
    seen = {}

    def mine(q, k, v, k_lens):
        seen["k_lens"] = k_lens
        return _ref(q, k, v, k_lens).float()

    att.register_backend("mine", mine)
    q, k, v = (torch.randn(2, 5, 2, 8) for _ in range(3))
    k_lens = torch.tensor([5, 2])
    o = att.attention(q, k, v, k_lens=k_lens, backend="mine")
    assert o.dtype == q.dtype and seen["k_lens"] is k_lens


def test_fp8_backend_on_cpu_is_registered_but_unavailable():
    from wan_triton import fp8_attention as f8

    f8.register()
    assert "fp8" in att.backend_names() and att.is_lossy("fp8")
    assert "fp8" not in att.available_backends("cpu")
    assert "CUDA" in att.unavailable_reason("fp8", "cpu")
    att.set_backend("fp8")
    with pytest.raises(RuntimeError, match="'fp8' is not available on cpu.*CUDA"):
        att.resolve_backend(torch.device("cpu"))


def test_patch_attention_fp8_registers_it():
    import wan_triton

    with wan_triton.patched(attention="fp8"):
        assert att.get_backend() == "fp8" and "fp8" in att.backend_names()
    assert att.get_backend() == "auto"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU-only message")
@pytest.mark.parametrize("tool", ["generate", "benchmark"])
def test_cli_attention_fp8_without_cuda_is_one_line(tool, tmp_path, capsys):
    from wan_triton import benchmark as benchmark_t2v
    from wan_triton import generate

    mod = generate if tool == "generate" else benchmark_t2v
    out = ["--save_file", str(tmp_path / "v.mp4")] if tool == "generate" else ["--out_dir", str(tmp_path / "o")]
    try:
        rc = mod.main(["--device", "cpu", "--attention", "fp8", "--quiet"] + out)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--attention fp8 is not available on cpu (available: sdpa, math): fp8 attention needs a CUDA GPU" in err[0]
    assert not list(tmp_path.iterdir())


# --- the flash paths' plumbing, against the math backend -------------------------------------------

@pytest.mark.parametrize("backend", ["fa4", "fa3", "fa2"])
@pytest.mark.parametrize("padded", [False, True])
def test_flash_paths_match_math(fake_flash, seed, backend, padded):
    B, Lq, Lk, H, D = 2, 7, 6, 2, 16
    q = torch.randn(B, Lq, H, D)
    k, v = torch.randn(B, Lk, H, D), torch.randn(B, Lk, H, D)
    k_lens = torch.tensor([Lk, 3]) if padded else None
    o = att.attention(q, k, v, k_lens=k_lens, backend=backend)
    ref = att.attention(q, k, v, k_lens=k_lens, backend="math")
    exact = _ref(*(t.bfloat16() for t in (q, k, v)), k_lens)
    assert o.shape == (B, Lq, H, D) and o.dtype == q.dtype
    torch.testing.assert_close(o.double(), exact, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o, ref, atol=3e-2, rtol=3e-2)
    call = fake_flash[-1]
    if not padded:
        assert call[0] == "dense"
    elif backend == "fa4":  # batched, seqused_k = k_lens, no gather
        assert call["q"] == (B, Lq, H, D) and call["seqused_k"].tolist() == [Lk, 3]
    else:  # packed: every query kept, keys cut per sample
        assert call["cu_q"].tolist() == [0, Lq, 2 * Lq] and call["cu_k"].tolist() == [0, Lk, Lk + 3]
        assert call["max_q"] == Lq and call["max_k"] == Lk and call["k"] == (Lk + 3, H, D)


def test_fa4_and_registered_backends_trace_without_graph_breaks(fake_flash, seed):
    """They run as torch custom ops: torch.compile keeps them as one node."""
    att.register_backend("mine", lambda q, k, v, k_lens: _ref(q, k, v, k_lens).float())
    q, k, v = (torch.randn(2, 6, 2, 8) for _ in range(3))
    k_lens = torch.tensor([6, 4])
    for name in ("fa4", "mine"):
        att._eager(name)  # made outside the traced region, as resolve_backend does

        def f(q, k, v, k_lens, name=name):
            return att.attention(q * 2, k, v, k_lens=k_lens, backend=name) + 1

        ex = torch._dynamo.explain(f)(q, k, v, k_lens)
        assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
        exact = _ref(*(t.bfloat16() for t in (q * 2, k, v)), k_lens) + 1
        torch.testing.assert_close(f(q, k, v, k_lens).double(), exact, atol=3e-2, rtol=3e-2)


def test_padded_keys_change_the_result(seed):
    """The math reference itself: masking keys is not a no-op (so the tests above can fail)."""
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    full = att.attention(q, k, v, backend="math")
    cut = att.attention(q, k, v, k_lens=torch.tensor([3]), backend="math")
    assert (full - cut).abs().max() > 1e-2
    torch.testing.assert_close(cut.double(), _ref(*(t.bfloat16() for t in (q, k, v)), torch.tensor([3])),
                               atol=2e-2, rtol=2e-2)


# --- the fp8 quantization kernel ------------------------------------------------------------------

def _quant_ref(x, subtract_mean):
    xd = x.double()
    m = xd.mean(1, keepdim=True) if subtract_mean else torch.zeros_like(xd[:, :1])
    a = (xd - m).abs().max()
    s = 448.0 / a if a > 0 else torch.tensor(1.0, dtype=torch.float64)
    return ((xd - m) * s).clamp(-448, 448), s, m[:, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("subtract_mean", [False, True])
@pytest.mark.parametrize("shape", [(1, 37, 3, 16), (2, 1100, 1, 32)], ids=["small", "multi-chunk"])
def test_quant_kernel_matches_float64(seed, dtype, subtract_mean, shape):
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

    offset = torch.randn(shape[2], shape[3]) * 4  # per-channel offsets, as k carries
    x = (torch.randn(shape) * 2 + offset).to(dtype).to(DEVICE)
    r = quantize_fp8(x, subtract_mean=subtract_mean, out_dtype=torch.float32)
    ref, s, m = _quant_ref(x.cpu(), subtract_mean)
    torch.testing.assert_close(r.scale.double().cpu(), s.reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(r.descale.double().cpu(), 1 / s.reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(r.mean.double().cpu(), m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.data.double().cpu(), ref, rtol=1e-5, atol=448 * 1e-6)
    assert r.data.abs().max().item() <= 448.0 and r.data.abs().max().item() > 447.9  # amax lands on 448
    if subtract_mean:  # the k range shrinks
        assert r.scale.item() > 448.0 / x.double().abs().max().item()


def test_quant_kernel_constant_input_has_unit_scale():
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

    x = torch.full((1, 5, 2, 8), 3.25, device=DEVICE)
    r = quantize_fp8(x, subtract_mean=True, out_dtype=torch.float32)
    assert r.scale.item() == 1.0 and r.data.abs().max().item() == 0.0


def test_mean_subtraction_is_exact_under_softmax(seed):
    q, k, v = (torch.randn(2, 9, 3, 8, dtype=torch.float64) for _ in range(3))
    k = k + torch.randn(2, 1, 3, 8, dtype=torch.float64) * 5
    torch.testing.assert_close(_ref(q, k - k.mean(1, keepdim=True), v), _ref(q, k, v), rtol=1e-12, atol=1e-12)


def test_quant_kernel_rejects_bad_input():
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8, quantize_fp8_supports

    assert not quantize_fp8_supports(torch.randn(3, 4, device=DEVICE))[0]
    assert not quantize_fp8_supports(torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE))[0]
    with pytest.raises(ValueError, match="quantize_fp8: x must be"):
        quantize_fp8(torch.randn(3, 4, device=DEVICE))


# --- GPU ----------------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_every_available_backend_vs_float64(seed, padded):
    from wan_triton import fp8_attention as f8

    f8.register()
    B, L, H, D = 2, 1024, 4, 128
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = k + torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16) * 2
    k_lens = torch.tensor([L, int(0.7 * L)], device="cuda") if padded else None
    exact = _ref(q, k, v, k_lens)
    avail = att.available_backends("cuda")
    print("available:", avail)
    for name in avail:
        o = att.attention(q, k, v, k_lens=k_lens, backend=name)
        err = _rel(o, exact)
        print(name, f"rel err {err:.2e}")
        assert o.shape == q.shape and o.dtype == q.dtype
        assert err < (FP8_TOL if att.is_lossy(name) else 1e-2), (name, err)


@pytest.mark.gpu
def test_gpu_quant_kernel_fp8_codes(seed):
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

    x = torch.randn(2, 3000, 4, 128, device="cuda", dtype=torch.bfloat16) * 3
    for sub in (False, True):
        r8 = quantize_fp8(x, subtract_mean=sub)
        r32 = quantize_fp8(x, subtract_mean=sub, out_dtype=torch.float32)
        assert torch.equal(r8.data.view(torch.uint8), r32.data.to(torch.float8_e4m3fn).view(torch.uint8))
        ref, s, _ = _quant_ref(x, sub)
        torch.testing.assert_close(r32.data.double(), ref, rtol=1e-5, atol=1e-3)


# --- the registry: priorities, opaque flag, CLI choices ---------------------------------------------

def test_priority_places_a_registered_backend_among_the_builtins():
    """auto and available_backends follow priority: 15 puts a backend between sdpa (20) and math
    (10), so auto still takes sdpa; 25 puts one before sdpa, and auto takes it."""
    att.register_backend("low", lambda q, k, v, k_lens: q, priority=15)
    assert att.available_backends("cpu") == ["sdpa", "low", "math"]
    assert att.resolve_backend(torch.device("cpu")) == "sdpa"
    att.register_backend("high", lambda q, k, v, k_lens: q, priority=25)
    assert att.available_backends("cpu") == ["high", "sdpa", "low", "math"]
    assert att.resolve_backend(torch.device("cpu")) == "high"
    assert [b.name for b in att.backends()][-4:] == ["high", "sdpa", "low", "math"]
    assert att.backend_names()[-2:] == ("low", "high")  # names: auto, built-ins, then registration order


def test_builtin_auto_order_is_the_priority_order():
    names = [b.name for b in att.backends()]
    assert names == ["fa4", "fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa", "math"]
    assert [b.name for b in att.backends() if b.opaque] == ["fa4"] and not any(b.lossy for b in att.backends())


def test_exact_only_listing_does_not_probe_lossy_backends():
    probed = []
    att.register_backend("lossy8", lambda q, k, v, k_lens: q, lossy=True,
                         available=lambda d: probed.append(d) or (True, ""))
    assert att.available_backends("cpu", lossy=False) == ["sdpa", "math"] and not probed
    assert att.available_backends("cpu")[0] == "lossy8" and probed


def test_transparent_registered_backend_is_no_custom_op(seed):
    att.register_backend("plain", lambda q, k, v, k_lens: _ref(q, k, v, k_lens).float(), opaque=False)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    o = att.attention(q, k, v, backend="plain")
    torch.testing.assert_close(o.double(), _ref(*(t.bfloat16() for t in (q, k, v))), atol=2e-2, rtol=2e-2)
    assert "plain" not in att._eager_fns
    att.set_backend("plain")
    att.resolve_backend(torch.device("cpu"))
    assert "plain" not in att._eager_fns
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        att.attention(q, k, v, backend="nope")


@pytest.mark.parametrize("tool", ["generate", "benchmark"])
def test_cli_attention_choices_come_from_the_registry(tool):
    from wan_triton import benchmark as benchmark_t2v
    from wan_triton import generate

    att.register_backend("mine", lambda q, k, v, k_lens: q)
    p = (generate if tool == "generate" else benchmark_t2v).build_parser()
    act = next(a for a in p._actions if a.dest == "attention")
    assert tuple(act.choices) == att.backend_names() and {"mine", "fp8"} <= set(act.choices)
    assert "auto: the first available of mine, fa4, fa3, fa2" in " ".join(act.help.split())
    assert "fp8: opt-in, LOSSY" in act.help
    assert p.parse_args(["--attention", "mine"]).attention == "mine"
