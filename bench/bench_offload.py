"""Block streaming (wan.streaming) on one GPU under emulated memory caps: step time vs resident,
peak GPU memory, peak host RSS, H2D bandwidth, and a 2-step generation bit-identical to resident.

    python -m bench.bench_offload --out bench/out/offload_h200.json                  # ~5-6 min on an H200
    python -m bench.bench_offload --layers 4 --sizes 832*480 --caps 24 --gen_size 832*480   # ~1 min smoke
    python -m bench.bench_offload --video --out bench/out/offload_video24.json          # ~4 min on an H200

`--video`: the whole pipeline under one 24 GB cap, set before anything is built: T5 on the CPU
(`t5_cpu`, timed), a 4-step 1280x720x81 generation through `WanT2V.generate` with block
streaming that crosses the expert switch (2 high-noise + 2 low-noise steps: the boundary is
moved for this, the official 0.875 gives 3 + 1 at 4 steps), then the fp32 VAE decode within the
cap; per phase max_memory_allocated / max_memory_reserved, time per step, peak host RSS, and the
40-step video time PROJECTED from the measured step time (T5 + 40 x median step + decode). Then the
host-RAM-low switch: `--reload_blocks` blocks of the low-noise expert are written in the official
layout to a temp folder on local disk (`--tmp`), dropped from the page cache (fadvise), and
re-read into pinned memory through `wan.hostmem.ExpertSource` (cold, then warm); the 40-block
switch time is extrapolated from them (labelled so) unless `--reload_blocks 40`.

Random A14B weights (bf16, both experts built on the GPU, then their blocks move to pinned host
memory). Text contexts are random tensors of the T5's width: the text encoder is not part of the
budget (the 24/40 GB presets run it on the CPU, `--t5_cpu`). A cap of C GB is emulated with
`torch.cuda.set_per_process_memory_fraction(C * 1e9 / total)`; this bounds what the caching
allocator may reserve (the CUDA context, ~0.5 GB, is outside it, so C GB of cap stands for a
card with a little more than C GB: 24 GB < a 4090's 25.3 GB). A step is the cond + uncond pair
of batch-1 forwards the pipeline makes, with the high-noise expert.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def _host_status(key: str) -> float:
    """VmRSS / VmHWM of this process in GB (0 when unreadable)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


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
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
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
    ap.add_argument("--reload_blocks", type=int, default=4,
                    help="--video: blocks re-read to time the host-RAM-low switch (40 = a whole expert; 0 skips)")
    ap.add_argument("--tmp", default=None, help="--video: local-disk folder for the re-read files (default: $TMPDIR)")
    ap.add_argument("--smoke_cpu", action="store_true", help=argparse.SUPPRESS)  # --video's flow on the tiny model
    args = ap.parse_args(argv)
    if args.video and args.smoke_cpu:
        return run_video(args)
    if not torch.cuda.is_available():
        print("bench_offload: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.video:
        if args.video_steps < 2 or args.reload_blocks < 0:
            print("bench_offload: error: --video_steps must be >= 2 and --reload_blocks >= 0", file=sys.stderr)
            return 2
        return run_video(args)
    if args.out is None:
        args.out = "bench/out/offload.json"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    import logging
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from bench._expert import expert_inputs
    from wan.configs import T2V_A14B
    from wan.dit import WanModel
    from wan.offload import switch_experts

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

    t0 = time.perf_counter()
    high = WanModel.from_config(dit, device="cuda", dtype=torch.bfloat16, seed=1, zero_head=False)
    low = WanModel.from_config(dit, device="cuda", dtype=torch.bfloat16, seed=2, zero_head=False)
    wbytes = sum(p.numel() * p.element_size() for p in high.parameters())
    bbytes = sum(p.numel() * p.element_size() for p in high.blocks[0].parameters())
    res.update(expert_gb=_gb(wbytes), block_gb=_gb(bbytes), build_s=time.perf_counter() - t0)
    res["h2d"] = h2d_bandwidth(bbytes)
    print(f"experts built in {res['build_s']:.1f}s: {_gb(wbytes):.2f} GB each, block {_gb(bbytes):.3f} GB; "
          f"H2D {res['h2d']}", flush=True)

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
        print(row, flush=True)

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
            print(row, flush=True)

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
        print(g, flush=True)
    _set_cap(None, total)
    res["host_peak_rss_gb"] = _host_status("VmHWM")

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
    out_path.write_text(json.dumps(res, indent=2))
    print(f"wrote {out_path}")
    return 0


def _phase(res: dict, name: str, t0: float) -> None:
    """Record a phase's seconds, GPU peaks (since the last reset) and host RSS, then reset."""
    _sync()
    res["phases"][name] = dict(s=time.perf_counter() - t0, **_peaks(), host_rss_gb=_host_status("VmRSS"))
    _reset_peak()


def time_reload(high_or_low, dit, n: int, tmp: str | None, device="cuda") -> dict:
    """The host-RAM-low switch on `n` blocks: write them (official layout: config-less single
    safetensors file of `blocks.*` keys, all ExpertSource reads), drop them from the page cache,
    re-read into pinned memory (cold), evict, re-read again (warm)."""
    import tempfile

    import torch.nn as nn
    from safetensors.torch import save_file

    from wan.checkpoint import WEIGHTS_NAME
    from wan.dit import WanModel
    from wan.hostmem import ExpertSource
    from wan.streaming import BlockStreamer

    out = dict(blocks=n)
    with tempfile.TemporaryDirectory(dir=tmp, prefix="wan_reload_") as folder:
        t0 = time.perf_counter()
        sd = {}
        for i in range(n):
            for name, p in high_or_low.blocks[i].named_parameters():
                sd[f"blocks.{i}.{name}"] = p.detach().clone()  # views of one flat buffer cannot be saved as is
        path = os.path.join(folder, WEIGHTS_NAME)
        save_file(sd, path, metadata={"format": "pt"})
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        del sd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: the next read comes from the disk
        finally:
            os.close(fd)
        out.update(write_s=time.perf_counter() - t0, gb=_gb(nbytes), folder=folder)
        with torch.device("meta"):  # the blocks' structure (dtype as streamed); storage comes from the files
            holder = nn.Module()
            holder.blocks = WanModel(dataclasses.replace(dit, num_layers=n)).blocks.to(next(
                high_or_low.blocks.parameters()).dtype)
        holder.blocks.to_empty(device="cpu")
        h = BlockStreamer(holder, device, ring=1, source=ExpertSource(folder, holder), load=False,
                          label="reload-test")
        out["cold_s"] = h.reload()
        t0 = time.perf_counter()
        h.evict()
        out["evict_s"] = time.perf_counter() - t0
        out["warm_s"] = h.reload()
        ok = all(torch.equal(p, high_or_low.blocks[i].get_parameter(name))
                 for i in range(n) for name, p in holder.blocks[i].named_parameters())
        out["equal"] = bool(ok)
        out["ledger_peak_gb"] = _gb(h.ledger.peak)
        h.remove("cpu")
    full = dit.num_layers / n
    out.update(expert_blocks=dit.num_layers, cold_gbps=out["gb"] / out["cold_s"], warm_gbps=out["gb"] / out["warm_s"],
               switch_cold_s=(out["cold_s"] + out["evict_s"]) * full,
               switch_warm_s=(out["warm_s"] + out["evict_s"]) * full, extrapolated=n < dit.num_layers)
    return out


def run_video(args) -> int:
    """--video (see the module docstring)."""
    import logging
    import statistics

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from wan.configs import T2V_A14B, get_config
    from wan.offload import build_streamable_expert
    from wan.pipeline import WanT2V
    from wan.schedulers import make_scheduler
    from wan.streaming import streamer_of
    from wan.t5 import T5TextEncoder, byte_tokenizer
    from wan.vae import WanVAE

    out_path = Path(args.out or "bench/out/offload_video.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.triton:
        import wan_triton
        wan_triton.patch()
    smoke = args.smoke_cpu  # the same flow on the tiny model on the CPU (tests); no cap, no GPU figures
    dev = "cpu" if smoke else "cuda"
    total = 0 if smoke else torch.cuda.get_device_properties(0).total_memory
    _set_cap(args.cap, total)  # before anything is built: every phase runs under it
    base = get_config("tiny") if smoke else T2V_A14B
    (w, h), frames, steps = ((128, 128), 5, args.video_steps) if smoke else ((1280, 720), args.frame_num,
                                                                              args.video_steps)
    ts = make_scheduler("unipc", steps, base.sample_shift, "cpu", base.num_train_timesteps).timesteps
    half = steps // 2
    boundary = (float(ts[half - 1]) + float(ts[half])) / 2 / base.num_train_timesteps
    cfg = dataclasses.replace(base, boundary=boundary)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_layers=args.layers))
    res = dict(gpu="cpu (smoke)" if smoke else torch.cuda.get_device_name(0), total_gb=_gb(total), cap_gb=args.cap,
               torch=torch.__version__,
               triton=args.triton, ring=args.ring, layers=cfg.dit.num_layers, size=f"{w}*{h}", frame_num=frames,
               steps=steps, timesteps=[int(t) for t in ts], boundary=boundary, official_boundary=base.boundary,
               phases={})
    print(f"cap {args.cap:g} GB of {_gb(total):.1f}; {steps} steps {res['timesteps']}, boundary {boundary:.4f} "
          f"(official {base.boundary}) -> {half} high-noise + {steps - half} low-noise", flush=True)

    _reset_peak()
    t0 = time.perf_counter()
    # random umT5-xxl: initialised on the GPU (fast; 11 GB fits the cap), then moved to the CPU where it runs
    t5 = T5TextEncoder.from_config(cfg, device=dev, dtype=cfg.t5_dtype, seed=0,
                                   tokenizer=byte_tokenizer(cfg.t5.text_len))
    t5.model.to("cpu")
    if not smoke:
        torch.cuda.empty_cache()
    vae = WanVAE.from_config(cfg.vae, device=dev, dtype=torch.float32, seed=0)
    low = build_streamable_expert(cfg.dit, dev, torch.bfloat16, seed=1)
    high = build_streamable_expert(cfg.dit, dev, torch.bfloat16, seed=2)
    pipe = WanT2V(cfg, t5, vae, low, high, device=dev, t5_cpu=True)
    pipe._warn_if_cut = lambda what, text: None  # the byte tokenizer stands in for umT5's
    handles = pipe.enable_block_streaming(ring=args.ring, allow_cpu=smoke)  # the CPU smoke run: the flow only
    if not smoke:
        torch.cuda.empty_cache()
    _phase(res, "build", t0)
    res["host_ram"] = pipe.host_ram_choice.mode
    res["pinned_gb"] = _gb(sum(x.host_bytes for x in handles))
    print("build", res["phases"]["build"], f"pinned {res['pinned_gb']:.1f} GB", flush=True)

    marks = {}
    enc, dec = pipe.encode_text, pipe.vae.decode

    def encode_text(prompts):  # T5 phase (on the CPU), timed per call
        _sync()
        t = time.perf_counter()
        out = enc(prompts)
        _sync()
        marks.setdefault("t5_calls", []).append(time.perf_counter() - t)
        if len(marks["t5_calls"]) == 2:  # both prompts done: the DiT phase starts here
            res["phases"]["t5"] = dict(s=sum(marks["t5_calls"]), **_peaks(), host_rss_gb=_host_status("VmRSS"))
            _reset_peak()
        return out

    def decode(z, progress=False):  # the DiT phase ends where the decode starts
        _sync()
        res["phases"]["denoise"] = dict(**_peaks(), host_rss_gb=_host_status("VmRSS"))
        _reset_peak()
        t = time.perf_counter()
        v = dec(z, progress=progress)
        _phase(res, "decode", t)
        return v

    pipe.encode_text, pipe.vae.decode = encode_text, decode
    prompt = "a red fox runs through fresh snow at dawn, cinematic, 4k"
    try:
        video = pipe.generate(prompt, size=(w, h), frame_num=frames, sampling_steps=steps, seed=0, offload_model=False,
                              progress=True)
        tm = pipe.last_timings
        res.update(ok=True, experts=tm.experts, step_s=tm.steps, text_encode_s=tm.text_encode, decode_s=tm.decode,
                   total_s=tm.total, video_shape=list(video.shape), finite=bool(torch.isfinite(video).all()))
        res["phases"]["denoise"]["s"] = tm.denoise
        del video
    except torch.cuda.OutOfMemoryError as err:
        res.update(ok=False, oom=str(err).splitlines()[0][:300])
        print("OOM:", res["oom"], flush=True)
    res["fits"] = all(ph.get("peak_reserved_gb", 0) <= args.cap for ph in res["phases"].values())
    if res.get("ok"):
        med = statistics.median(res["step_s"])
        res["projected_40_step_s"] = res["text_encode_s"] + 40 * med + res["decode_s"]
        res["projection"] = "PROJECTED: T5 + 40 x median measured step + decode (not a 40-step run)"
        res["median_step_s"] = med
        s0 = streamer_of(high)
        res["h2d_streamed_gb"] = _gb(sum(streamer_of(m).stats.bytes for m in (high, low)))
        res["copies"] = s0.stats.copies
    res["host_peak_rss_gb"] = _host_status("VmHWM")

    if args.reload_blocks:
        n = min(args.reload_blocks, cfg.dit.num_layers)
        try:
            res["reload"] = time_reload(low, cfg.dit, n, args.tmp, device=dev)
        except OSError as err:
            res["reload"] = dict(error=str(err)[:300])
        print("reload", res["reload"], flush=True)
    _set_cap(None, total)

    print(f"\n{res['gpu']} under a {args.cap:g} GB cap | {cfg.name} {w}x{h}x{frames}, {steps} steps "
          f"{res.get('experts')} (boundary {boundary:.3f}) | block streaming ring {args.ring}, host RAM "
          f"{res['host_ram']} ({res['pinned_gb']:.1f} GB pinned)")
    print(f"{'phase':<10}{'time s':>9}{'alloc GB':>10}{'resv GB':>9}{'host RSS GB':>12}")
    for name, ph in res["phases"].items():
        print(f"{name:<10}{ph.get('s', math.nan):>9.1f}{ph.get('peak_alloc_gb', math.nan):>10.1f}"
              f"{ph.get('peak_reserved_gb', math.nan):>9.1f}{ph.get('host_rss_gb', math.nan):>12.1f}")
    if res.get("ok"):
        print(f"steps s: {', '.join(f'{x:.2f}' for x in res['step_s'])} (median {res['median_step_s']:.2f}) | "
              f"T5 on CPU {res['text_encode_s']:.1f} s | decode {res['decode_s']:.1f} s | fits the cap: {res['fits']}")
        print(f"40-step video, PROJECTED from the measured step: {res['projected_40_step_s']:.0f} s "
              f"(= {res['text_encode_s']:.1f} + 40 x {res['median_step_s']:.2f} + {res['decode_s']:.1f})")
    print(f"host peak RSS {res['host_peak_rss_gb']:.1f} GB")
    r = res.get("reload")
    if r and "error" not in r:
        label = f"EXTRAPOLATED from {r['blocks']} blocks" if r["extrapolated"] else "measured"
        print(f"host-RAM-low switch ({label}): re-read {r['gb']:.2f} GB cold {r['cold_s']:.2f} s "
              f"({r['cold_gbps']:.1f} GB/s), warm {r['warm_s']:.2f} s ({r['warm_gbps']:.1f} GB/s), evict "
              f"{r['evict_s']:.2f} s -> one {r['expert_blocks']}-block expert: {r['switch_cold_s']:.0f} s cold, "
              f"{r['switch_warm_s']:.0f} s warm; bit-identical {r['equal']}")
    out_path.write_text(json.dumps(res, indent=2))
    print(f"wrote {out_path}")
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
