"""diffusers' WanTransformer3DModel with and without wan_triton.patch(), against our own patched
`wan` forward: one A14B-shaped expert with random bf16 weights (kept-fp32 modules as
from_pretrained leaves them), one process, same inputs. Seconds per forward (median of --runs
after --warmup, bench_dit's timer), peak memory, rel. err of the patched forward vs the unpatched
one; then a short WanPipeline generation (two random experts, random VAE, random prompt
embeddings) unpatched vs patched from the same seed, with the PSNR of the decoded frames.

    python -m bench.bench_diffusers --size 1280*720 --frame_num 81 --json out.json
    python -m bench.bench_diffusers --smoke        # tiny shapes on the CPU (Triton interpreter): a check, no figures

Needs CUDA (exit 2 otherwise, except --smoke) and `pip install -e ".[diffusers]"`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from wan_triton.metrics import psnr_uint8, rel_err

from .bench_dit import _timed

# A14B expert (transformer/config.json of Wan2.2-T2V-A14B-Diffusers) and a tiny stand-in for --smoke
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)


def _once(fn, runs: int, warmup: int):
    """The CPU stand-in of _timed for --smoke: one call, no figures (None)."""
    return fn(), None, [], None


def random_transformer(cfg: dict, device, seed: int, layers: int | None = None):
    """diffusers WanTransformer3DModel with seeded random weights made directly on `device`:
    bf16, except `_keep_in_fp32_modules` in fp32; the RoPE table computed as diffusers does."""
    from diffusers import WanTransformer3DModel

    cfg = dict(cfg, num_layers=layers or cfg["num_layers"])
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    keep = set(model._keep_in_fp32_modules)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            dtype = torch.float32 if keep.intersection(name.split(".")) else torch.bfloat16
            t = torch.empty(p.shape, dtype=torch.float32, device=device)
            if name.endswith("scale_shift_table"):
                t.normal_(generator=g).div_(p.shape[-1] ** 0.5)
            elif p.dim() >= 2:
                t.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=g)
            elif "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            mod, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(mod) if mod else model, leaf, torch.nn.Parameter(t.to(dtype), False))
        with torch.device("cpu"):  # non-persistent buffers: the real table, not meta
            rope = type(model.rope)(cfg["attention_head_dim"], cfg["patch_size"], model.config.rope_max_seq_len)
        model.rope = rope.to(device)
    return model.eval()


def _latents(width, height, frame_num, device, g, channels=16):
    return torch.randn(1, channels, (frame_num - 1) // 4 + 1, height // 8, width // 8, device=device, generator=g)


def bench_forward(args, device, cfg, timed) -> dict:
    import wan_triton
    from wan.configs import T2V_A14B, TINY as WAN_TINY

    from ._expert import build_expert

    width, height = (int(v) for v in args.size.split("*"))
    g = torch.Generator(device=device).manual_seed(0)
    x = _latents(width, height, args.frame_num, device, g).bfloat16()
    ctx = torch.randn(1, 512, cfg["text_dim"], device=device, generator=g).bfloat16()
    ctx[:, 60:] = 0  # a 60-token prompt, zero-padded to 512 as WanPipeline does
    t = torch.tensor([900], device=device)
    model = random_transformer(cfg, device, seed=1, layers=args.layers)
    res = {"size": args.size, "frame_num": args.frame_num, "layers": len(model.blocks)}

    def fwd():
        with torch.no_grad():
            return model(x, t, ctx, return_dict=False)[0]

    ref, res["unpatched_s"], res["unpatched_runs"], res["unpatched_peak_gb"] = timed(fwd, args.runs, args.warmup)
    wan_triton.reset_kernel_stats()
    wan_triton.patch(model, attention=args.attention, strict=True)
    out, res["patched_s"], res["patched_runs"], res["patched_peak_gb"] = timed(fwd, args.runs, args.warmup)
    wan_triton.unpatch(model)
    res["patched_rel_err"] = rel_err(out.float(), ref.float())
    res["kernel_launches"] = {k: v["launches"] for k, v in wan_triton.kernel_stats().items() if v["launches"]}
    del model, ref, out
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # our own patched wan forward, same video size (bench_dit's setup)
    preset = T2V_A14B if cfg is A14B else WAN_TINY.replace(dit=WAN_TINY.dit.__class__(
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], ffn_dim=cfg["ffn_dim"], freq_dim=cfg["freq_dim"],
        text_dim=cfg["text_dim"], num_heads=cfg["num_attention_heads"], num_layers=cfg["num_layers"]))
    ours = build_expert(device, layers=args.layers, config=preset)
    seq_len = x.shape[2] * x.shape[3] * x.shape[4] // 4
    wan_triton.patch(ours, attention=args.attention, strict=True)

    def wan_fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return ours(x.float(), t, ctx[:, :60], seq_len=seq_len)

    _, res["wan_patched_s"], res["wan_runs"], res["wan_peak_gb"] = timed(wan_fwd, args.runs, args.warmup)
    wan_triton.unpatch(ours)
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if res["patched_s"] is not None:
        res["speedup_vs_unpatched"] = res["unpatched_s"] / res["patched_s"]
        res["patched_vs_wan"] = res["patched_s"] / res["wan_patched_s"]
    return res


def bench_pipeline(args, device, cfg) -> dict:
    """WanPipeline from random parts; prompt embeddings given, so no text encoder is needed."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    import wan_triton

    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8 if cfg is TINY else 96).to(device).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=12.0),
                       transformer=random_transformer(cfg, device, seed=3, layers=args.layers),
                       transformer_2=random_transformer(cfg, device, seed=4, layers=args.layers),
                       boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(v) for v in args.pipe_size.split("*"))
    g = torch.Generator(device=device).manual_seed(5)
    emb = torch.randn(1, 512, cfg["text_dim"], device=device, generator=g).bfloat16()
    neg = torch.randn(1, 512, cfg["text_dim"], device=device, generator=g).bfloat16()

    def generate():
        with torch.no_grad():
            video = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=height, width=width,
                         num_frames=args.pipe_frames, num_inference_steps=args.pipe_steps, guidance_scale=4.0,
                         guidance_scale_2=3.0, generator=torch.Generator(device=device).manual_seed(6),
                         output_type="pt").frames
        return (video.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    ref = generate()
    wan_triton.patch(pipe, attention=args.attention, strict=True)
    out = generate()
    wan_triton.unpatch(pipe)
    return {"pipe_size": args.pipe_size, "pipe_frames": args.pipe_frames, "pipe_steps": args.pipe_steps,
            "frames_shape": list(out.shape), "psnr_db": psnr_uint8(out, ref)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--attention", default="auto", help="wan.attention backend of the patched forwards (fa4 ...)")
    ap.add_argument("--pipe_size", default="832*480")
    ap.add_argument("--pipe_frames", type=int, default=17)
    ap.add_argument("--pipe_steps", type=int, default=4)
    ap.add_argument("--no_pipeline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1; no figures")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("bench_diffusers needs diffusers: pip install -e \".[diffusers]\"", file=sys.stderr)
        return 2
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the kernels on the CPU: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, cfg, timed = torch.device("cpu"), TINY, _once
        args.size, args.frame_num, args.pipe_size, args.pipe_frames, args.pipe_steps = "64*48", 5, "64*48", 5, 2
        args.attention = "sdpa"
    elif not torch.cuda.is_available():
        print("bench_diffusers needs a CUDA GPU (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    else:
        device, cfg, timed = torch.device("cuda"), A14B, _timed
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
           "forward": bench_forward(args, device, cfg, timed)}
    if not args.no_pipeline:
        res["pipeline"] = bench_pipeline(args, device, cfg)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
