"""fp8 linears on one A14B expert (random bf16 weights): matrix-product time alone, patched
forward bf16 vs fp8, error, weight bytes, peak memory and quantize time, in one process on the
same weights and inputs (docs/fp8.md).

    python -m bench.bench_fp8 --out bench/out/fp8_720p.json                 # 1280*720*81, ~3 min on an H200
    python -m bench.bench_fp8 --size 832*480 --out bench/out/fp8_480p.json

(a) the 10 block linears at the real shapes (M = video tokens, text_len for cross-attention k/v):
    bf16 F.linear vs fp8 torch._scaled_mm (pre-quantized input) vs fp8 including the activation
    quantization kernel; median ms and TFLOP/s each, and the sum over the 40 blocks.
(b) the patched forward (Triton kernels) in bf16, then the same expert quantized in place:
    median s of --runs after --warmup; rel. error of the fp8 forward vs the bf16 forward and, with
    --reference, of both vs the unpatched reference forward.
(c) expert weight bytes bf16 vs fp8 and peak GPU memory of each forward.
(d) quantize time of the 400 linears.
(e) with --kernels_v1: the fp8 forward again with the activation-quantization kernels of commit
    adb6d6a (bench/_fp8_kernels_v1.py, before issue #34) swapped in: the forward-level gain of
    today's kernels, same process, same weights (bench.bench_fp8_kernels times the kernels alone).

A 40-step 832x480 video with and without fp8 (time, PSNR of the decoded frames vs bf16):
`python -m bench.bench_fp8 --video` prints the wan-benchmark commands (benchmark_t2v runs the
reference mode in bf16, then the optimized mode, with --fp8 when given, in one process).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_triton.metrics import rel_err
from bench.bench_dit import _timed  # median of runs after warm-up, peak memory: the same timing as bench_dit

_VIDEO = ("python -m wan_triton.benchmark --task t2v-A14B --random-weights --size 832*480 --frame_num 81 "
          "--sample_steps 40 --preset h200 --num_runs 1 --warmup 0 --out_dir bench/out")
VIDEO_CMDS = (  # same seed and weights: the reference frames are the same in both runs
    f"{_VIDEO} --mode both --name video480_bf16      # reference vs optimized bf16: time, PSNR",
    f"{_VIDEO} --mode both --fp8 --name video480_fp8  # reference vs optimized fp8: time, PSNR of fp8",
)


def _cuda_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _gpu_rel(a, ref) -> float:
    """||a - ref|| / ||ref|| in fp32 on the GPU (the (a) tensors are GBs: no float64 host copies)."""
    return ((a.float() - ref).norm() / ref.norm()).item()


def block_shapes(cfg, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of the 10 fp8 linears of one block."""
    d, f, tl = cfg.dim, cfg.ffn_dim, cfg.text_len
    return [("self_attn.q", tokens, d, d), ("self_attn.k", tokens, d, d), ("self_attn.v", tokens, d, d),
            ("self_attn.o", tokens, d, d), ("cross_attn.q", tokens, d, d), ("cross_attn.k", tl, d, d),
            ("cross_attn.v", tl, d, d), ("cross_attn.o", tokens, d, d), ("ffn.0", tokens, d, f),
            ("ffn.2", tokens, f, d)]


def bench_matmuls(cfg, tokens: int, iters: int, dev) -> dict:
    """(a): per shape, bf16 vs fp8 (GEMM alone, and with the activation quantization)."""
    from wan_triton.kernels.quant_fp8 import quant_fp8
    from wan_triton.fp8 import fp8_support, quantize_weight

    native, why = fp8_support(dev)
    rows, seen = [], {}
    g = torch.Generator(device=dev).manual_seed(3)
    for name, M, K, N in block_shapes(cfg, tokens):
        key = (M, K, N)
        if key not in seen:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) * K ** -0.5
            b = torch.randn(N, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
            wq, ws = quantize_weight(w)
            xq, xs = quant_fp8(x)
            flop = 2.0 * M * K * N
            r = dict(M=M, K=K, N=N, bf16_ms=_cuda_ms(lambda: F.linear(x, w, b), iters, 2))
            if native:
                mm = lambda a=xq, sa=xs: torch._scaled_mm(a, wq.t(), scale_a=sa, scale_b=ws.view(1, -1),  # noqa: E731
                                                          bias=b, out_dtype=torch.bfloat16)
                r["fp8_ms"] = _cuda_ms(mm, iters, 2)
                r["fp8_fast_accum_ms"] = _cuda_ms(lambda: torch._scaled_mm(
                    xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=b, out_dtype=torch.bfloat16,
                    use_fast_accum=True), iters, 2)
                r["quant_ms"] = _cuda_ms(lambda: quant_fp8(x), iters, 2)
                ref = F.linear(x.float(), w.float(), b.float())  # fp32 product of the same bf16 operands
                r["rel_err_fp8"] = _gpu_rel(mm(), ref)
                r["rel_err_bf16"] = _gpu_rel(F.linear(x, w, b), ref)
                del ref
            for k in ("bf16", "fp8", "fp8_fast_accum"):
                if f"{k}_ms" in r:
                    r[f"{k}_tflops"] = flop / (r[f"{k}_ms"] * 1e-3) / 1e12
            seen[key] = r
            del x, w, b, wq, ws, xq, xs
            torch.cuda.empty_cache()
        rows.append(dict(name=name, **seen[key]))
    out = dict(native=native, reason=why, rows=rows)
    for k in ("bf16_ms", "fp8_ms", "fp8_fast_accum_ms", "quant_ms"):
        if all(k in r for r in rows):
            out[f"per_forward_{k[:-3]}_s"] = cfg.num_layers * sum(r[k] for r in rows) / 1e3
    if "per_forward_fp8_s" in out:
        out["speedup_gemm"] = out["per_forward_bf16_s"] / out["per_forward_fp8_s"]
        out["speedup_gemm_with_quant"] = out["per_forward_bf16_s"] / (out["per_forward_fp8_s"]
                                                                      + out["per_forward_quant_s"])
    return out


def _fp8_forward_v1(fwd, y8, runs: int, warmup: int) -> dict:
    """(e): the fp8 forward with bench/_fp8_kernels_v1.py's kernels in wan_triton.fp8's op table
    (restored afterwards); its time, peak and difference from today's fp8 forward (the modulate
    kernel sums its statistics in another order: not bit-identical)."""
    from wan_triton import fp8

    from ._fp8_kernels_v1 import gelu_quant_fp8_v1, modulate_quant_fp8_v1, quant_fp8_v1

    saved = dict(fp8._KERNELS)
    v1 = {"quant_fp8": quant_fp8_v1, "gelu_quant_fp8": gelu_quant_fp8_v1, "modulate_quant_fp8": modulate_quant_fp8_v1}
    try:
        for name, op in v1.items():
            fp8._KERNELS[name] = (op, saved[name][1])
        y, sec, sec_runs, peak = _timed(fwd, runs, warmup)
    finally:
        fp8._KERNELS.update(saved)
    return dict(fp8_v1_s=sec, fp8_v1_runs=sec_runs, fp8_v1_peak_gb=peak, fp8_v1_rel_diff=rel_err(y, y8))


def _weight_gb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_fp8", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280*720", help="WIDTH*HEIGHT of the video")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--runs", type=int, default=3, help="timed forwards per mode (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per matrix-product shape")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick smoke run")
    ap.add_argument("--reference", action="store_true", help="also the unpatched bf16 forward (+~25 s at 720p)")
    ap.add_argument("--skip_forward", action="store_true", help="only (a), the matrix products")
    ap.add_argument("--fast_accum", action="store_true", help="fp8 forward with _scaled_mm's fast accumulation")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--kernels_v1", action="store_true", help="(e): also the fp8 forward with the pre-#34 "
                                                                "activation-quantization kernels")
    ap.add_argument("--video", action="store_true", help="print the 40-step 832x480 video commands and exit")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/out/fp8_<W>x<H>.json)")
    args = ap.parse_args(argv)
    if args.video:
        print("\n".join(VIDEO_CMDS))
        return 0
    if not torch.cuda.is_available():
        print("bench_fp8: error: needs a CUDA GPU", file=sys.stderr)
        return 2

    import wan_triton
    from wan import attention as att
    from wan.configs import T2V_A14B, parse_size
    from wan_triton import fp8

    from ._expert import build_expert, expert_inputs

    w, h = parse_size(args.size)
    out_path = Path(args.out or f"bench/out/fp8_{w}x{h}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    cfg = T2V_A14B.dit
    st, sh, sw = T2V_A14B.vae_stride
    pt, ph, pw = cfg.patch_size
    tokens = ((args.frame_num - 1) // st + 1) // pt * (h // sh // ph) * (w // sw // pw)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, size=args.size,
                  frame_num=args.frame_num, tokens=tokens)

    def save():
        out_path.write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    report["matmul"] = mm = bench_matmuls(cfg, tokens, args.iters, dev)
    print(f"(a) matrix products at {tokens} tokens: {time.perf_counter() - t0:.0f} s "
          f"({'torch._scaled_mm' if mm['native'] else 'fp8 not native: ' + mm['reason']})", flush=True)
    save()

    if not args.skip_forward:
        model = build_expert(dev, args.layers)
        att.set_backend(args.attention)
        x, ctx, _, t, L = expert_inputs(w, h, args.frame_num, dev, torch.Generator(device=dev).manual_seed(1))

        def fwd():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, t, ctx, seq_len=L)

        fw = report["forward"] = dict(layers=len(model.blocks), attention=att.resolve_backend(dev),
                                      weights_bf16_gb=_weight_gb(model))
        ref = None
        if args.reference:
            wan_triton.unpatch()
            ref, fw["reference_s"], _, fw["reference_peak_gb"] = _timed(fwd, args.runs, args.warmup)
            ref = ref.cpu()
            print(f"(b) reference {fw['reference_s']:.3f} s", flush=True)
        wan_triton.patch(strict=True)
        y16, fw["bf16_s"], fw["bf16_runs"], fw["bf16_peak_gb"] = _timed(fwd, args.runs, args.warmup)
        y16 = y16.cpu()
        print(f"(b) patched bf16 {fw['bf16_s']:.3f} s, peak {fw['bf16_peak_gb']:.1f} GB", flush=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        summ = fp8.quantize_model(model, progress=True, fast_accum=args.fast_accum)
        torch.cuda.synchronize()
        fw["quantize_s"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        fw["weights_fp8_gb"] = _weight_gb(model)
        fw["fp8_native"], fw["fp8_reason"] = summ.native, summ.reason
        fp8.reset_fp8_stats()
        y8, fw["fp8_s"], fw["fp8_runs"], fw["fp8_peak_gb"] = _timed(fwd, args.runs, args.warmup)
        fw["fp8_kernel_stats"] = fp8.fp8_stats()
        fw["fp8_rel_err_vs_bf16"] = rel_err(y8, y16)
        if ref is not None:
            fw["fp8_rel_err_vs_reference"] = rel_err(y8, ref)
            fw["bf16_rel_err_vs_reference"] = rel_err(y16, ref)
        fw["speedup"] = fw["bf16_s"] / fw["fp8_s"]
        if args.kernels_v1:
            fw.update(_fp8_forward_v1(fwd, y8, args.runs, args.warmup))
            print(f"(e) fp8 with the v1 kernels {fw['fp8_v1_s']:.3f} s (today's {fw['fp8_s']:.3f} s)", flush=True)
        wan_triton.unpatch()
        print(f"(b) patched fp8 {fw['fp8_s']:.3f} s, peak {fw['fp8_peak_gb']:.1f} GB, rel err vs bf16 "
              f"{fw['fp8_rel_err_vs_bf16']:.3e}", flush=True)
        save()

    print(f"\n## fp8 linears, {report['device']}, {args.size} x {args.frame_num}f = {tokens} tokens\n")
    print("| linear | M x K x N | bf16 ms | bf16 TFLOP/s | fp8 ms | fp8 TFLOP/s | fp8 fast-acc ms | quant ms | "
          "rel err fp8 / bf16 vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in mm["rows"]:
        f = lambda k, fmt=".2f": format(r[k], fmt) if k in r else "-"  # noqa: E731
        print(f"| {r['name']} | {r['M']}x{r['K']}x{r['N']} | {f('bf16_ms')} | {f('bf16_tflops', '.0f')} | "
              f"{f('fp8_ms')} | {f('fp8_tflops', '.0f')} | {f('fp8_fast_accum_ms')} | {f('quant_ms')} | "
              f"{f('rel_err_fp8', '.2e')} / {f('rel_err_bf16', '.2e')} |")
    if "per_forward_fp8_s" in mm:
        print(f"\nper forward ({cfg.num_layers} blocks): bf16 {mm['per_forward_bf16_s']:.3f} s, fp8 "
              f"{mm['per_forward_fp8_s']:.3f} s (x{mm['speedup_gemm']:.2f}), fp8 + activation quantization "
              f"{mm['per_forward_fp8_s'] + mm['per_forward_quant_s']:.3f} s (x{mm['speedup_gemm_with_quant']:.2f}; "
              f"the fused kernels hide most of that), fast accumulation {mm['per_forward_fp8_fast_accum_s']:.3f} s")
    fw = report.get("forward")
    if fw:
        print("\n| forward | s (median) | peak GB | weights GB | rel err vs bf16 | rel err vs reference |")
        print("|---|---|---|---|---|---|")
        if "reference_s" in fw:
            print(f"| reference (unpatched bf16) | {fw['reference_s']:.3f} | {fw['reference_peak_gb']:.1f} | "
                  f"{fw['weights_bf16_gb']:.1f} | | 0 |")
        print(f"| patched bf16 | {fw['bf16_s']:.3f} | {fw['bf16_peak_gb']:.1f} | {fw['weights_bf16_gb']:.1f} | 0 | "
              f"{fw.get('bf16_rel_err_vs_reference', float('nan')):.2e} |")
        print(f"| patched fp8 | {fw['fp8_s']:.3f} | {fw['fp8_peak_gb']:.1f} | {fw['weights_fp8_gb']:.1f} | "
              f"{fw['fp8_rel_err_vs_bf16']:.2e} | {fw.get('fp8_rel_err_vs_reference', float('nan')):.2e} |")
        if "fp8_v1_s" in fw:
            print(f"| patched fp8, pre-#34 quantize kernels | {fw['fp8_v1_s']:.3f} | {fw['fp8_v1_peak_gb']:.1f} | "
                  f"{fw['weights_fp8_gb']:.1f} | (vs today's fp8: {fw['fp8_v1_rel_diff']:.2e}) | |")
        print(f"\nquantize: {fw['quantize_s']:.1f} s; speedup x{fw['speedup']:.2f}; products "
              f"{'torch._scaled_mm' if fw['fp8_native'] else 'EMULATED: ' + fw['fp8_reason']}")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
