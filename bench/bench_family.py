"""The rest of the Wan 2.2 family on the GPU, random weights (docs/models.md).

Forward rows (default): one DiT forward per model at its official size, reference vs patched
(Triton kernels) vs patched + FlashAttention-4, in one process on the same bf16 weights and
inputs; each figure the median of --runs timed forwards after --warmup:

    ti2v-5B   1280x704, 121 frames: latent [48, 31, 44, 80], 27,280 tokens; text mode (one timestep)
              and image mode (the first frame's 880 tokens at t = 0: the per-token rows kernels)
    i2v-A14B  1280x720, 81 frames: one expert, 16 noise + 20 conditioning channels, 75,600 tokens

--video24: the 5B end to end at 1280x704x121 under a 24 GB cap (set before anything is built),
T5 on the CPU, the rtx4090 preset through wan_triton.optimize (the kernels; the model waits in CPU
memory during the decode), --steps denoising steps (seconds per step extrapolate to the official
50), text and image mode; peak GPU memory, the process's peak host RAM (VmHWM).

    python -m bench.bench_family --json bench/results/family_forward.json
    python -m bench.bench_family --video24 --steps 4 --json bench/results/family_video24.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

MODELS = {"ti2v-5B": (1280, 704, 121), "i2v-A14B": (1280, 720, 81)}


def _timed(fn, runs: int, warmup: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times, torch.cuda.max_memory_allocated() / 1e9


def _host_peak_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def _inputs(name: str, dev, gen):
    """(x, y or None, cases {label: t}, ctx, seq_len) at the model's official size."""
    from wan.configs import get_config
    from wan.tokens import TokenTimesteps

    cfg = get_config(name)
    w, h, f = MODELS[name]
    st, sh, sw = cfg.vae_stride
    lat = (cfg.vae.z_dim, (f - 1) // st + 1, h // sh, w // sw)
    seq_len = lat[1] * lat[2] * lat[3] // 4
    x = torch.randn(1, *lat, device=dev, generator=gen)
    ctx = torch.randn(1, min(60, cfg.dit.text_len), cfg.dit.text_dim, device=dev, generator=gen).bfloat16()
    t = torch.tensor([900], device=dev)
    if cfg.dit.model_type == "ti2v":
        first = lat[2] * lat[3] // 4
        return x, None, {"text": t, "image": TokenTimesteps.first_frame(t[0], first, seq_len)}, ctx, seq_len
    y = torch.randn(1, cfg.dit.in_dim - lat[0], *lat[1:], device=dev, generator=gen)
    return x, y, {"image": t}, ctx, seq_len


def forward_rows(args) -> list:
    import wan_triton
    from wan import attention as att
    from wan.configs import get_config
    from wan.dit import WanModel
    from wan_triton.metrics import rel_err

    dev = torch.device("cuda")
    rows = []
    for name in args.models.split(","):
        cfg = get_config(name).dit
        t0 = time.perf_counter()
        model = WanModel.from_config(cfg, device=dev, dtype=torch.bfloat16, seed=0, zero_head=False)
        print(f"[{name}] built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, bf16) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        gen = torch.Generator(device=dev).manual_seed(1)
        x, y, cases, ctx, seq_len = _inputs(name, dev, gen)
        for label, t in cases.items():
            def fwd(t=t):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(x, t, ctx, seq_len=seq_len, y=y)

            row = dict(model=name, mode=label, size="%d*%d" % MODELS[name][:2], frames=MODELS[name][2], tokens=seq_len)
            wan_triton.unpatch()
            att.set_backend(args.attention)
            row["attention"] = att.resolve_backend(dev)
            ref, row["reference_s"], _, row["reference_peak_gb"] = _timed(fwd, args.runs, args.warmup)
            for mode, backend in (("patched", args.attention), ("patched_fa4", "fa4")):
                try:
                    wan_triton.patch(attention=backend, strict=True)
                    wan_triton.reset_kernel_stats()
                    out, row[f"{mode}_s"], _, row[f"{mode}_peak_gb"] = _timed(fwd, args.runs, args.warmup)
                    row[f"{mode}_rel_err"] = rel_err(out, ref)
                    row[f"{mode}_launches"] = {op: s["launches"] for op, s in wan_triton.kernel_stats().items()
                                               if s["launches"]}
                except Exception as err:  # FA4 not installed here: say so, keep the other figures
                    row[f"{mode}_error"] = f"{type(err).__name__}: {err}"[:300]
                finally:
                    wan_triton.unpatch()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, x, y
        torch.cuda.empty_cache()
    print("\n| model | mode | tokens | reference s | patched s (x) | patched + FA4 s (x) | rel. err patched / FA4 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r["reference_s"]
        cell = {m: (f"{r[m + '_s']:.3f} ({ref / r[m + '_s']:.2f}x)" if m + "_s" in r else "n/a")
                for m in ("patched", "patched_fa4")}
        print(f"| {r['model']} {r['size']}x{r['frames']} | {r['mode']} | {r['tokens']} | {ref:.3f} | "
              f"{cell['patched']} | {cell['patched_fa4']} | {r.get('patched_rel_err', float('nan')):.1e} / "
              f"{r.get('patched_fa4_rel_err', float('nan')):.1e} |")
    return rows


def video24(args) -> list:
    from PIL import Image

    import wan_triton
    from wan.pipeline_ti2v import WanTI2V

    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * 1e9 / total))
    t0 = time.perf_counter()
    pipe = WanTI2V.from_config("ti2v-5B", device=dev, t5_cpu=True)
    build_s = time.perf_counter() - t0
    applied = wan_triton.optimize(pipe, "rtx4090")
    img = Image.fromarray((np.random.default_rng(0).random((1080, 1920, 3)) * 255).astype(np.uint8))
    rows = []
    for label, image in (("text", None), ("image", img)):
        torch.cuda.reset_peak_memory_stats()
        try:
            video = pipe.generate("two cats boxing on a stage", image=image, size="1280*704", frame_num=121,
                                  sampling_steps=args.steps, seed=1, progress=False)  # pipe.offload: applied
            tm = pipe.last_timings
            step = statistics.median(tm.steps)
            row = dict(mode=label, cap_gb=args.cap, video=list(video.shape), steps=len(tm.steps), step_s=step,
                       text_s=tm.text_encode, image_s=tm.image_encode, decode_s=tm.decode,
                       total_50_steps_s=tm.text_encode + tm.image_encode + 50 * step + tm.offload + tm.decode,
                       peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9,
                       reserved_gpu_gb=torch.cuda.max_memory_reserved() / 1e9)
        except torch.cuda.OutOfMemoryError as err:
            row = dict(mode=label, cap_gb=args.cap, oom=str(err).splitlines()[0][:300])
        row.update(host_peak_gb=_host_peak_gb(), build_s=build_s, applied=applied.summary())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ti2v-5B,i2v-A14B")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention", default="auto", help="backend of the reference and patched modes")
    ap.add_argument("--video24", action="store_true", help="the 5B end to end under --cap GB instead")
    ap.add_argument("--cap", type=float, default=24.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_family: error: needs a CUDA GPU (it times device kernels)", file=sys.stderr)
        return 2
    rows = video24(args) if args.video24 else forward_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
