"""Multi-GPU benchmark of wan.parallel: Ulysses and CFG-parallel against one GPU, same weights and inputs.

    torchrun --nproc_per_node 2 -m bench.bench_parallel --out bench/out/bench_parallel.json

Parts (--parts, default forward,cfg,a2a), each the median of --runs timed calls after --warmup:
  forward  one 1280x720x81 A14B expert forward: every rank first runs it alone on its own GPU (the
           one-GPU figure), then all ranks run it with Ulysses U = N; speed-up and rel err.
  cfg      the CFG step (cond + uncond forwards + combine): two sequential forwards on one GPU vs
           --cfg_parallel (half of the ranks per branch, one all-gather per step).
  a2a      the all-to-alls of one layer at that size, in isolation: q, k, v, o one by one (the
           official 4) and q/k/v fused into one call + o (what wan.parallel does).
  video    a full generation (random A14B weights, T5, VAE) decoded to uint8 frames. Run it once on
           one GPU with --save_video REF.pt, then under torchrun with --compare_video REF.pt: time
           and PSNR of the decoded frames for --video_modes (cfg, ulysses) against the one-GPU video.

Every rank builds the same random weights from the same seed (checked by a checksum). Timings are
device-synchronised wall times; a parallel figure is the slowest rank's. Rank 0 prints a table and
writes JSON to --out. `--task tiny --device cpu` runs the same code on CPU/gloo as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from wan_triton.metrics import rel_err
from wan.timing import sync as _sync


def _timed(fn, runs, warmup, dev, barrier=True):
    """(last output, median seconds, all times); barrier before each call so ranks start together."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        _sync(dev)
        if barrier and dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def _max_over_ranks(x: float, dev) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=dev if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _checksum(model) -> float:
    return sum(p.float().sum().item() for p in list(model.parameters())[:8])


def _maybe_patch(enabled: bool, log) -> bool:
    """Triton kernels when asked (they take the Ulysses shard's token_offset); reference ops, said
    once, where they cannot run."""
    if not enabled:
        return False
    import wan_triton
    try:
        wan_triton.patch()
    except Exception as err:  # noqa: BLE001 - no Triton / no CUDA: reference ops, said once
        log(f"kernels not used: {err}")
        return False
    return True


# ------------------------------------------------------------------ parts

def part_forward(model, inputs, state_sp, args, dev, log):
    from wan.parallel import sequence_parallel

    x, ctx_c, _, t, seq_len = inputs
    U = state_sp.ulysses_size
    seq_len = math.ceil(seq_len / U) * U
    call = lambda: model(x, t, [ctx_c[0]], seq_len=seq_len)  # noqa: E731
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        ref, t1, _ = _timed(call, args.runs, args.warmup, dev, barrier=False)
        t1 = _max_over_ranks(t1, dev)
        log(f"forward, one GPU: {t1:.3f} s")
        with sequence_parallel(model, state_sp.ulysses):
            out, tn, _ = _timed(call, args.runs, args.warmup, dev)
    tn = _max_over_ranks(tn, dev)
    res = dict(one_gpu_s=t1, parallel_s=tn, ulysses_size=U, speedup=t1 / tn, rel_err=rel_err(out, ref))
    log(f"forward, Ulysses {U}: {tn:.3f} s, speed-up {res['speedup']:.2f}x, rel err {res['rel_err']:.2e}")
    return res


def part_cfg(model, inputs, state_cfg, args, dev, log, warmup):
    from wan.pipeline import cfg_combine

    x, ctx_c, ctx_u, t, seq_len = inputs
    scale = 4.0

    def seq():
        cond = model(x, t, [ctx_c[0]], seq_len=seq_len)[0]
        uncond = model(x, t, [ctx_u[0]], seq_len=seq_len)[0]
        return cfg_combine(uncond, cond, scale)

    def par():
        mine = model(x, t, [(ctx_c if state_cfg.cfg_rank == 0 else ctx_u)[0]], seq_len=seq_len)[0]
        cond, uncond = state_cfg.exchange_cfg(mine)
        return cfg_combine(uncond, cond, scale)

    with torch.autocast(dev.type, dtype=torch.bfloat16):
        ref, t1, _ = _timed(seq, args.runs, warmup, dev, barrier=False)
        t1 = _max_over_ranks(t1, dev)
        log(f"CFG step, one GPU (2 forwards): {t1:.3f} s")
        out, tn, _ = _timed(par, args.runs, warmup, dev)
    tn = _max_over_ranks(tn, dev)
    same = True
    if dist.is_initialized():  # both halves must hold bit-identical velocities
        outs = [torch.empty_like(out) for _ in range(dist.get_world_size())]
        dist.all_gather(outs, out.contiguous())
        same = all(torch.equal(outs[0], o) for o in outs)
    res = dict(one_gpu_s=t1, parallel_s=tn, speedup=t1 / tn, rel_err=rel_err(out, ref), ranks_identical=bool(same))
    log(f"CFG step, --cfg_parallel: {tn:.3f} s, speed-up {res['speedup']:.2f}x, rel err {res['rel_err']:.2e}")
    return res


def part_a2a(config, seq_len, state_sp, args, dev, log):
    """The all-to-alls of one layer at this size (bf16, as under autocast)."""
    from wan.parallel import heads_to_seq, seq_to_heads

    U, u = state_sp.ulysses_size, state_sp.ulysses
    if u is None:
        return {}
    H, D = config.dit.num_heads, config.dit.head_dim
    Ls = math.ceil(seq_len / U)
    g = torch.Generator(dev).manual_seed(1)
    q, k, v = (torch.randn(1, Ls, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    o = torch.randn(1, Ls * U, H // U, D, device=dev, dtype=torch.bfloat16, generator=g)
    n = max(args.a2a_iters, 1)

    def official4():
        for a in (q, k, v):
            seq_to_heads(a, u.group, U)
        heads_to_seq(o, u.group, U)

    def fused():
        stacked = torch.stack([q, k, v], dim=0)
        send = stacked.reshape(3, 1, Ls, U, H // U, D).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=u.group)
        heads_to_seq(o, u.group, U)

    def one():
        seq_to_heads(q, u.group, U)

    res = {}
    for name, fn in (("one_a2a_ms", one), ("layer_4_a2a_ms", official4), ("layer_fused_ms", fused)):
        for _ in range(3):
            fn()
        _sync(dev)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        res[name] = _max_over_ranks((time.perf_counter() - t0) / n * 1e3, dev)
    shard_bytes = q.numel() * q.element_size()
    res["shard_mb"] = shard_bytes / 1e6
    res["one_a2a_gbps"] = shard_bytes * (U - 1) / U / (res["one_a2a_ms"] / 1e3) / 1e9
    res["per_forward_s"] = res["layer_fused_ms"] * config.dit.num_layers / 1e3
    log(f"all-to-all at {Ls * U} tokens: one q shard {res['one_a2a_ms']:.3f} ms ({res['one_a2a_gbps']:.0f} GB/s "
        f"sent per rank), 4 per layer {res['layer_4_a2a_ms']:.3f} ms, fused qkv + o {res['layer_fused_ms']:.3f} ms, "
        f"x{config.dit.num_layers} layers = {res['per_forward_s']:.3f} s per forward")
    return res


def part_video(config, args, dev, state_sp, state_cfg, log, is_main):
    """A full random-weight generation; one GPU saves frames, torchrun compares against them."""
    from wan import parallel
    from wan.pipeline import WanT2V
    from wan.video import video_to_uint8

    from wan_triton.metrics import psnr_uint8

    t0 = time.perf_counter()
    pipe = WanT2V.from_config(config, device=dev, seed=0, offload="none")
    log(f"video: built the pipeline in {time.perf_counter() - t0:.1f} s")
    req = dict(size=args.video_size, frame_num=args.video_frames, sampling_steps=args.video_steps,
               seed=args.seed, offload_model=False, progress=is_main)
    prompt = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
    res = {}
    if state_sp is None:  # one GPU: the reference video
        _sync(dev)
        t0 = time.perf_counter()
        video = pipe.generate(prompt, **req)
        _sync(dev)
        res["one_gpu_s"] = time.perf_counter() - t0
        res["timings"] = pipe.last_timings.summary()
        torch.save({"frames": video_to_uint8(video), "seconds": res["one_gpu_s"], "timings": res["timings"]},
                   args.save_video)
        log(f"video, one GPU: {res['one_gpu_s']:.1f} s ({res['timings']}); frames saved to {args.save_video}")
        return res
    ref = torch.load(args.compare_video) if args.compare_video else None
    for mode in args.video_modes.split(","):
        st = {"cfg": state_cfg, "ulysses": state_sp}[mode]
        if st is None:
            continue
        parallel.apply_to_pipeline(pipe, st)
        _sync(dev)
        dist.barrier()
        t0 = time.perf_counter()
        video = pipe.generate(prompt, **req)
        _sync(dev)
        sec = _max_over_ranks(time.perf_counter() - t0, dev)
        r = dict(seconds=sec, timings=pipe.last_timings.summary())
        if is_main and ref is not None:
            p = psnr_uint8(video_to_uint8(video), ref["frames"])
            r.update(psnr_db=p if math.isfinite(p) else "inf", one_gpu_s=ref["seconds"], speedup=ref["seconds"] / sec)
        res[mode] = r
        log(f"video, {mode} on {st.world} GPUs: {sec:.1f} s" +
            (f", speed-up {r['speedup']:.2f}x, PSNR {r['psnr_db']} dB vs one GPU" if "psnr_db" in r else ""))
    return res


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_parallel", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="forward,cfg,a2a", help="comma list of forward, cfg, a2a, video")
    ap.add_argument("--task", default="t2v-A14B", help="t2v-A14B, or tiny for a CPU smoke run")
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--a2a_iters", type=int, default=20)
    ap.add_argument("--layers", type=int, default=None, help="fewer DiT layers (quick smoke run)")
    ap.add_argument("--no-triton", dest="triton", action="store_false", help="reference ops, no kernels")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--video_size", default="832*480")
    ap.add_argument("--video_frames", type=int, default=81)
    ap.add_argument("--video_steps", type=int, default=40)
    ap.add_argument("--video_modes", default="cfg,ulysses")
    ap.add_argument("--save_video", default="bench/out/video_1gpu.pt", help="one GPU: where the frames go")
    ap.add_argument("--compare_video", default=None, help="torchrun: the one-GPU frames to compare against")
    ap.add_argument("--timeout", type=float, default=1200.0, help="process-group timeout, seconds")
    ap.add_argument("--out", default="bench/out/bench_parallel.json")
    args = ap.parse_args(argv)

    from wan import parallel
    from wan.configs import get_config, parse_size

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"forward", "cfg", "a2a", "video"}
    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    err = None
    if unknown:
        err = f"unknown part(s) {sorted(unknown)}"
    elif world == 1 and parts != ["video"]:
        err = "run under torchrun --nproc_per_node 2 (only --parts video runs on one GPU, to save the reference)"
    elif world > 1 and world % 2:
        err = f"needs an even number of processes (CFG-parallel halves), got {world}"
    elif "video" in parts and world > 1 and args.compare_video and not Path(args.compare_video).is_file():
        err = f"--compare_video {args.compare_video}: no such file (run --parts video on one GPU first)"
    if err:
        print(f"bench_parallel: error: {err}", file=sys.stderr)
        return 2
    config = get_config(args.task)
    if args.layers:
        from dataclasses import replace
        config = config.replace(dit=replace(config.dit, num_layers=args.layers))

    state_sp = state_cfg = None
    if world > 1:
        state_sp = parallel.init_from_env(ulysses_size=world, timeout=args.timeout, device=dev_type)
        state_cfg = parallel.build_state(ulysses_size=world // 2, cfg_parallel=True, device=state_sp.device)
        dev = state_sp.device
    else:
        dev = torch.device(dev_type)
    is_main = state_sp is None or state_sp.is_main
    log = (lambda m: print(f"[bench_parallel] {m}", flush=True)) if is_main else (lambda m: None)
    if config.dit.num_heads % max(world, 1):
        log(f"warning: {world} ranks do not divide {config.dit.num_heads} heads")
    patched = _maybe_patch(args.triton and dev.type == "cuda", log)
    report = dict(world=world, device=str(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu",
                  torch=torch.__version__, task=config.name, size=args.size, frame_num=args.frame_num,
                  runs=args.runs, warmup=args.warmup, triton=patched, parts={})
    try:
        if any(p in parts for p in ("forward", "cfg", "a2a")):
            from ._expert import build_expert, expert_inputs

            w, h = parse_size(args.size)
            t0 = time.perf_counter()
            model = build_expert(dev, layers=args.layers, config=config)
            _sync(dev)
            log(f"built one {config.name} expert ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
                f"bf16) on every rank in {time.perf_counter() - t0:.1f} s")
            sums = [None] * world
            dist.all_gather_object(sums, _checksum(model))
            report["same_weights_on_all_ranks"] = len(set(sums)) == 1
            g = torch.Generator(dev).manual_seed(args.seed)
            inputs = expert_inputs(w, h, args.frame_num, dev, g, config=config)
            report["seq_len"] = inputs[-1]
            if "forward" in parts:
                report["parts"]["forward"] = part_forward(model, inputs, state_sp, args, dev, log)
            if "cfg" in parts:
                warm = 0 if "forward" in parts else args.warmup  # the forward part warmed the same shapes
                report["parts"]["cfg"] = part_cfg(model, inputs, state_cfg, args, dev, log, warm)
            if "a2a" in parts:
                report["parts"]["a2a"] = part_a2a(config, inputs[-1], state_sp, args, dev, log)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if "video" in parts:
            report["parts"]["video"] = part_video(config, args, dev, state_sp, state_cfg, log, is_main)
    finally:
        parallel.destroy(state_sp)
    if is_main:
        print(_table(report))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


def _table(r) -> str:
    rows = ["| measure | one GPU s | parallel s | speed-up | rel err / PSNR |", "|---|---:|---:|---:|---:|"]
    p = r["parts"]
    if "forward" in p:
        f = p["forward"]
        rows.append(f"| {r['size']}x{r['frame_num']} expert forward, Ulysses {f['ulysses_size']} | {f['one_gpu_s']:.3f} | "
                    f"{f['parallel_s']:.3f} | {f['speedup']:.2f}x | {f['rel_err']:.2e} |")
    if "cfg" in p:
        c = p["cfg"]
        rows.append(f"| CFG step (cond+uncond), --cfg_parallel | {c['one_gpu_s']:.3f} | {c['parallel_s']:.3f} | "
                    f"{c['speedup']:.2f}x | {c['rel_err']:.2e} |")
    if "a2a" in p and p["a2a"]:
        a = p["a2a"]
        rows.append(f"| all-to-all per layer (4 / fused), ms | - | {a['layer_4_a2a_ms']:.3f} / {a['layer_fused_ms']:.3f} | "
                    f"- | {a['one_a2a_gbps']:.0f} GB/s |")
    for mode, v in p.get("video", {}).items():
        if isinstance(v, dict) and "seconds" in v:
            rows.append(f"| video {r.get('world')} GPUs, {mode} | {v.get('one_gpu_s', float('nan')):.1f} | "
                        f"{v['seconds']:.1f} | {v.get('speedup', float('nan')):.2f}x | {v.get('psnr_db', '-')} dB |")
    if "one_gpu_s" in p.get("video", {}):
        rows.append(f"| video one GPU (reference saved) | {p['video']['one_gpu_s']:.1f} | - | - | - |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
