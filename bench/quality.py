"""The quality gate: how far a lossy mode moves the videos of the trained demo model (docs/quality.md).

    python -m bench.quality --device cpu --seeds 0 --out bench/out/quality         # every built-in mode
    python -m bench.quality --device cuda --seeds 0,1 --out bench/out/quality_h100  # the real fp8 kernels
    python -m bench.quality --modes fp8-linears,sanity --prompts 2 --steps 10       # some modes, a short run

It samples the model exactly (the pipeline as built: bf16 autocast, the official precision) and with
each mode, on the same prompts and seeds, and reports per mode against the exact videos: PSNR and
SSIM of the decoded uint8 frames (what the MP4 holds), the relative error of the final latents, the
transformer-block calls per video and the share of them the mode saved. LPIPS: see NO_LPIPS.

A mode is `Mode(name, apply, lossy=True, note="")`: `apply(pipe)` changes the pipeline (swaps layers,
the attention backend, a method) and returns the function that puts it back. A new lossy mode plugs
in by writing its `apply`; nothing in the gate changes:

    def my_cache(pipe):
        handle = install_my_cache(pipe)
        return handle.remove
    rows = judge(pipe, [Mode("my cache", my_cache)], PROMPTS, seeds=(0,))

Block calls are counted by forward hooks on every transformer block of both experts, attached after
`apply` (so they see whatever blocks the mode left in place); forwards saved = 1 - mode / exact.

Built-in modes (`builtin_modes(device)`, keys for --modes in BUILTIN): the fp32 floor (not lossy: how
far the exact bf16 run is from fp32), fp8 linears, fp8 attention, both (the real kernels on a GPU
that has them; on the CPU an emulation that rounds where the kernels round, named "emulation"),
the VAE decode in bf16 (the DiT exact), and a deliberately bad sanity mode (every other step reuses
the previous step's velocity).
Writes <out>.json (header and rows) and <out>.md (header and table); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from wan import attention as att
from wan.configs import DEMO_CKPT_DIR, get_config
from wan.pipeline import WanT2V
from wan.video import video_to_uint8
from wan_triton import fp8, fp8_attention
from wan_triton.kernels.quant_fp8 import E4M3_MAX, FP8_DTYPE
from wan_triton.metrics import psnr_uint8, rel_err

__all__ = ["Mode", "Row", "ModeUnavailable", "judge", "builtin_modes", "BUILTIN", "PROMPTS", "NO_LPIPS",
           "ssim_uint8", "markdown_table", "fp32_floor", "fp8_linears", "fp8_attention_mode", "fp8_both",
           "skip_odd_steps", "vae_bf16", "attention_fp8_emulated"]

log = logging.getLogger("bench.quality")

# eight captions in the demo set's grammar (bench/demo_data.py): every colour, shape, motion and background
PROMPTS = ("a red circle bouncing on a black background",
           "a blue square moving right on a gray background",
           "a green triangle rotating on a striped background",
           "a yellow circle moving up on a checkered background",
           "a magenta square moving left on a black background",
           "a cyan triangle moving down on a gray background",
           "a red triangle bouncing on a checkered background",
           "a blue circle moving left on a striped background")
NO_LPIPS = "LPIPS: not available (no pretrained net without downloads); PSNR/SSIM only"


class ModeUnavailable(RuntimeError):
    """A mode cannot run on this machine (its row says why)."""


@dataclass(frozen=True)
class Mode:
    """One way of running the pipeline. `apply(pipe)` changes it and returns the undo function."""
    name: str
    apply: Callable[[WanT2V], Callable[[], None]]
    lossy: bool = True
    note: str = ""


@dataclass(frozen=True)
class Row:
    """A mode against the exact run, averaged over the videos (prompt x seed)."""
    mode: str
    lossy: bool
    note: str
    videos: int
    identical: int            # videos whose frames equal the exact ones bit for bit (left out of the mean PSNR)
    psnr_db: float            # mean over the other videos of the frames' PSNR (inf: all identical)
    psnr_min_db: float        # the worst video
    ssim: float               # mean SSIM (Gaussian 11 x 11, sigma 1.5, per channel and frame)
    latent_rel_err: float     # mean ||z_mode - z_exact|| / ||z_exact|| of the final latents
    block_calls: float        # transformer-block calls per video (both experts)
    forwards_saved: float     # 1 - block_calls / the exact run's
    seconds: float            # wall time per video, denoise + decode (not a speed figure)
    skipped: str = ""         # why the mode did not run ("" when it ran)


@dataclass(frozen=True)
class Video:
    latents: torch.Tensor     # final latents, float32 on the CPU
    frames: torch.Tensor      # [F, H, W, 3] uint8
    block_calls: int
    seconds: float


# ------------------------------------------------------------------ metrics

def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, L 255) of two
    [F, H, W, 3] uint8 stacks, per channel and frame, float64, valid windows only."""
    x, y = (t.permute(0, 3, 1, 2).double() for t in (a, b))           # [F, 3, H, W]
    c, g = x.shape[1], _gauss()
    wh, ww = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wh, groups=c), ww, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean().item()


# ------------------------------------------------------------------ sampling

def _count_block_calls(pipe) -> tuple[list, list]:
    """Forward hooks on every transformer block of both experts: ([count], handles)."""
    count, handles = [0], []

    def hook(*_):
        count[0] += 1

    for model in (pipe.high_noise_model, pipe.low_noise_model):
        for blk in model.blocks:
            handles.append(blk.register_forward_hook(hook))
    return count, handles


@torch.no_grad()
def sample(pipe, prompt: str, seed: int, gen_kw: dict) -> Video:
    """One video: final latents, uint8 frames (what save_video writes), block calls, wall time."""
    count, handles = _count_block_calls(pipe)
    t0 = time.perf_counter()
    try:
        z = pipe.generate(prompt, seed=seed, progress=False, return_latents=True, offload_model=False, **gen_kw)
        video = pipe.vae.decode(z.unsqueeze(0))[0]
    finally:
        for h in handles:
            h.remove()
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return Video(z.float().cpu(), video_to_uint8(video), count[0], time.perf_counter() - t0)


def _run(pipe, runs, gen_kw, label: str) -> list[Video]:
    out = []
    for i, (prompt, seed) in enumerate(runs):
        out.append(sample(pipe, prompt, seed, gen_kw))
        log.info("[%s] video %d/%d (%s, seed %d): %.1f s", label, i + 1, len(runs), prompt, seed, out[-1].seconds)
    return out


def _row(mode: Mode, got: list[Video], exact: list[Video]) -> Row:
    psnrs = [psnr_uint8(g.frames, e.frames) for g, e in zip(got, exact)]
    finite = [p for p in psnrs if not math.isinf(p)]
    calls = statistics.fmean(g.block_calls for g in got)
    calls_exact = statistics.fmean(e.block_calls for e in exact)
    return Row(mode=mode.name, lossy=mode.lossy, note=mode.note, videos=len(got), identical=len(psnrs) - len(finite),
               psnr_db=statistics.fmean(finite) if finite else math.inf, psnr_min_db=min(psnrs),
               ssim=statistics.fmean(ssim_uint8(g.frames, e.frames) for g, e in zip(got, exact)),
               latent_rel_err=statistics.fmean(rel_err(g.latents, e.latents) for g, e in zip(got, exact)),
               block_calls=calls, forwards_saved=1.0 - calls / calls_exact if calls_exact else 0.0,
               seconds=statistics.fmean(g.seconds for g in got))


EXACT = Mode("exact", lambda pipe: (lambda: None), lossy=False, note="the reference")


def judge(pipe, modes, prompts=PROMPTS, seeds=(0,), *, size=None, frame_num=None, steps=None,
          solver: str = "unipc") -> list[Row]:
    """Sample every (prompt, seed) exactly once, then with each mode (applied, sampled, undone), and
    compare. Returns the exact run's row first, then one row per mode (`skipped` says why one did not run)."""
    cfg = pipe.config
    gen_kw = dict(size=size or cfg.default_size, frame_num=frame_num or cfg.frame_num,
                  sampling_steps=steps or cfg.sample_steps, sample_solver=solver)
    runs = [(p, s) for p in prompts for s in seeds]
    exact = _run(pipe, runs, gen_kw, "exact")
    rows = [_row(EXACT, exact, exact)]
    for mode in modes:
        try:
            undo = mode.apply(pipe)
        except ModeUnavailable as why:
            rows.append(_not_run(mode, str(why)))
            continue
        try:
            got = _run(pipe, runs, gen_kw, mode.name)
        except Exception as err:  # noqa: BLE001 - a mode that fails on this model is a row, not the end of the gate
            rows.append(_not_run(mode, f"failed: {type(err).__name__}: {_first_line(err)}"))
            continue
        finally:
            undo()
        rows.append(_row(mode, got, exact))
    return rows


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _not_run(mode: Mode, why: str) -> Row:
    log.warning("[%s] not run: %s", mode.name, why)
    nan = math.nan
    return Row(mode.name, mode.lossy, mode.note, 0, 0, nan, nan, nan, nan, nan, nan, nan, skipped=why)


# ------------------------------------------------------------------ built-in modes

def _swap(obj, name: str, value) -> Callable[[], None]:
    """Set obj.name = value; the returned function restores exactly what was there (an instance or
    module attribute, or none: then the class's shows again)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)
    return undo


def _undo_all(undos) -> Callable[[], None]:
    def undo():
        for u in reversed(undos):
            u()
    return undo


def _attention_fp32(q, k, v, k_lens=None, out_dtype=None, backend=None):
    """softmax(q k^T / sqrt(D)) v in float32 (the floor's attention; the official path casts to bf16)."""
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(*(u.float().transpose(1, 2) for u in (q, k, v)), attn_mask=mask)
    return o.transpose(1, 2).to(out_dtype or q.dtype)


def fp32_floor(pipe) -> Callable[[], None]:
    """Everything the exact run does in bf16 (the autocast GEMMs, attention) in float32 instead: the
    autocast dtype is the config's param_dtype, and wan.dit calls wan.attention.attention by module
    attribute; TF32 off. Needs fp32 weights (a checkpoint as stored; else ModeUnavailable)."""
    dtypes = {p.dtype for m in (pipe.high_noise_model, pipe.low_noise_model) for p in m.parameters()}
    if dtypes != {torch.float32}:
        raise ModeUnavailable(f"the fp32 floor needs fp32 DiT weights; these are {sorted(map(str, dtypes))}")
    return _undo_all([_swap(pipe, "config", pipe.config.replace(param_dtype=torch.float32)),
                      _swap(att, "attention", _attention_fp32),
                      _set_flag(torch.backends.cuda.matmul, "allow_tf32", False),
                      _set_flag(torch.backends.cudnn, "allow_tf32", False)])


def _set_flag(obj, name: str, value) -> Callable[[], None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def fp8_linears(pipe) -> Callable[[], None]:
    """wan_triton.fp8 on both experts, the bf16 layers kept so that the undo is exact. On a GPU with
    fp8 products: the real path (torch._scaled_mm, Triton activation quantization). On the CPU:
    Fp8Linear's emulation (the same e4m3 values, fp32 products). A GPU without fp8: ModeUnavailable."""
    dev = pipe.device
    native, why = fp8.fp8_support(dev)
    if dev.type == "cuda" and not native:
        raise ModeUnavailable(f"{why} (the CPU runs the emulation: --device cpu)")
    models = (pipe.high_noise_model, pipe.low_noise_model)
    for m in models:
        fp8.quantize_model(m, progress=False, keep_original=True, log_line=False)

    def undo():
        for m in models:
            fp8.dequantize_model(m)
    return undo


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already scaled into range) to e4m3 (nearest even, saturated at 448), as fp32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float()


def _per_tensor(x: torch.Tensor, subtract_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.attn_quant_fp8's formula: (e4m3 values of (x - m) * s as fp32, descale 1 / s), s = 448 / max|x - m|,
    m the per-(batch, channel) mean over the tokens when subtract_mean."""
    x = x.float()
    if subtract_mean:
        x = x - x.mean(dim=1, keepdim=True)
    a = x.abs().amax()
    scale = torch.where(a > 0, E4M3_MAX / a.clamp_min(1e-30), torch.ones_like(a))
    return _e4m3(x * scale), 1.0 / scale


def attention_fp8_emulated(q, k, v, k_lens=None):
    """What the fp8 backend (wan_triton.fp8_attention: cuDNN fp8 SDPA, Hopper) computes, in torch ops:
    q, k - mean(k), v per-tensor e4m3; S = q8 k8^T (fp32) x descales / sqrt(D); P = exp(S - rowmax)
    stored as e4m3(448 P) / 448; O = (P8 v8) x descale_v / rowsum(P); O rounded to e4m3 with scale
    1 / descale_v (the Hopper output). Assumed (cuDNN's internals are not public): the row sum comes
    from the unrounded P, and one tile per row (the kernel's online softmax rescales P per key tile)."""
    qq, dq = _per_tensor(q)
    kk, dk = _per_tensor(k, subtract_mean=True)
    vv, dv = _per_tensor(v)
    s = torch.einsum("bihd,bjhd->bhij", qq, kk) * (dq * dk / math.sqrt(q.shape[-1]))
    if k_lens is not None:
        keep = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = _e4m3(p * fp8_attention.P_SCALE) / fp8_attention.P_SCALE
    o = torch.einsum("bhij,bjhd->bihd", p8, vv) * dv / p.sum(dim=-1).transpose(1, 2)[..., None]
    return (_e4m3(o / dv) * dv).to(q.dtype)


EMULATED = "fp8-emulation"


def fp8_attention_mode(pipe) -> Callable[[], None]:
    """The fp8 attention backend: the real one (cuDNN fp8 SDPA) on a GPU that runs it (another GPU:
    ModeUnavailable); on the CPU the emulation above, registered as a lossy backend for the run."""
    dev = pipe.device
    if dev.type == "cuda":
        fp8_attention.register()
        why = att.unavailable_reason(fp8_attention.NAME, dev)
        if why:
            raise ModeUnavailable(why)
        prev = att.set_backend(fp8_attention.NAME)
        return lambda: att.set_backend(prev)
    att.register_backend(EMULATED, attention_fp8_emulated, lossy=True, opaque=False,
                         note="fp8 attention emulated in torch ops (bench/quality.py)")
    prev = att.set_backend(EMULATED)

    def undo():
        att.set_backend(prev)
        att.unregister_backend(EMULATED)
    return undo


def fp8_both(pipe) -> Callable[[], None]:
    undo_lin = fp8_linears(pipe)
    try:
        undo_att = fp8_attention_mode(pipe)
    except ModeUnavailable:
        undo_lin()
        raise
    return _undo_all([undo_lin, undo_att])


def skip_odd_steps(pipe) -> Callable[[], None]:
    """Sanity mode (deliberately bad): every other step reuses the previous step's guided velocity
    without running the model (half the block calls saved, the schedule's error left uncorrected)."""
    state = {"step": 0, "v": None}
    generate, guided = pipe.generate, pipe._guided

    def fresh_generate(*a, **kw):
        state.update(step=0, v=None)
        return generate(*a, **kw)

    def reusing_guided(*a, **kw):
        i = state["step"]
        state["step"] += 1
        if i % 2 == 1 and state["v"] is not None:
            return state["v"]
        state["v"] = guided(*a, **kw)
        return state["v"]

    return _undo_all([_swap(pipe, "generate", fresh_generate), _swap(pipe, "_guided", reusing_guided)])


def vae_bf16(pipe) -> Callable[[], None]:
    """The VAE decode in bf16 (issue #34's 720p decode speed-up): a bf16 copy of the VAE replaces
    the fp32 one for the run (WanVAE runs in its parameter dtype, fp32 out); the undo puts the
    original object back, so no fp32 weight is rounded. Only the decode changes: the latents stay
    exact (latent rel. err 0), the frames carry the loss."""
    if pipe.vae is None:
        raise ModeUnavailable("this pipeline has no VAE")
    return _swap(pipe, "vae", copy.deepcopy(pipe.vae).to(torch.bfloat16))


def _fp8_names(device) -> tuple[str, str, str, str]:
    """(linears name, its note, attention name, its note) for what runs on `device`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ("fp8 linears", "torch._scaled_mm, Triton activation quantization (--fp8)",
                "fp8 attention", "cuDNN fp8 SDPA (--attention fp8)")
    return ("fp8 linears (emulation)", "CPU emulation: the kernels' e4m3 values, fp32 products, scales and bias "
                                       "in fp32, bf16 out",
            "fp8 attention (emulation)", "CPU emulation: torch ops rounding q/k/v, P and O to e4m3 where cuDNN does")


def builtin_modes(device, keys=None) -> list[Mode]:
    """Today's modes, named for what runs on `device` (the real kernels, or the CPU emulation);
    `keys`: a subset of BUILTIN, in its order."""
    lin, lin_note, attn, attn_note = _fp8_names(device)
    modes = {"floor": Mode("fp32 (floor: bf16 vs fp32)", fp32_floor, lossy=False,
                           note="the exact run is bf16; this row is how far that is from fp32"),
             "fp8-linears": Mode(lin, fp8_linears, note=lin_note),
             "fp8-attention": Mode(attn, fp8_attention_mode, note=attn_note),
             "fp8-both": Mode(f"{lin} + {attn}", fp8_both,
                              note="both of the above" + (", CPU emulation" if "emulation" in lin else "")),
             "vae-bf16": Mode("VAE decode in bf16", vae_bf16,
                              note="the DiT exact; the VAE's weights and activations bf16 (official: fp32)"),
             "sanity": Mode("skip every other step (sanity)", skip_odd_steps,
                            note="deliberately bad: odd steps reuse the previous velocity")}
    return [modes[k] for k in BUILTIN if keys is None or k in keys]


# the --modes keys, in table order
BUILTIN = ("floor", "fp8-linears", "fp8-attention", "fp8-both", "vae-bf16", "sanity")


# ------------------------------------------------------------------ report

def _f(x: float, fmt: str) -> str:
    if math.isnan(x):
        return "-"
    return "inf" if math.isinf(x) else format(x, fmt)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| mode | lossy | videos | PSNR dB (mean / worst) | SSIM | latent rel. err | block calls per video | "
             "forwards saved | s per video | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lossy = "yes" if r.lossy else "no"
        if r.skipped:
            lines.append(f"| {r.mode} | {lossy} | 0 | not run: {r.skipped} | | | | | | {r.note} |")
            continue
        same = f" ({r.identical} identical)" if r.identical and r.identical < r.videos else ""
        lines.append(f"| {r.mode} | {lossy} | {r.videos} | {_f(r.psnr_db, '.2f')} / {_f(r.psnr_min_db, '.2f')}{same} "
                     f"| {_f(r.ssim, '.4f')} | {_f(r.latent_rel_err, '.2e')} | {r.block_calls:.0f} | "
                     f"{r.forwards_saved:.0%} | {r.seconds:.1f} | {r.note} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI

def _parse_args(argv):
    ap = argparse.ArgumentParser(description="The quality gate: lossy modes against the exact run (docs/quality.md).")
    ap.add_argument("--ckpt_dir", default=str(DEMO_CKPT_DIR), help="checkpoint folder (default: the demo model, "
                                                                   "wan/demo_model)")
    ap.add_argument("--task", default="demo", help="its model size (default: demo)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="all", help=f"comma-separated, from {', '.join(BUILTIN)}; or all")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("--size", default=None, help="W*H (default: the task's)")
    ap.add_argument("--frame_num", type=int, default=None, help="frames (default: the task's)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the task's)")
    ap.add_argument("--solver", default="unipc")
    ap.add_argument("--out", default="bench/out/quality", help="output stem: <out>.json and <out>.md")
    return ap.parse_args(argv)


def _check_args(args) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(mode keys, seeds), or ValueError with the one line to print."""
    keys = BUILTIN if args.modes == "all" else tuple(k.strip() for k in args.modes.split(",") if k.strip())
    bad = [k for k in keys if k not in BUILTIN]
    if bad or not keys:
        raise ValueError(f"unknown mode {', '.join(bad) or repr(args.modes)}; choose from {', '.join(BUILTIN)} or all")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"--prompts must be 1 to {len(PROMPTS)}, got {args.prompts}")
    if not (Path(args.ckpt_dir) / "high_noise_model").is_dir():
        raise ValueError(f"no checkpoint at {args.ckpt_dir} (expected its high_noise_model/ folder; the demo model "
                         "ships in wan/demo_model once trained: bench/train_demo.py)")
    get_config(args.task)  # KeyError naming the tasks
    return keys, seeds


def _header(args, pipe, seeds, seconds: float) -> str:
    cfg, dev = pipe.config, pipe.device
    gpu = f" {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    return (f"{cfg.name} ({args.ckpt_dir}), {dev}{gpu}, torch {torch.__version__}; {args.size or cfg.default_size}, "
            f"{args.frame_num or cfg.frame_num} frames, {args.steps or cfg.sample_steps} steps ({args.solver}), "
            f"{args.prompts} prompts x seeds {list(seeds)}; {seconds:.0f} s. {NO_LPIPS}.")


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="In (CPU|CUDA) autocast, but the target dtype is not supported")
    try:
        keys, seeds = _check_args(args)
    except (ValueError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    device = torch.device(args.device)
    pipe = WanT2V.from_pretrained(args.ckpt_dir, get_config(args.task), device=device, init_on_cpu=False)
    rows = judge(pipe, builtin_modes(device, keys), PROMPTS[:args.prompts], seeds, size=args.size,
                 frame_num=args.frame_num, steps=args.steps, solver=args.solver)
    head = _header(args, pipe, seeds, time.perf_counter() - t0)
    text = head + "\n\n" + markdown_table(rows) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(dict(header=head, rows=[asdict(r) for r in rows]), indent=1))
    log.info("wrote %s.{json,md}", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
