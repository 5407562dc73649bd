"""VAE decode at full size with random weights: seconds and peak GPU memory.

    python -m bench.bench_vae --size 1280*720 --frame_num 81 --dtypes float32,bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from wan.configs import VAEConfig
    from wan.vae import WanVAE

    w, h = (int(v) for v in args.size.split("*"))
    z = torch.randn(1, 16, (args.frame_num - 1) // 4 + 1, h // 8, w // 8, device="cuda")
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        vae = WanVAE.from_config(VAEConfig(), device="cuda", dtype=dtype, seed=0)
        vae.decode(z[:, :, :2])  # warm-up (cuDNN plans)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = vae.decode(z)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = dict(dtype=name, size=args.size, frames=out.shape[2], seconds=statistics.median(times), runs=times,
                   peak_gb=torch.cuda.max_memory_allocated() / 1e9, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        print(row, flush=True)
        rows.append(row)
        del vae, out
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
