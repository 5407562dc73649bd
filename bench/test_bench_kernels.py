"""Microbenchmarks of the Triton kernels at the real 720p shapes (pytest-benchmark).

One group per kernel; in each: the Triton kernel, the torch eager reference (the wan function)
and torch.compile of that reference. `extra_info` records the bytes that must move (each input
read once, the output written once), the achieved GB/s from the median time of
`triton.testing.do_bench`, and the percentage of 4.18 TB/s (the floor table: bench/KERNEL_FLOORS.md).

    python -m pytest bench/test_bench_kernels.py --benchmark-group-by=group --benchmark-columns=median,ops

Without CUDA, triton or pytest-benchmark every test is collected and skipped with the reason
(exit code 0, reason shown with `-rs`), also under `--benchmark-only`.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from wan_triton import kernels
import wan.dit as wd
import wan.pipeline as wp


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "kernel microbenchmarks need CUDA"
    for mod, pkg in (("triton", "triton"), ("pytest_benchmark", "pytest-benchmark")):
        if importlib.util.find_spec(mod) is None:
            return f"kernel microbenchmarks need {pkg} (pip install {pkg})"
    return None


# a mark on each test, not a module-level skip: pytest then exits 0 ("N skipped"), not 5 ("no tests")
pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

PEAK_BYTES_PER_S = 4.18e12           # the bandwidth floor used in KERNEL_FLOORS.md
L = 21 * 45 * 80                     # 720p: 81 frames -> 21 latent frames, 90x160 latent / 2x2 patches
C, HEADS, HD = 5120, 40, 128
EPS = 1e-6
IMPLS = ["triton", "eager", "compile"]

_inputs: dict = {}


def _freqs():
    return wd.rope_freqs(HD).cuda()


def _get(name):
    """Inputs per kernel, built once per session (the model's dtypes at each call site)."""
    if name in _inputs:
        return _inputs[name]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    grid = torch.tensor([[21, 45, 80]])
    if name == "rms_norm":            # cross-attn q norm: bf16 Linear output, fp32 weight -> fp32
        args = (rnd(1, L, C, dtype=torch.bfloat16), 1 + rnd(C, scale=0.1), EPS)
    elif name == "rms_norm_rope":     # self-attn q/k: bf16 in, fp32 weight, bf16 out (mm dtype)
        args = (rnd(1, L, C, dtype=torch.bfloat16), 1 + rnd(C, scale=0.1), EPS, HEADS, grid, _freqs(),
                torch.bfloat16)
    elif name == "rope_apply":        # standalone RoPE on fp32 q [1, L, 40, 128]
        args = (rnd(1, L, HEADS, HD), grid, _freqs())
    elif name == "modulate":          # fp32 residual stream, [B,1,C] views of m, bf16 out
        m = rnd(1, 6, C, scale=0.1)
        args = (rnd(1, L, C), m[:, 0:1], m[:, 1:2], EPS, torch.bfloat16)
    elif name == "layer_norm":        # norm3: fp32 residual stream, fp32 weight and bias, bf16 out (q Linear)
        args = (rnd(1, L, C), 1 + rnd(C, scale=0.1), rnd(C, scale=0.1), EPS, torch.bfloat16)
    elif name == "gated_residual":    # fp32 x, bf16 branch output, fp32 gate view
        m = rnd(1, 6, C, scale=0.1)
        args = (rnd(1, L, C), rnd(1, L, C, dtype=torch.bfloat16), m[:, 2:3])
    elif name == "cfg_combine":       # latent [1, 16, 21, 90, 160] fp32
        args = (rnd(1, 16, 21, 90, 160), rnd(1, 16, 21, 90, 160), 5.0)
    else:
        raise KeyError(name)
    _inputs[name] = args
    return args


def _bytes(name, args) -> int:
    """Bytes that must move: each tensor input read once, the output written once."""
    if name == "rms_norm":
        x, w, _ = args
        return x.numel() * (x.element_size() + 4) + w.numel() * w.element_size()
    if name == "rms_norm_rope":
        x, w = args[0], args[1]
        return x.numel() * (x.element_size() + 2) + w.numel() * w.element_size()
    if name == "rope_apply":
        x = args[0]
        return x.numel() * (x.element_size() + 4)
    if name == "modulate":
        x, sh, sc = args[:3]
        return x.numel() * (x.element_size() + 2) + 2 * sh.shape[-1] * 4
    if name == "layer_norm":
        x = args[0]
        return x.numel() * (x.element_size() + 2) + 2 * x.shape[-1] * 4
    if name == "gated_residual":
        x, y, gate = args
        return x.numel() * (x.element_size() + y.element_size() + 4) + gate.shape[-1] * 4
    if name == "cfg_combine":
        u = args[0]
        return u.numel() * 12
    raise KeyError(name)


_REF = {
    "rms_norm": wd.rms_norm, "rms_norm_rope": wd.rms_norm_rope, "rope_apply": wd.rope_apply,
    "modulate": wd.modulate, "layer_norm": wd.layer_norm, "gated_residual": wd.gated_residual,
    "cfg_combine": wp.cfg_combine,
}
_compiled: dict = {}


def _impl(name, impl):
    if impl == "triton":
        return getattr(kernels, name)
    ref = _REF[name]
    if impl == "eager":
        return ref
    if name not in _compiled:
        _compiled[name] = torch.compile(ref, dynamic=False)
    return _compiled[name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(_REF))
def test_bench_kernel(benchmark, name, impl):
    from triton.testing import do_bench

    benchmark.group = name
    args = _get(name)
    fn = _impl(name, impl)
    try:
        fn(*args)                    # compile / JIT outside the timing
        torch.cuda.synchronize()
    except Exception as e:           # e.g. inductor refusing the complex128 reference
        pytest.skip(f"{impl} {name} failed to run: {type(e).__name__}: {e}")

    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
    ms = do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")
    nbytes = _bytes(name, args)
    gbps = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info.update({
        "bytes": nbytes, "do_bench_median_ms": ms, "GB/s": round(gbps, 1),
        "pct_of_4.18TB/s": round(100 * gbps * 1e9 / PEAK_BYTES_PER_S, 1),
        "floor_ms": nbytes / PEAK_BYTES_PER_S * 1e3,
    })
    print(f"\n{name:15s} {impl:8s} {ms * 1e3:9.1f} us  {gbps:7.0f} GB/s  "
          f"{100 * gbps * 1e9 / PEAK_BYTES_PER_S:5.1f}% of 4.18 TB/s")
