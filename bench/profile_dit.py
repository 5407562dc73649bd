"""Where one DiT expert forward spends its GPU time: torch.profiler over one forward at full
A14B size (random bf16 weights), device kernel time summed per category and per kernel.

    python -m bench.profile_dit --size 1280*720 --modes reference,patched --json prof.json

Categories come from kernel names (`categorize`): attention (cuDNN / flash SDPA), matmul
(cuBLAS / CUTLASS GEMMs), wan_triton (this project's kernels), other (PyTorch's element-wise,
reduction, copy and normalisation kernels). "idle" is the forward's wall time minus the summed
kernel time: launch gaps and host work that the GPU waited for.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

CATEGORIES = ("attention", "matmul", "wan_triton", "other")
_ATTENTION = re.compile(r"sdpa|fmha|flash|attention|attn|fprop", re.I)
_MATMUL = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|matmul|wgmma", re.I)
_OURS = re.compile(r"^_(rms_norm|rope|modulate|gated_residual|residual|cfg|quant|gelu_quant)\w*_kernel")


def categorize(kernel_name: str) -> str:
    """The category of one GPU kernel, from its name (attention is tested first: cuDNN's SDPA
    kernels carry GEMM-like words too)."""
    if _OURS.match(kernel_name):
        return "wan_triton"
    if _ATTENTION.search(kernel_name):
        return "attention"
    if _MATMUL.search(kernel_name):
        return "matmul"
    return "other"


def _device_time_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_table(prof) -> list[dict]:
    """[{name, category, ms, calls}] for every GPU kernel of the profile, largest first."""
    rows = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        ms = _device_time_us(evt) / 1e3
        if ms > 0:
            rows.append(dict(name=evt.key, category=categorize(evt.key), ms=ms, calls=evt.count))
    return sorted(rows, key=lambda r: -r["ms"])


def summarize(rows: list[dict], wall_ms: float) -> dict:
    per = {c: dict(ms=0.0, calls=0) for c in CATEGORIES}
    for r in rows:
        per[r["category"]]["ms"] += r["ms"]
        per[r["category"]]["calls"] += r["calls"]
    busy = sum(v["ms"] for v in per.values())
    per["idle"] = dict(ms=max(0.0, wall_ms - busy), calls=0)
    return dict(wall_ms=wall_ms, busy_ms=busy, categories=per)


def _profile_one(fwd) -> tuple[list[dict], float]:
    from torch.profiler import ProfilerActivity, profile

    fwd()  # warm-up: kernels compiled, cuDNN plans built, allocator warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fwd()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    return kernel_table(prof), wall_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="profile_dit", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--modes", default="reference,patched")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per mode")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in ("reference", "patched", "fp8") for m in modes):
        print(f"profile_dit: error: --modes takes reference and/or patched (and fp8), got {args.modes!r}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("profile_dit: error: needs a CUDA GPU (it profiles device kernels)", file=sys.stderr)
        return 2

    import wan_triton
    from wan.configs import parse_size

    from ._expert import build_expert, expert_inputs

    w, h = parse_size(args.size)
    dev = torch.device("cuda")
    model = build_expert(dev, args.layers)
    x, ctx, _, t, L = expert_inputs(w, h, args.frame_num, dev, torch.Generator(device=dev).manual_seed(1))

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, t, ctx, seq_len=L)

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, size=args.size,
                  frame_num=args.frame_num, tokens=L, layers=len(model.blocks), modes={})
    for mode in sorted(modes, key=lambda m: m == "fp8"):  # fp8 last: it replaces the block weights in place
        wan_triton.unpatch()
        if mode == "fp8":  # patched + the blocks' linears in e4m3 (wan_triton.fp8)
            from wan_triton.fp8 import quantize_model
            quantize_model(model, progress=False)
        if mode in ("patched", "fp8"):
            wan_triton.patch(strict=True)
        rows, wall_ms = _profile_one(fwd)
        report["modes"][mode] = dict(summarize(rows, wall_ms), kernels=rows)
    wan_triton.unpatch()

    for mode, r in report["modes"].items():
        print(f"\n## {mode}: {args.size} x {args.frame_num}f, {L} tokens, {report['layers']} layers, "
              f"wall {r['wall_ms']:.1f} ms, kernels {r['busy_ms']:.1f} ms")
        print("| category | ms | % of wall | kernel calls |\n|---|---|---|---|")
        for c, v in r["categories"].items():
            print(f"| {c} | {v['ms']:.1f} | {100 * v['ms'] / r['wall_ms']:.1f} | {v['calls']} |")
        print(f"\n| top kernels ({mode}) | category | ms | calls |\n|---|---|---|---|")
        for k in r["kernels"][:args.top]:
            print(f"| `{k['name'][:90]}` | {k['category']} | {k['ms']:.1f} | {k['calls']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
