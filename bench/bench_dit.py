"""One DiT expert at full A14B size with random bf16 weights: seconds per forward, peak
memory and output parity, for the reference, patched (Triton kernels), patched + compiled,
and CFG as two calls vs one batch-2 call. All modes run in one process on the same weights
and inputs; each figure is the median of --runs timed forwards after --warmup.

    python -m bench.bench_dit --sizes 1280*720,832*480 --runs 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from wan_triton.metrics import rel_err


def _timed(fn, runs: int, warmup: int):
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times, torch.cuda.max_memory_allocated() / 1e9




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1280*720,832*480")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default="reference,patched,compiled,cfg")
    ap.add_argument("--compile_mode", default="default")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick smoke run")
    ap.add_argument("--attention", default="auto", help="backend of every mode (reference included)")
    ap.add_argument("--backends", default="", help="comma list: one extra patched forward per attention backend "
                    "(e.g. sdpa-cudnn,fa4,fp8), same weights and inputs, rel. err vs the reference mode")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cfg_warmup", type=int, default=0, help="warm-up calls for the CFG pair (the patched "
                    "forwards before it have already warmed the kernels)")
    args = ap.parse_args(argv)

    import wan_triton
    from wan import attention as att

    from ._expert import build_expert, expert_inputs

    if not torch.cuda.is_available():  # exit code 2, as profile_dit and the CLIs: something unavailable
        print("bench_dit: error: needs a CUDA GPU (it times device kernels)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    model = build_expert(dev, args.layers)
    print(f"built expert ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, bf16) "
          f"in {time.perf_counter() - t0:.1f}s on {torch.cuda.get_device_name()}", flush=True)
    from wan_triton.fp8_attention import ensure_registered
    ensure_registered(args.attention)  # --attention fp8: the opt-in lossy backend
    att.set_backend(args.attention)
    modes = args.modes.split(",")
    results = []
    g = torch.Generator(device=dev).manual_seed(1)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("*"))
        x, ctx_c, ctx_u, t, L = expert_inputs(w, h, args.frame_num, dev, g)
        lat = tuple(x.shape[1:])

        def fwd(x=x, ctx=ctx_c, t=t):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, t, ctx, seq_len=L)

        def cfg_two():
            return fwd(ctx=ctx_c), fwd(ctx=ctx_u)

        x2 = x.expand(2, *lat)
        t2 = t.expand(2)

        def cfg_batched():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x2, t2, [ctx_c[0], ctx_u[0]], seq_len=L)

        row = dict(size=size, tokens=L, backend=att.resolve_backend(dev))
        ref = None
        wan_triton.unpatch()
        if "reference" in modes:
            ref, row["reference_s"], row["reference_runs"], row["reference_peak_gb"] = _timed(fwd, args.runs,
                                                                                              args.warmup)
            print(f"[{size}] reference {row['reference_s']:.3f}s peak {row['reference_peak_gb']:.1f} GB", flush=True)
        if set(modes) & {"patched", "cfg", "compiled"}:
            wan_triton.patch(attention=args.attention, strict=True)
        if "patched" in modes:
            wan_triton.reset_kernel_stats()
            out, row["patched_s"], row["patched_runs"], row["patched_peak_gb"] = _timed(fwd, args.runs, args.warmup)
            row["patched_kernel_launches"] = {op: s["launches"] for op, s in wan_triton.kernel_stats().items()}
            if ref is not None:
                row["patched_rel_err"] = rel_err(out, ref)
            print(f"[{size}] patched {row['patched_s']:.3f}s peak {row['patched_peak_gb']:.1f} GB "
                  f"rel_err {row.get('patched_rel_err', float('nan')):.2e}", flush=True)
        for b in filter(None, args.backends.split(",")):
            ensure_registered(b)
            wan_triton.patch(attention=b, strict=True)
            try:
                outb, row[f"patched[{b}]_s"], row[f"patched[{b}]_runs"], row[f"patched[{b}]_peak_gb"] = _timed(
                    fwd, args.runs, args.warmup)
            except Exception as err:  # an unavailable backend: say so, keep the other figures
                row[f"patched[{b}]_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"[{size}] patched[{b}] FAILED: {row[f'patched[{b}]_error']}", flush=True)
                continue
            finally:
                wan_triton.unpatch()
            if ref is not None:
                row[f"patched[{b}]_rel_err"] = rel_err(outb, ref)
            print(f"[{size}] patched[{b}] {row[f'patched[{b}]_s']:.3f}s peak {row[f'patched[{b}]_peak_gb']:.1f} GB "
                  f"rel_err {row.get(f'patched[{b}]_rel_err', float('nan')):.2e}", flush=True)
            del outb
        if args.backends:
            wan_triton.patch(attention=args.attention, strict=True)
        if "cfg" in modes:
            _, row["cfg_two_calls_s"], _, row["cfg_two_calls_peak_gb"] = _timed(cfg_two, args.runs, args.cfg_warmup)
            outb, row["cfg_batched_s"], _, row["cfg_batched_peak_gb"] = _timed(cfg_batched, args.runs,
                                                                               args.cfg_warmup)
            if ref is not None:
                row["cfg_batched_rel_err"] = rel_err(outb[0:1], ref)
            print(f"[{size}] CFG step: two calls {row['cfg_two_calls_s']:.3f}s, batched {row['cfg_batched_s']:.3f}s "
                  f"(peak {row['cfg_batched_peak_gb']:.1f} GB)", flush=True)
        if "compiled" in modes:
            try:
                _compiled(model, fwd, row, ref, args, size)
            except Exception as err:  # record and go on: the other figures still count
                row["compiled_error"] = f"{type(err).__name__}: {err}"[:2000]
                print(f"[{size}] compiled FAILED: {row['compiled_error'][:500]}", flush=True)
        results.append(row)
        del x, x2
        torch.cuda.empty_cache()
        if args.json:  # after every size, so a run cut short still leaves its figures
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f,
                          indent=2)

    print("\n| size | tokens | mode | s/forward | peak GB | rel. err vs reference |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for m in ("reference", "patched", "compiled") + tuple(f"patched[{b}]" for b in filter(None, args.backends.split(","))):
            if f"{m}_s" in r:
                print(f"| {r['size']} | {r['tokens']} | {m} | {r[m + '_s']:.3f} | {r[m + '_peak_gb']:.1f} | "
                      f"{r.get(m + '_rel_err', 0.0):.2e} |")
        if "cfg_batched_s" in r:
            print(f"| {r['size']} | {r['tokens']} | CFG step, two calls | {r['cfg_two_calls_s']:.3f} | "
                  f"{r['cfg_two_calls_peak_gb']:.1f} | |")
            print(f"| {r['size']} | {r['tokens']} | CFG step, batched | {r['cfg_batched_s']:.3f} | "
                  f"{r['cfg_batched_peak_gb']:.1f} | {r.get('cfg_batched_rel_err', 0.0):.2e} |")


def _compiled(model, fwd, row, ref, args, size):
    import wan_triton

    if not getattr(model, "_wb_compiled", False):
        wan_triton.compile_blocks(model, args.compile_mode)
        model._wb_compiled = True
    t0 = time.perf_counter()
    fwd()
    torch.cuda.synchronize()
    row["compile_first_call_s"] = time.perf_counter() - t0
    out, row["compiled_s"], row["compiled_runs"], row["compiled_peak_gb"] = _timed(fwd, args.runs, args.warmup)
    if ref is not None:
        row["compiled_rel_err"] = rel_err(out, ref)
    print(f"[{size}] patched+compiled {row['compiled_s']:.3f}s peak {row['compiled_peak_gb']:.1f} GB "
          f"rel_err {row.get('compiled_rel_err', float('nan')):.2e} "
          f"(first call {row['compile_first_call_s']:.0f}s)", flush=True)
    for blk in model.blocks:  # back to eager, so the next size's reference is the reference
        blk._compiled_call_impl = None
    model._wb_compiled = False


if __name__ == "__main__":
    sys.exit(main())
