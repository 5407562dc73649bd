"""`python -m bench.bench_offload --video`: the whole 720p pipeline under one GPU cap, with its own
host memory measured and bounded (bench/_host.py).

    --weights bf16|fp8      the experts' block linears (fp8: e4m3 expert files, written once into
                            --tmp by wan_triton.fp8_files.write_fp8_folder, re-used by later runs)
    --host_ram auto|high|low  both experts' blocks in host memory, or the active one's only (low
                            re-reads the other from its files at the switch; needs files: fp8)
    --t5 gpu-release|cpu    the text encoder on the GPU, freed after encoding (the 24 GB preset), or
                            on the CPU

Phases (GPU peaks allocated/reserved under the cap, host RSS at the end of each): build (T5, VAE,
experts: random weights, the blocks built one at a time), T5 (prompt + negative), denoise (4 steps
at 1280x720x81 across the expert switch: the boundary is moved so that 2 steps use each expert),
decode (fp32). Then, with the cap lifted, one step of the high-noise expert resident on the GPU
(same inputs as the streamed one): seconds per step streamed vs resident, and whether the two
outputs are equal bit for bit. The host peak (sampled RSS, its anonymous and file-backed parts,
VmHWM) is printed after every phase and written to the JSON as the run goes, so a run that is
stopped still leaves its figures.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._host import GB, HostGuard, fs_type, status_gb

T5_GB = 11.4        # umT5-XXL in bf16
BASE_GB = 6.0       # the process: torch, CUDA libraries and context, the VAE's frames (0.9 GB x 2), slack


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peaks(cuda: bool) -> dict:
    if not cuda:
        return dict(peak_alloc_gb=0.0, peak_reserved_gb=0.0)
    return dict(peak_alloc_gb=torch.cuda.max_memory_allocated() / GB,
                peak_reserved_gb=torch.cuda.max_memory_reserved() / GB)


def _reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def expert_block_bytes(dit, weights: str) -> int:
    """Host bytes of one expert's blocks in `weights` (bf16, or fp8: e4m3 linears + fp32 scales)."""
    from wan.dit import WanModel
    from wan_triton.fp8 import BLOCK_LINEARS

    with torch.device("meta"):
        blk = WanModel(dataclasses.replace(dit, num_layers=1)).blocks[0]
    lin = {f"{p}.weight" for p in BLOCK_LINEARS}
    n = 0
    for name, p in blk.named_parameters():
        if weights == "fp8" and name in lin:
            n += p.numel() + p.shape[0] * 4
        else:
            n += p.numel() * 2
    return n * dit.num_layers


def write_random_fp8_experts(cfg, folder: Path, device) -> dict:
    """Both experts with random weights (the streamable build's values) as fp8 expert folders under
    `folder` (high_noise_model/, low_noise_model/), one block on the device at a time; folders that
    exist already are re-used. Returns {label: (folder, seconds to write)}."""
    from wan.offload import random_blocks, random_expert_shell
    from wan_triton.fp8_files import write_fp8_folder

    out = {}
    for label, sub, seed in (("high", cfg.high_noise_checkpoint, 2), ("low", cfg.low_noise_checkpoint, 1)):
        dst = folder / sub
        t0 = time.perf_counter()
        if not (dst / "config.json").is_file():
            model = random_expert_shell(cfg.dit, device, torch.bfloat16, seed)

            def items(model=model, seed=seed):
                for k, v in model.state_dict().items():
                    if not k.startswith("blocks."):
                        yield k, v
                for i, blk in random_blocks(model, device, torch.bfloat16, seed):
                    for k, v in blk.state_dict().items():
                        yield f"blocks.{i}.{k}", v
                    blk.to("meta")  # the block is written: free the device

            raw = {"_class_name": "WanModel", **cfg.dit.to_dict()}
            write_fp8_folder(dst, raw, items(), compute_device=device, source={"random": seed})
            del model
        out[label] = (dst, time.perf_counter() - t0)
    return out


def _files(folders: dict):
    from wan.hostmem import ExpertFiles
    from wan_triton.fp8_files import load_fp8, load_fp8_without_blocks

    return ExpertFiles(folders["high"][0], folders["low"][0], lambda f, progress=False: load_fp8(f),
                       load_fp8_without_blocks, None, kind="fp8")


def run_video(args, set_cap) -> int:
    """--video (module docstring)."""
    guard = HostGuard.start(args.host_limit_gb)
    try:
        return _run_video(args, set_cap, guard)
    finally:
        guard.stop()


def _run_video(args, set_cap, guard) -> int:
    from wan.configs import T2V_A14B, get_config
    from wan.offload import build_streamable_expert, enable_pipeline_streaming, load_experts_for_streaming
    from wan.pipeline import WanT2V
    from wan.schedulers import make_scheduler
    from wan.streaming import streamer_of
    from wan.t5 import T5TextEncoder, byte_tokenizer
    from wan.vae import WanVAE

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    smoke = args.smoke_cpu  # the same flow on the tiny model on the CPU (tests); no cap, no GPU figures
    cuda = not smoke
    dev = "cuda" if cuda else "cpu"
    out_path = Path(args.out or "bench/out/offload_video.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.tmp or "bench/out/tmp")
    if args.triton:
        import wan_triton
        wan_triton.patch()
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    base = get_config("tiny") if smoke else T2V_A14B
    (w, h), frames, steps = ((128, 128), 5, args.video_steps) if smoke else ((1280, 720), args.frame_num,
                                                                              args.video_steps)
    ts = make_scheduler("unipc", steps, base.sample_shift, "cpu", base.num_train_timesteps).timesteps
    half = steps // 2
    boundary = (float(ts[half - 1]) + float(ts[half])) / 2 / base.num_train_timesteps
    cfg = dataclasses.replace(base, boundary=boundary)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_layers=args.layers))
    one = expert_block_bytes(cfg.dit, args.weights)
    res = dict(gpu="cpu (smoke)" if smoke else torch.cuda.get_device_name(0), total_gb=total / GB, cap_gb=args.cap,
               torch=torch.__version__, triton=args.triton, ring=args.ring, layers=cfg.dit.num_layers,
               size=f"{w}*{h}", frame_num=frames, steps=steps, timesteps=[int(t) for t in ts], boundary=boundary,
               official_boundary=base.boundary, weights=args.weights, host_ram_asked=args.host_ram, t5=args.t5,
               expert_blocks_gb=one / GB, phases={})

    def save():
        res["host"] = guard.report()
        out_path.write_text(json.dumps(res, indent=2))

    # what the host must hold: the blocks (both experts, or one with host RAM low), the T5 on the CPU
    held = one * (1 if args.host_ram == "low" else 2)
    need = held + (T5_GB * GB if args.t5 == "cpu" and not smoke else 0) + BASE_GB * GB
    if not guard.check(need, f"{args.weights} blocks of {'one expert' if args.host_ram == 'low' else 'both experts'}"
                             f" ({held / GB:.1f} GB){' + the T5 on the CPU' if args.t5 == 'cpu' else ''} + the process",
                       hint="--host_ram low keeps one expert's blocks; --weights fp8 halves them; --t5 gpu-release",
                       prog="bench_offload"):
        return 2
    if args.weights == "fp8" or args.host_ram == "low":
        tmp.mkdir(parents=True, exist_ok=True)
        kind = fs_type(tmp)
        if kind in ("tmpfs", "ramfs") and not smoke:
            print(f"bench_offload: error: --tmp {tmp} is on {kind}: the expert files would sit in host memory; give a "
                  "folder on a local disk", file=sys.stderr)
            return 2
        free = shutil.disk_usage(tmp).free
        if free < 2.1 * one and not (tmp / "fp8" / cfg.high_noise_checkpoint).is_dir():
            print(f"bench_offload: error: --tmp {tmp} has {free / GB:.1f} GB free; the two experts' files take "
                  f"{2 * one / GB:.1f} GB", file=sys.stderr)
            return 2
    if args.host_ram == "low" and args.weights != "fp8":
        print("bench_offload: error: --host_ram low re-reads an expert from files; this benchmark writes fp8 ones "
              "(--weights fp8); bf16 files of both A14B experts would take 57 GB of disk", file=sys.stderr)
        return 2
    set_cap(args.cap, total)  # before anything is built: every phase runs under it
    print(f"cap {args.cap:g} GB of {total / GB:.1f}; {steps} steps {res['timesteps']}, boundary {boundary:.4f} "
          f"(official {base.boundary}) -> {half} high-noise + {steps - half} low-noise; {args.weights} experts, "
          f"host RAM {args.host_ram}, T5 {args.t5}", flush=True)

    _reset(cuda)
    t0 = time.perf_counter()
    if args.weights == "fp8":  # written once; later runs re-use them (the conversion is not a phase of a video)
        folders = write_random_fp8_experts(cfg, tmp / "fp8", dev)
        res["fp8_files"] = {k: dict(folder=str(v[0]), write_s=v[1]) for k, v in folders.items()}
        print("fp8 expert files", res["fp8_files"], flush=True)
        _reset(cuda)
        t0 = time.perf_counter()
    # random umT5-xxl, initialised on the device; --t5 cpu moves it to the CPU where it runs
    t5 = T5TextEncoder.from_config(cfg, device=dev, dtype=cfg.t5_dtype, seed=0,
                                   tokenizer=byte_tokenizer(cfg.t5.text_len))
    if args.t5 == "cpu":
        t5.model.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    vae = WanVAE.from_config(cfg.vae, device=dev, dtype=torch.float32, seed=0)
    if args.weights == "fp8":
        files = _files(folders)
        low, high, choice = load_experts_for_streaming(files, args.host_ram)
        pipe = WanT2V(cfg, t5, vae, low, high, device=dev, t5_cpu=args.t5 == "cpu", t5_release=args.t5 != "cpu")
        pipe.expert_files = files
        handles = enable_pipeline_streaming(pipe, ring=args.ring, choice=choice, allow_cpu=smoke)
    else:
        low = build_streamable_expert(cfg.dit, dev, torch.bfloat16, seed=1)
        high = build_streamable_expert(cfg.dit, dev, torch.bfloat16, seed=2)
        pipe = WanT2V(cfg, t5, vae, low, high, device=dev, t5_cpu=args.t5 == "cpu", t5_release=args.t5 != "cpu")
        handles = pipe.enable_block_streaming(ring=args.ring, host_ram=args.host_ram, allow_cpu=smoke)
    if cuda:
        torch.cuda.empty_cache()
    pipe._warn_if_cut = lambda what, text: None  # the byte tokenizer stands in for umT5's
    _sync()
    res["phases"]["build"] = dict(s=time.perf_counter() - t0, **_peaks(cuda), host_rss_gb=status_gb()["VmRSS"])
    _reset(cuda)
    res["host_ram"] = pipe.host_ram_choice.mode
    res["host_ram_reason"] = pipe.host_ram_choice.reason
    res["pinned_gb"] = sum(x.host_bytes for x in handles) / GB
    print("build", res["phases"]["build"], f"blocks in host memory {res['pinned_gb']:.1f} GB; {guard.line()}",
          flush=True)
    save()

    marks = {}
    enc, dec = pipe.encode_text, pipe.vae.decode

    def encode_text(prompts):  # T5 phase, timed per call (the release happens right after the second)
        _sync()
        t = time.perf_counter()
        out = enc(prompts)
        _sync()
        marks.setdefault("t5_calls", []).append(time.perf_counter() - t)
        if len(marks["t5_calls"]) == 2:
            res["phases"]["t5"] = dict(s=sum(marks["t5_calls"]), **_peaks(cuda), host_rss_gb=status_gb()["VmRSS"])
            _reset(cuda)
        return out

    def decode(z, progress=False):  # the DiT phase ends where the decode starts
        _sync()
        res["phases"]["denoise"] = dict(**_peaks(cuda), host_rss_gb=status_gb()["VmRSS"])
        _reset(cuda)
        t = time.perf_counter()
        v = dec(z, progress=progress)
        _sync()
        res["phases"]["decode"] = dict(s=time.perf_counter() - t, **_peaks(cuda), host_rss_gb=status_gb()["VmRSS"])
        _reset(cuda)
        return v

    pipe.encode_text, pipe.vae.decode = encode_text, decode
    prompt = "a red fox runs through fresh snow at dawn, cinematic, 4k"
    try:
        video = pipe.generate(prompt, size=(w, h), frame_num=frames, sampling_steps=steps, seed=0, offload_model=False,
                              progress=True)
        tm = pipe.last_timings
        res.update(ok=True, experts=tm.experts, step_s=tm.steps, text_encode_s=tm.text_encode, decode_s=tm.decode,
                   total_s=tm.total, video_shape=list(video.shape), finite=bool(torch.isfinite(video).all()),
                   t5_released=bool(pipe.text_encoder.released))
        res["phases"]["denoise"]["s"] = tm.denoise
        del video
    except torch.cuda.OutOfMemoryError as err:
        res.update(ok=False, oom=str(err).splitlines()[0][:300])
        print("OOM:", res["oom"], flush=True)
    res["fits"] = all(ph.get("peak_reserved_gb", 0) <= args.cap for ph in res["phases"].values())
    hs, ls = streamer_of(high), streamer_of(low)
    res["switch_reload_s"] = ls.stats.reload_s  # host RAM low: the low-noise expert read at the switch
    res["ledger_peak_gb"] = pipe.host_ledger.peak / GB  # the streamers' host buffers at their most
    res["one_expert_held_gb"] = max(hs.blocks_bytes, ls.blocks_bytes) / GB  # one expert's buffers (aligned tensors)
    if res.get("ok"):
        med = statistics.median(res["step_s"])
        res["projected_40_step_s"] = res["text_encode_s"] + 40 * med + res["decode_s"]
        res["projection"] = "PROJECTED: T5 + 40 x median measured step + decode (not a 40-step run)"
        res["median_step_s"] = med
        res["h2d_streamed_gb"] = (hs.stats.bytes + ls.stats.bytes) / GB
    print(f"video done; {guard.line()}", flush=True)
    save()
    set_cap(None, total)
    if res.get("ok") and args.resident_step:
        res["resident"] = resident_step(pipe, cfg, w, h, frames, dev, cuda, args.weights, files if args.weights == "fp8"
                                        else None, res["step_s"][1] if len(res["step_s"]) > 1 else res["step_s"][0])
        print("resident", res["resident"], flush=True)
        save()
    _print_table(res, guard, args)
    save()
    print(f"wrote {out_path}")
    return 0 if res.get("ok") else 1


def resident_step(pipe, cfg, w, h, frames, dev, cuda, weights, files, streamed_s) -> dict:
    """The high-noise expert resident on the device (cap lifted): one step (cond + uncond) on the
    inputs of a step, timed, against the same step streamed; outputs compared bit for bit."""
    from bench.bench_offload import step
    from wan.offload import park_all, switch_experts
    from wan_triton.fp8_files import load_fp8

    gen = torch.Generator(device=dev).manual_seed(7)
    z, f, hh, ww = pipe.latent_shape(w, h, frames)
    x = torch.randn(1, z, f, hh, ww, device=dev, generator=gen)
    ctx_c = [torch.randn(12, cfg.dit.text_dim, device=dev, generator=gen).to(torch.bfloat16)]
    ctx_u = [torch.randn(20, cfg.dit.text_dim, device=dev, generator=gen).to(torch.bfloat16)]
    t = torch.tensor([950], device=dev)
    sl = pipe.seq_len((z, f, hh, ww))
    high, low = pipe.high_noise_model, pipe.low_noise_model
    switch_experts(high, low, dev)  # host RAM low: the high-noise expert is read back (not timed)
    s_stream, c1, u1 = step(high, x, ctx_c, ctx_u, t, sl)  # the kernels are warm from the video (same shapes)
    park_all(high, low)
    if weights == "fp8":
        res_model = load_fp8(files.high, device=dev)
    else:
        from wan.streaming import streamer_of
        res_model = streamer_of(high).remove(dev)
    s_res, c2, u2 = step(res_model, x, ctx_c, ctx_u, t, sl)
    equal = bool(torch.equal(c1, c2) and torch.equal(u1, u2))
    return dict(streamed_s=s_stream, resident_s=s_res, overhead_pct=100 * (s_stream / s_res - 1),
                video_high_step_s=streamed_s, outputs_equal=equal,
                resident_peak_alloc_gb=_peaks(cuda)["peak_alloc_gb"])


def _print_table(res, guard, args) -> None:
    print(f"\n{res['gpu']} under a {args.cap:g} GB cap | {res['size']}x{res['frame_num']}, {res['steps']} steps "
          f"{res.get('experts')} (boundary {res['boundary']:.3f}) | {res['weights']} experts, block streaming ring "
          f"{args.ring}, host RAM {res['host_ram']} ({res['pinned_gb']:.1f} GB of blocks held at the start; ledger "
          f"peak {res.get('ledger_peak_gb', math.nan):.1f} GB), T5 {res['t5']}")
    print(f"{'phase':<10}{'time s':>9}{'alloc GB':>10}{'resv GB':>9}{'host RSS GB':>12}")
    for name, ph in res["phases"].items():
        print(f"{name:<10}{ph.get('s', math.nan):>9.1f}{ph.get('peak_alloc_gb', math.nan):>10.1f}"
              f"{ph.get('peak_reserved_gb', math.nan):>9.1f}{ph.get('host_rss_gb', math.nan):>12.1f}")
    if res.get("ok"):
        print(f"steps s: {', '.join(f'{x:.2f}' for x in res['step_s'])} (median {res['median_step_s']:.2f}; the "
              f"switch's re-read {res['switch_reload_s']:.1f} s is inside step {res['steps'] // 2 + 1}) | T5 "
              f"{res['text_encode_s']:.1f} s | decode {res['decode_s']:.1f} s | fits the cap: {res['fits']}")
        print(f"40-step video, PROJECTED from the measured step: {res['projected_40_step_s']:.0f} s")
    r = res.get("resident")
    if r:
        print(f"one step of the high-noise expert: streamed {r['streamed_s']:.2f} s, resident {r['resident_s']:.2f} s "
              f"({r['overhead_pct']:+.1f} %), outputs bit-identical: {r['outputs_equal']}")
    print(guard.line())


def add_video_args(ap) -> None:
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp8"), help="--video: the experts' weights")
    ap.add_argument("--host_ram", default="auto", choices=("auto", "high", "low"),
                    help="--video: both experts' blocks in host memory, or the active one's (low: fp8 files)")
    ap.add_argument("--t5", default="gpu-release", choices=("gpu-release", "cpu"),
                    help="--video: the text encoder on the GPU, freed after encoding, or on the CPU")
    ap.add_argument("--no-resident-step", dest="resident_step", action="store_false",
                    help="--video: skip the resident step of the high-noise expert after the video")
