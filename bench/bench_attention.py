"""Attention backends at the Wan 2.2 720p shape, one process, the same q/k/v for every backend.

    python -m bench.bench_attention --out bench/out/bench_attention.json          # 720p, ~1-2 min
    python -m bench.bench_attention --seq 32760                                   # 480p

Parts:
  speed    B=1, L=--seq (75,600 = 1280x720x81 latents / 2x2 patches), H=40, D=128, bf16. For every
           available backend except sdpa/math (sdpa-cudnn, sdpa-flash, fa4, fa3, fa2 where installed)
           and fp8 with and without the k mean (and each --p_scales): median time of --runs calls
           after --warmup (CUDA events), TFLOP/s = 4 L^2 H D / time, and rel err
           ||o - ref|| / ||ref|| on --rows random query rows against every key, the reference in
           float64 from the same bf16 inputs.
  padded   B=2, L=--pad_seq, H=8, D=128, k_lens = (L, 0.7 L): every backend's rel err vs a float64
           reference with keys >= k_lens[b] masked (all queries kept), and vs its own unpadded
           call on the truncated keys of entry 1 (the official semantics).
  quant    the fp8 quantization kernel alone (kernels.attn_quant_fp8, no mean / with mean) on one
           [1, L, 40, 128] bf16 tensor: time vs its floor (5 bytes per element / 4.18 TB/s).

Inputs: q, v ~ N(0, 1); k ~ N(0, 1) + a per-channel offset of scale --k_offset (k of a DiT carries
such offsets; the k mean of the fp8 path removes them); q is multiplied by --q_gain (peakier
softmax). Prints a table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

PEAK_HBM = 4.18e12  # H200 HBM3e bytes/s
SKIP = ("sdpa", "math")


def _time(fn, runs, warmup):
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return out, statistics.median(times), times


def _ref_rows(q, k, v, rows, k_lens=None, heads_per_chunk=4):
    """float64 softmax(q[:, rows] k^T / sqrt(D)) v, [B, len(rows), H, D]."""
    B, L, H, D = q.shape
    out = torch.empty(B, len(rows), H, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = L if k_lens is None else int(k_lens[b])
        for h0 in range(0, H, heads_per_chunk):
            hs = slice(h0, h0 + heads_per_chunk)
            qq = q[b, rows, hs].double().transpose(0, 1)        # [h, r, D]
            kk = k[b, :n, hs].double().transpose(0, 1)          # [h, n, D]
            vv = v[b, :n, hs].double().transpose(0, 1)
            p = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(D), dim=-1)
            out[b, :, hs] = (p @ vv).transpose(0, 1)
            del p
    return out


def _rel(o, ref):
    return ((o.double() - ref).norm() / ref.norm()).item()


def _inputs(B, L, H, D, args, gen):
    q = torch.randn(B, L, H, D, device="cuda", generator=gen).mul_(args.q_gain).bfloat16()
    k = (torch.randn(B, L, H, D, device="cuda", generator=gen)
         + args.k_offset * torch.randn(1, 1, H, D, device="cuda", generator=gen)).bfloat16()
    v = torch.randn(B, L, H, D, device="cuda", generator=gen).bfloat16()
    return q, k, v


def _variants(att, f8, args):
    """(label, callable(q, k, v, k_lens), lossy) for every backend to measure."""
    out = []
    for name in att.available_backends("cuda"):
        if name in SKIP or name == f8.NAME:
            continue
        out.append((name, lambda q, k, v, kl, n=name: att.attention(q, k, v, k_lens=kl, backend=n), False))
    if f8.NAME in att.available_backends("cuda"):
        for ps in args.p_scales:
            for mean in (True, False):
                s = f8.Settings(subtract_k_mean=mean, p_scale=ps)
                label = f"fp8{'' if mean else '-nomean'}{'' if ps == f8.P_SCALE else f'-p{ps:g}'}"
                out.append((label, lambda q, k, v, kl, s=s: f8.attention_fp8(q, k, v, kl, settings_=s), True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=75600, help="tokens (75600: 720p x 81 frames; 32760: 480p)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2048, help="query rows checked against the float64 reference")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pad_seq", type=int, default=8192)
    ap.add_argument("--k_offset", type=float, default=1.0)
    ap.add_argument("--q_gain", type=float, default=1.0)
    ap.add_argument("--p_scales", type=lambda s: [float(x) for x in s.split(",")], default=[448.0],
                    help="fp8: scale of P inside cuDNN, comma-separated (e.g. 64,256,448)")
    ap.add_argument("--parts", default="speed,padded,quant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/bench_attention.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    logging_setup()
    from wan import attention as att
    from wan_triton import fp8_attention as f8

    f8.register()
    parts = set(args.parts.split(","))
    dev = torch.cuda.get_device_name()
    res = dict(device=dev, torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
               available=att.available_backends("cuda"),
               unavailable={b: att.unavailable_reason(b, "cuda") for b in att.backend_names()
                            if b != "auto" and att.unavailable_reason(b, "cuda")},
               args=vars(args), speed=[], padded=[], quant=[])
    print(f"{dev}  torch {torch.__version__}  cuDNN {res['cudnn']}  available: {', '.join(res['available'])}")
    for b, why in res["unavailable"].items():
        print(f"  not available: {b}: {why}")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    variants = _variants(att, f8, args)
    t_start = time.perf_counter()

    if "speed" in parts:
        B, L, H, D = 1, args.seq, args.heads, args.head_dim
        q, k, v = _inputs(B, L, H, D, args, gen)
        rows = torch.randperm(L, device="cuda", generator=gen)[:args.rows].sort().values
        ref = _ref_rows(q, k, v, rows)
        flops = 4 * B * L * L * H * D
        for label, fn, lossy in variants:
            try:
                o, t, times = _time(lambda: fn(q, k, v, None), args.runs, args.warmup)
                err = _rel(o[:, rows], ref)
                rec = dict(backend=label, lossy=lossy, ms=t * 1e3, tflops=flops / t / 1e12, rel_err=err,
                           times_ms=[x * 1e3 for x in times])
                del o
            except Exception as e:  # noqa: BLE001 - record and go on with the next backend
                rec = dict(backend=label, lossy=lossy, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            res["speed"].append(rec)
            print(_row(rec), flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()

    if "padded" in parts:
        B, L, H, D = 2, args.pad_seq, 8, args.head_dim
        q, k, v = _inputs(B, L, H, D, args, gen)
        k_lens = torch.tensor([L, int(0.7 * L)], device="cuda")
        rows = torch.arange(0, L, max(1, L // 1024), device="cuda")
        ref = _ref_rows(q, k, v, rows, k_lens)
        for label, fn, lossy in variants:
            try:
                o = fn(q, k, v, k_lens)
                n = int(k_lens[1])
                own = fn(q[1:], k[1:, :n].contiguous(), v[1:, :n].contiguous(), None)
                rec = dict(backend=label, lossy=lossy, rel_err=_rel(o[:, rows], ref),
                           rel_err_vs_truncated=_rel(o[1:], own.double()))
            except Exception as e:  # noqa: BLE001
                rec = dict(backend=label, lossy=lossy, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            res["padded"].append(rec)
            print("padded", _row(rec), flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()

    if "quant" in parts:
        try:
            from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

            x = _inputs(1, args.seq, args.heads, args.head_dim, args, gen)[1]
            floor = x.numel() * 5 / PEAK_HBM
            for mean in (False, True):
                _, t, _ = _time(lambda: quantize_fp8(x, subtract_mean=mean), args.runs + 5, args.warmup)
                rec = dict(subtract_mean=mean, ms=t * 1e3, floor_ms=floor * 1e3, of_floor=floor / t)
                res["quant"].append(rec)
                print(f"quant  mean={mean!s:5}  {t * 1e3:7.3f} ms  floor {floor * 1e3:.3f} ms  "
                      f"({floor / t:.0%} of HBM peak)", flush=True)
        except Exception as e:  # noqa: BLE001
            res["quant"].append(dict(error=f"{type(e).__name__}: {e}"))
            print("quant error:", e)

    res["wall_s"] = time.perf_counter() - t_start
    _table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


def logging_setup():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def _row(r):
    if "error" in r:
        return f"{r['backend']:<16} ERROR {r['error']}"
    s = f"{r['backend']:<16}"
    if "tflops" in r:
        s += f" {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s"
    s += f"  rel err {r['rel_err']:.2e}"
    if "rel_err_vs_truncated" in r:
        s += f"  vs truncated {r['rel_err_vs_truncated']:.2e}"
    return s + ("  (lossy)" if r.get("lossy") else "")


def _table(res):
    print()
    print(f"attention, B=1 L={res['args']['seq']} H={res['args']['heads']} D={res['args']['head_dim']} bf16 "
          f"on {res['device']}")
    print(f"{'backend':<16} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9} {'padded err':>11}")
    pad = {r["backend"]: r for r in res["padded"]}
    for r in res["speed"] or res["padded"]:
        p = pad.get(r["backend"], {})
        pe = f"{p['rel_err']:.2e}" if "rel_err" in p else p.get("error", "-")[:11]
        if "error" in r:
            print(f"{r['backend']:<16} error: {r['error'][:80]}")
            continue
        ms = f"{r['ms']:9.2f}" if "ms" in r else f"{'-':>9}"
        tf = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'-':>8}"
        print(f"{r['backend']:<16} {ms} {tf} {r['rel_err']:9.2e} {pe:>11}")
    for q in res["quant"]:
        if "ms" in q:
            print(f"fp8 quant kernel (mean={q['subtract_mean']}): {q['ms']:.3f} ms, floor {q['floor_ms']:.3f} ms")
    print(f"wall {res['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
