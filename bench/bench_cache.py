"""The step cache's time per video at the A14B shape: seconds, not quality (random weights).

    python -m bench.bench_cache --size 1280*720 --frame_num 81 --runs 3 --warmup 1 \\
        --sweep bench/out/cache_sweep.json --json bench/out/cache_time_h100.json

One A14B expert (random bf16 weights, Triton kernels unless --no-triton), one process, the same
inputs; median of --runs after --warmup, device-synchronised:

    full      a forward that runs all 40 blocks (what every step costs without the cache)
    reused    a forward on a reused step: embeddings, the stored residual added, head
              (wan.step_cache.CacheRun with a residual stored by one full forward)
    decision  the `easy` criterion's per-step work (two norms of latent-sized tensors, one sync)

Per 40-step video with CFG (80 forwards; both experts cost the same per forward) the denoising
time is extrapolated as 80 x (c x full + (1 - c) x reused), c = the share of block calls a
setting keeps; every saved forward is charged `reused` (an unconditional forward the CFG-branch
cache does not make costs less, so this is an upper bound). c comes from the quality gate's
sweep (--sweep <cache_sweep>.json, the demo model at 40 steps: the trained toy's skip pattern,
not measured on A14B), else a few fixed shares. Text encoding and the VAE decode are not in it
(unchanged by the cache; bench/RESULTS.md section 5a has them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import wan_triton
from wan.configs import get_config
from wan.step_cache import CachePolicy, CacheRun

from ._expert import build_expert, expert_inputs

SHARES = (0.67, 0.5, 0.4, 0.33)  # block calls kept, without a sweep


def _timed(fn, runs: int, warmup: int, device) -> tuple[float, list]:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def shares_of(sweep_path: str | None) -> list[tuple[str, float]]:
    """(setting, share of block calls kept) from a cache_sweep JSON, or the fixed SHARES."""
    if sweep_path is None:
        return [(f"{c:.0%} of the block calls", c) for c in SHARES]
    d = json.loads(open(sweep_path, encoding="utf-8").read())
    return [(r["mode"], 1.0 - r["forwards_saved"]) for r in d["rows"]
            if r["lossy"] and not r["skipped"] and r["forwards_saved"] == r["forwards_saved"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="t2v-A14B", help="the expert's shape (default: t2v-A14B)")
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--steps", type=int, default=40, help="steps of the video the figures extrapolate to")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick smoke run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-triton", dest="triton", action="store_false", help="reference ops, no kernels")
    ap.add_argument("--sweep", default=None, help="bench/cache_sweep.py's JSON: the shares of block calls to use")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_cache: error: --device cuda, and no CUDA GPU is available (--device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    config = get_config(args.task)
    if args.triton:
        wan_triton.patch(strict=True)
    t0 = time.perf_counter()
    model = build_expert(dev, args.layers, config=config)
    w, h = (int(v) for v in args.size.split("*"))
    g = torch.Generator(device=dev).manual_seed(1)
    x, ctx, _, t, seq_len = expert_inputs(w, h, args.frame_num, dev, g, config=config)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{config.name} expert ({model.config.num_layers} blocks, bf16, kernels {'on' if args.triton else 'off'}) "
          f"built in {time.perf_counter() - t0:.1f} s on {gpu}; {args.size} x {args.frame_num}: {seq_len} tokens",
          flush=True)

    def fwd():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            return model(x, t, ctx, seq_len=seq_len)

    full, full_runs = _timed(fwd, args.runs, args.warmup, dev)
    print(f"full forward {full:.3f} s ({', '.join(f'{s:.3f}' for s in full_runs)})", flush=True)
    run = CacheRun(CachePolicy("easy"), model.config.num_layers, count=1, models=(model,))
    try:
        with run.branches(("cond",)):
            fwd()  # stores the residual
            run.reuse_blocks = True
            reused, reused_runs = _timed(fwd, max(args.runs, 5), args.warmup, dev)
    finally:
        stats = run.finish()
    assert stats.reused >= 5, stats  # the timed forwards did skip their blocks
    lat = x[0].float()
    prev = lat + 0.01

    def decision():
        return torch.linalg.vector_norm(lat - prev).item() / max(torch.linalg.vector_norm(lat).item(), 1e-12)

    decide, _ = _timed(decision, 10, 2, dev)
    print(f"reused forward {reused:.4f} s ({', '.join(f'{s:.4f}' for s in reused_runs)}); easy's decision "
          f"{decide * 1e3:.2f} ms per step", flush=True)

    n = 2 * args.steps  # CFG: two forwards per step
    exact = n * full
    rows = []
    print(f"\nDenoising time per {args.size} x {args.frame_num}, {args.steps}-step video with CFG ({n} forwards; "
          f"extrapolated from the per-forward times above; text encode and decode not included)\n")
    print("| setting | block calls kept | denoise s | saved s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| exact | 100% | {exact:.0f} | 0 | 1.00x |")
    for name, c in shares_of(args.sweep):
        cached = n * (c * full + (1 - c) * reused) + args.steps * decide
        rows.append(dict(setting=name, kept=c, denoise_s=cached, saved_s=exact - cached, speedup=exact / cached))
        print(f"| {name} | {c:.0%} | {cached:.0f} | {exact - cached:.0f} | {exact / cached:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, torch=torch.__version__, task=config.name, size=args.size,
                           frame_num=args.frame_num, tokens=seq_len, steps=args.steps, kernels=args.triton,
                           full_s=full, full_runs=full_runs, reused_s=reused, reused_runs=reused_runs,
                           decision_s=decide, exact_denoise_s=exact, settings=rows, sweep=args.sweep), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
