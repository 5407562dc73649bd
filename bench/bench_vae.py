"""VAE decode at full size with random weights, variants side by side in one process: seconds
(median of --runs after a warm-up), peak GPU memory, and the decoded frames' PSNR against the
fp32 decode of the same latents (the official precision).

    python -m bench.bench_vae --size 1280*720 --frame_num 81 --out bench/out/vae_720p.json   # ~2 min, H100/H200
    python -m bench.bench_vae --smoke                                # the flow, CPU: the tiny preset's VAE, 64x64

Variants (`--variants`, comma-separated): fp32 (official: fp32 weights and activations, cuDNN
with PyTorch's default TF32 for convolutions), bf16 (the VAE in bf16: lossy), fp32-cl and bf16-cl
(the same with the 3-D convolutions channels-last, `WanVAE.use_channels_last`); a `-k` suffix
(fp32-k, bf16-k, bf16-cl-k) decodes with the fused RMSNorm + SiLU kernel (`wan_triton.patched`,
the `rms_norm` flag only: wan.vae.rms_norm_silu); a `-b` suffix (fp32-b, bf16-b, bf16-k-b) with
`torch.backends.cudnn.benchmark` on (cuDNN times its algorithms for each convolution shape in the
warm-up and keeps the fastest; off elsewhere, PyTorch's default). PSNR: frames in
[-1, 1] mapped to [0, 1], 10 log10(1 / MSE) over every pixel of every frame, against fp32's
frames; also the largest absolute difference. The warm-up decodes 2 latent frames at the full
size (cuDNN plans for every shape the chunked decode meets), outside the timed runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import torch

# name -> (dtype, channels-last convolutions, the fused norm + SiLU kernel patched in, cuDNN autotuning)
VARIANTS = {"fp32": (torch.float32, False, False, False), "bf16": (torch.bfloat16, False, False, False),
            "fp32-cl": (torch.float32, True, False, False), "bf16-cl": (torch.bfloat16, True, False, False),
            "fp32-k": (torch.float32, False, True, False), "bf16-k": (torch.bfloat16, False, True, False),
            "bf16-cl-k": (torch.bfloat16, True, True, False), "fp32-b": (torch.float32, False, False, True),
            "bf16-b": (torch.bfloat16, False, False, True), "bf16-k-b": (torch.bfloat16, False, True, True)}


def _kernels(on: bool):
    """The VAE's norm + SiLU kernel patched in for the block (the other ops untouched), or nothing."""
    if not on:
        return contextlib.nullcontext()
    import wan_triton

    return wan_triton.patched(rms_norm=True, rope=False, modulation=False, residual=False, cfg=False, strict=True)


def psnr(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB of frames a vs ref, both in [-1, 1], over [0, 1]; max |a - ref|), frame by frame."""
    se, n, top = 0.0, 0, 0.0
    for i in range(ref.shape[2]):
        d = (a[:, :, i].double() - ref[:, :, i].double()) / 2.0
        se += float((d * d).sum())
        n += d.numel()
        top = max(top, float(d.abs().max()) * 2.0)
    mse = se / n
    return (math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)), top


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_vae", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--variants", default="fp32,bf16,fp32-cl,bf16-cl,fp32-k,bf16-k,bf16-cl-k",
                    help=f"comma-separated, from {', '.join(VARIANTS)} (fp32 always runs: the reference); -cl: "
                         f"channels-last convolutions, -k: the fused RMSNorm + SiLU kernel, -b: cuDNN autotuning "
                         f"(default: all but the -b ones)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="the tiny preset's VAE at 64x64 on the CPU (bf16 convolutions "
                                                        "are slow on a CPU: the full VAE takes minutes there)")
    ap.add_argument("--out", "--json", dest="out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    from wan.configs import VAEConfig, get_config
    from wan.vae import WanVAE

    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or "fp32" not in names:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}, fp32 included (the reference); got {args.variants}")
    cuda = torch.cuda.is_available() and not args.smoke
    dev = "cuda" if cuda else "cpu"
    w, h = (64, 64) if args.smoke else (int(v) for v in args.size.split("*"))
    frames = 5 if args.smoke else args.frame_num
    runs = 1 if args.smoke else args.runs
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(0))
    rows, ref = [], None
    for name in ["fp32"] + [v for v in names if v != "fp32"]:
        dtype, cl, kernel, autotune = VARIANTS[name]
        torch.backends.cudnn.benchmark = autotune  # the warm-up decode tunes every chunk shape
        vae = WanVAE.from_config(get_config("tiny").vae if args.smoke else VAEConfig(), device=dev, dtype=dtype, seed=0)
        if cl:
            vae.use_channels_last()
        with torch.no_grad(), _kernels(kernel):
            vae.decode(z[:, :, :2])  # warm-up: cuDNN plans for the chunk shapes, outside the timing
            _sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                out = vae.decode(z)
                _sync(cuda)
                times.append(time.perf_counter() - t0)
        row = dict(variant=name, dtype=str(dtype).replace("torch.", ""), channels_last=cl, kernel=kernel, size=f"{w}*{h}",
                   frames=out.shape[2], seconds=statistics.median(times), runs=times,
                   peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=autotune)
        torch.backends.cudnn.benchmark = False
        if ref is None:
            ref = out
            row.update(psnr_db=math.inf, max_abs=0.0)
        else:
            row["psnr_db"], row["max_abs"] = psnr(out, ref)
            row["speedup"] = rows[0]["seconds"] / row["seconds"]
        print(row, flush=True)
        rows.append(row)
        del vae
        if out is not ref:
            del out
        if cuda:
            torch.cuda.empty_cache()
    print(f"\n| VAE decode {w}x{h}x{frames} | seconds | x fp32 | peak GB | PSNR vs fp32 | max abs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.3f} | {r.get('speedup', 1.0):.2f} | {r['peak_gb']:.1f} | "
              f"{r['psnr_db']:.1f} dB | {r['max_abs']:.2e} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
