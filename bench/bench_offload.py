"""Block streaming (wan.streaming) on one GPU under emulated memory caps: step time vs resident,
peak GPU memory, peak host RSS, H2D bandwidth, and a 2-step generation bit-identical to resident.

    python -m bench.bench_offload --sizes 1280*720 --caps 24 --out bench/out/offload.json   # ~4 min, H100/H200
    python -m bench.bench_offload --layers 4 --sizes 832*480 --caps 24 --gen_size 832*480   # ~1 min smoke
    python -m bench.bench_offload --video --weights fp8 --host_ram low --out bench/out/video24_fp8_low.json
    python -m bench.bench_offload --video --weights bf16 --host_ram high --out bench/out/video24_bf16.json

`--video` (bench/_offload_video.py): the whole 720p pipeline under one 24 GB cap, set before
anything is built: T5 (on the GPU and freed after encoding, or on the CPU), a 4-step
1280x720x81 generation through `WanT2V.generate` with block streaming that crosses the expert
switch, the fp32 decode; bf16 or fp8 experts (fp8 expert files written once into `--tmp`),
host RAM high or low; then one step of the high-noise expert resident, against the same step
streamed.

Host memory (bench/_host.py): each run says first what it will hold in host memory and refuses
(exit 2, one line) when that does not fit what the host can give minus a margin; a thread
samples the process's RSS (anonymous and file-backed parts) and stops the run (exit 3) if the
memory it cannot give back passes that limit; the host peak is printed after each phase and at
the end, and the JSON is written as the run goes. Why this matters: pinned (page-locked) host
memory can never be reclaimed; two bf16 experts pin 56 GB, and where cudaHostRegister failed the
streamer used to pin through torch's allocator, which rounds each 0.70 GB block up to 1.07 GB
(86 GB for two experts) - enough, with the rest of a 128 GB machine's load, to leave the host no
memory to answer with (the 2026-12-04 run; its cause was not captured). The streamer now keeps
such blocks pageable instead (wan/streaming.py).

Default mode: random A14B weights (bf16; each expert built block by block, then moved to the GPU:
no float32 copy of an expert on the GPU), both experts resident for the reference step, then
their blocks move to pinned host memory. Text contexts are random tensors of the T5's width. A
cap of C GB is emulated with `torch.cuda.set_per_process_memory_fraction(C * 1e9 / total)`;
this bounds what the caching allocator may reserve (the CUDA context, ~0.5 GB, is outside it,
so C GB of cap stands for a card with a little more than C GB: 24 GB < a 4090's 25.3 GB). A step
is the cond + uncond pair of batch-1 forwards the pipeline makes, with the high-noise expert.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench._host import HostGuard, status_gb
from bench._offload_video import add_video_args, expert_block_bytes, run_video


def _host_status(key: str) -> float:
    """VmRSS / VmHWM / RssAnon ... of this process in GB (0 when unreadable)."""
    return status_gb().get(key, 0.0)


def _gb(n: int) -> float:
    return n / 1e9


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def h2d_bandwidth(nbytes: int, reps: int = 10) -> dict:
    """GB/s of one host->device copy of `nbytes`, from registered-pinned and from pageable memory."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = {}
    rt = torch.cuda.cudart()
    for kind in ("pageable", "pinned"):
        if kind == "pinned":
            assert rt.cudaHostRegister(src.data_ptr(), nbytes, 0) == rt.cudaError.success
        dst.copy_(src, non_blocking=True)
        _sync()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        b.record()
        _sync()
        out[kind + "_gbps"] = nbytes * reps / (a.elapsed_time(b) / 1e3) / 1e9
    rt.cudaHostUnregister(src.data_ptr())
    return out


def step(model, x, ctx_c, ctx_u, t, seq_len):
    """One denoising step's forwards (cond, uncond), as WanT2V._guided makes them; seconds and outputs."""
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        c = model([x[0]], t, [ctx_c[0]], seq_len=seq_len)[0]
        u = model([x[0]], t, [ctx_u[0]], seq_len=seq_len)[0]
    _sync()
    return time.perf_counter() - t0, c, u


def _reset_peaks():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    if not torch.cuda.is_available():  # the CPU smoke run of --video
        return dict(peak_alloc_gb=0.0, peak_reserved_gb=0.0)
    return dict(peak_alloc_gb=_gb(torch.cuda.max_memory_allocated()),
                peak_reserved_gb=_gb(torch.cuda.max_memory_reserved()))


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _set_cap(cap_gb: float | None, total: int) -> None:
    """Cap this process's GPU memory at `cap_gb` of `total` bytes (None: lift the cap). total 0: no
    GPU in this run (the CPU smoke of --video, also on a machine that has CUDA): nothing to cap."""
    if not total:
        return
    torch.cuda.empty_cache()
    frac = 1.0 if cap_gb is None else min(1.0, cap_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(frac)


def _parse_size(s: str) -> tuple[int, int]:
    w, h = s.lower().replace("x", "*").split("*")
    return int(w), int(h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="832*480,1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--caps", default="24,40,48", help="emulated GPU sizes in GB (1e9 bytes)")
    ap.add_argument("--ring", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="shorter experts for a smoke run")
    ap.add_argument("--gen_size", default="1280*720", help="size of the 2-step generation ('' to skip)")
    ap.add_argument("--gen_steps", type=int, default=2)
    ap.add_argument("--no-decode", dest="decode", action="store_false", help="skip the capped VAE decode")
    ap.add_argument("--no-triton", dest="triton", action="store_false", help="reference ops (no kernels)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/offload.json, "
                                               "bench/out/offload_video.json with --video)")
    ap.add_argument("--video", action="store_true", help="the whole 720p pipeline under one cap (see the docstring)")
    ap.add_argument("--cap", type=float, default=24.0, help="--video: the emulated GPU size in GB")
    ap.add_argument("--video_steps", type=int, default=4, help="--video: steps run (half high-noise, half low)")
    ap.add_argument("--tmp", default=None, help="--video: local-disk folder for the expert files (default: "
                                                "bench/out/tmp; not tmpfs)")
    ap.add_argument("--host_limit_gb", type=float, default=None,
                    help="host memory this run may hold (default: what the host can give at the start minus "
                         "max(8 GB, 10 %%)); the run refuses or stops beyond it")
    add_video_args(ap)
    ap.add_argument("--smoke_cpu", action="store_true", help=argparse.SUPPRESS)  # --video's flow on the tiny model
    args = ap.parse_args(argv)
    if args.video and args.smoke_cpu:
        return run_video(args, _set_cap)
    if not torch.cuda.is_available():
        print("bench_offload: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.video:
        if args.video_steps < 2:
            print("bench_offload: error: --video_steps must be >= 2", file=sys.stderr)
            return 2
        return run_video(args, _set_cap)
    if args.out is None:
        args.out = "bench/out/offload.json"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    import logging
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from bench._expert import expert_inputs
    from wan.configs import T2V_A14B
    from wan.offload import build_streamable_expert, switch_experts

    if args.triton:
        import wan_triton
        wan_triton.patch()
    cfg = T2V_A14B
    dit = cfg.dit if args.layers is None else dataclasses.replace(cfg.dit, num_layers=args.layers)
    total = torch.cuda.get_device_properties(0).total_memory
    caps = [float(c) for c in args.caps.split(",") if c]
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s]
    res = dict(gpu=torch.cuda.get_device_name(0), total_gb=_gb(total), torch=torch.__version__,
               triton=args.triton, ring=args.ring, layers=dit.num_layers, frame_num=args.frame_num,
               caps_gb=caps, rows=[], generation=None)

    guard = HostGuard.start(args.host_limit_gb)
    # host: an expert's blocks while it is built (then it moves to the GPU), later both experts' blocks pinned
    if not guard.check(2 * expert_block_bytes(dit, "bf16") + 6e9, "both bf16 experts' blocks pinned + the process",
                       hint="--layers N shortens the experts", prog="bench_offload"):
        return 2
    t0 = time.perf_counter()
    high = build_streamable_expert(dit, "cuda", torch.bfloat16, seed=1).to("cuda")  # block by block: no fp32 expert
    low = build_streamable_expert(dit, "cuda", torch.bfloat16, seed=2).to("cuda")
    wbytes = sum(p.numel() * p.element_size() for p in high.parameters())
    bbytes = sum(p.numel() * p.element_size() for p in high.blocks[0].parameters())
    res.update(expert_gb=_gb(wbytes), block_gb=_gb(bbytes), build_s=time.perf_counter() - t0)
    res["h2d"] = h2d_bandwidth(bbytes)
    print(f"experts built in {res['build_s']:.1f}s: {_gb(wbytes):.2f} GB each, block {_gb(bbytes):.3f} GB; "
          f"H2D {res['h2d']}; {guard.line()}", flush=True)

    def save():
        res["host"] = guard.report()
        out_path.write_text(json.dumps(res, indent=2))

    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {s: expert_inputs(*s, args.frame_num, "cuda", gen) for s in sizes}
    ref_out = {}

    # 1. resident (uncapped): both experts on the GPU
    for s in sizes:
        x, cc, cu, t, sl = inputs[s]
        step(high, x, cc, cu, t, sl)  # warm-up (kernels, attention backend)
        _reset_peaks()
        sec, c, u = step(high, x, cc, cu, t, sl)
        ref_out[s] = (c.cpu(), u.cpu())
        pk = _peaks()
        row = dict(mode="resident", cap_gb=None, size=f"{s[0]}*{s[1]}", step_s=sec, equal=True, **pk,
                   one_expert_peak_gb=pk["peak_alloc_gb"] - _gb(wbytes))  # what a one-expert-resident run needs
        res["rows"].append(row)
        print(row, f"| {guard.line()}", flush=True)
        save()

    # 2. the resident 2-step generation (latents are the reference)
    pipe = None
    if args.gen_size:
        from wan.pipeline import WanT2V
        from wan.vae import WanVAE

        gw, gh = _parse_size(args.gen_size)
        vae = WanVAE.from_config(cfg.vae, device="cuda", dtype=torch.float32, seed=0)
        pipe = WanT2V(cfg, None, vae, low, high, device="cuda")
        _, gc, gu, _, _ = expert_inputs(gw, gh, args.frame_num, "cuda", torch.Generator(device="cuda").manual_seed(1))
        ctx = {"prompt": [gc[0]], "negative": [gu[0]]}
        pipe.encode_text = lambda prompts: ctx[prompts[0]]
        pipe._warn_if_cut = lambda what, text: None  # no text encoder (and no tokenizer) in this pipeline
        kw = dict(size=(gw, gh), frame_num=args.frame_num, sampling_steps=args.gen_steps, shift=3.0, seed=0,
                  n_prompt="negative", offload_model=False, progress=False, return_latents=True)
        ok_size = f"{gw}*{gh}" in cfg.sizes
        if not ok_size:
            print(f"bench_offload: error: --gen_size {args.gen_size} is not one of {cfg.sizes}", file=sys.stderr)
            return 2
        _reset_peaks()
        lat_ref = pipe.generate("prompt", **kw).cpu()
        tm = pipe.last_timings
        res["generation"] = dict(size=args.gen_size, steps=args.gen_steps, experts=tm.experts,
                                 resident_steps_s=tm.steps, resident_peak_alloc_gb=_peaks()["peak_alloc_gb"])
        print(res["generation"], flush=True)

    # 3. stream: the blocks of both experts go to pinned host memory
    rss0 = _host_status("VmRSS")
    t0 = time.perf_counter()
    if pipe is not None:
        handles = pipe.enable_block_streaming(ring=args.ring)
    else:
        from wan.streaming import enable_block_streaming
        handles = [enable_block_streaming(m, "cuda", ring=args.ring) for m in (high, low)]
        for h in handles:
            h.park("cpu")
    torch.cuda.empty_cache()
    res.update(pin_s=time.perf_counter() - t0, host_rss_before_pin_gb=rss0,
               host_rss_after_pin_gb=_host_status("VmRSS"), pinned_gb=_gb(sum(h.host_bytes for h in handles)),
               gpu_alloc_after_pin_gb=_gb(torch.cuda.memory_allocated()))
    save()
    print(f"{guard.line()}", flush=True)
    print(f"streaming on in {res['pin_s']:.1f}s: {res['pinned_gb']:.1f} GB pinned, host RSS "
          f"{rss0:.1f} -> {res['host_rss_after_pin_gb']:.1f} GB, GPU now {res['gpu_alloc_after_pin_gb']:.2f} GB",
          flush=True)
    hs = handles[0]
    hs.timing = True  # time each copy on the copy stream (achieved H2D bandwidth while streaming)

    for cap in sorted(caps):
        _set_cap(cap, total)
        switch_experts(high, low, "cuda")
        for s in sizes:
            x, cc, cu, t, sl = inputs[s]
            _reset_peaks()
            b0, c0 = hs.stats.bytes, hs.stats.copies
            row = dict(mode=f"blocks(ring={hs.k})", cap_gb=cap, size=f"{s[0]}*{s[1]}")
            try:
                sec, c, u = step(high, x, cc, cu, t, sl)
                pk = _peaks()
                row.update(step_s=sec, equal=bool(torch.equal(c.cpu(), ref_out[s][0])
                                                  and torch.equal(u.cpu(), ref_out[s][1])), **pk,
                           fits=pk["peak_reserved_gb"] <= cap, streamed_gb=_gb(hs.stats.bytes - b0),
                           copies=hs.stats.copies - c0)
                row["stream_demand_gbps"] = row["streamed_gb"] / sec
                row["copy_s"], row["h2d_achieved_gbps"] = hs.copy_bandwidth()
                del c, u
            except torch.cuda.OutOfMemoryError:
                hs.copy_bandwidth()
                row.update(step_s=None, equal=None, oom=True, fits=False)
                torch.cuda.empty_cache()
            ref = next(r for r in res["rows"] if r["mode"] == "resident" and r["size"] == row["size"])
            if row.get("step_s"):
                row["slowdown_pct"] = 100 * (row["step_s"] / ref["step_s"] - 1)
            res["rows"].append(row)
            print(row, f"| {guard.line()}", flush=True)
            save()

    # 4. the 2-step generation under the smallest cap: latents must equal the resident run's
    if pipe is not None:
        cap = min(caps)
        _set_cap(cap, total)
        _reset_peaks()
        g = res["generation"]
        try:
            lat = pipe.generate("prompt", **kw)
            g.update(cap_gb=cap, streamed_steps_s=pipe.last_timings.steps, experts_streamed=pipe.last_timings.experts,
                     streamed_peak_alloc_gb=_peaks()["peak_alloc_gb"], streamed_peak_reserved_gb=_peaks()[
                         "peak_reserved_gb"], latents_equal=bool(torch.equal(lat.cpu(), lat_ref)))
            if args.decode:
                _reset_peaks()
                _sync()
                t0 = time.perf_counter()
                video = pipe.vae.decode(lat.unsqueeze(0))
                _sync()
                g.update(decode_s=time.perf_counter() - t0, decode_peak_alloc_gb=_peaks()["peak_alloc_gb"],
                         decode_peak_reserved_gb=_peaks()["peak_reserved_gb"], decode_frames=video.shape[2])
                del video
        except torch.cuda.OutOfMemoryError as err:
            g.update(cap_gb=cap, oom=str(err).splitlines()[0][:200])
            torch.cuda.empty_cache()
        print(g, f"| {guard.line()}", flush=True)
        save()
    _set_cap(None, total)
    guard.stop()
    res["host_peak_rss_gb"] = max(guard.report()["peak_rss_gb"], _host_status("VmHWM"))

    # table
    print(f"\n{res['gpu']} | A14B expert {res['expert_gb']:.1f} GB, block {res['block_gb']:.2f} GB | "
          f"H2D pinned {res['h2d']['pinned_gbps']:.1f} GB/s, pageable {res['h2d']['pageable_gbps']:.1f} GB/s | "
          f"host peak RSS {res['host_peak_rss_gb']:.1f} GB")
    print(f"{'mode':<14}{'cap GB':>7}{'size':>10}{'step s':>8}{'vs res':>8}{'alloc GB':>9}{'resv GB':>9}"
          f"{'fits':>6}{'equal':>7}{'H2D GB/s':>9}")
    for r in res["rows"]:
        cap = "-" if r["cap_gb"] is None else f"{r['cap_gb']:g}"
        st = "OOM" if r.get("step_s") is None else f"{r['step_s']:.2f}"
        sd = f"{r['slowdown_pct']:+.1f}%" if "slowdown_pct" in r else "-"
        fits = "-" if "fits" not in r else ("yes" if r["fits"] else "NO")
        print(f"{r['mode']:<14}{cap:>7}{r['size']:>10}{st:>8}{sd:>8}{r.get('peak_alloc_gb', math.nan):>9.1f}"
              f"{r.get('peak_reserved_gb', math.nan):>9.1f}{fits:>6}{str(r.get('equal')):>7}"
              f"{r.get('h2d_achieved_gbps', math.nan):>9.1f}")
    if res["generation"]:
        g = res["generation"]
        print(f"generation {g['size']} x{g['steps']} steps {g.get('experts')}: latents equal "
              f"{g.get('latents_equal')} | streamed peak {g.get('streamed_peak_reserved_gb', math.nan):.1f} GB "
              f"reserved under {g.get('cap_gb')} GB | decode {g.get('decode_s', math.nan):.1f}s peak "
              f"{g.get('decode_peak_reserved_gb', math.nan):.1f} GB reserved")
    print(guard.line())
    save()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
