"""Train the demo model (docs/demo_model.md): the Wan 2.2 T2V architecture at the `demo` preset's
size, on procedural clips of coloured shapes (bench/demo_data.py), written in the official layout.

    python -m bench.train_demo --out runs/demo --device cpu                   # the CPU recipe
    python -m bench.train_demo --out runs/demo --device cpu --resume          # go on after a stop
    python -m bench.train_demo --out $OUT/run --device cuda --recipe gpu --deadline_s 420
    cp -r runs/demo/demo_model/. wan/demo_model/ && cp runs/demo/demo_loss.png docs/
    python -m bench.demo_card --log runs/demo/train_log.json                 # docs/demo_model.md
    python -m bench.demo_data --sample --out docs/demo_strip.png             # the README's strip

Stages, each resumable (a checkpoint every --ckpt_every steps and at every stage's end, in
<out>/state.pt; `--resume` goes on from it, bit-identical on the same machine, because every random
draw comes from (seed, stage, step) and not from a running generator):

  1. vae: the Wan2.1-architecture VAE as an autoencoder (L1 + MSE reconstruction from mu, with a
     little noise on the latents), on rendered clips; then its latent statistics are folded into
     its two 1x1 convs (conv1 rows of mu, conv2 columns) so that the official per-channel mean/std
     normalise its latents to ~N(0, 1).
  2. encode: the training and held-out clips to normalised latents, their captions to umT5 features
     (the text encoder keeps fixed random weights: the DiT learns to read them).
  3. dit: both experts with flow matching under the official shift (12) and boundary (0.875):
     s ~ U(0, 1), sigma = shift s / (1 + (shift - 1) s), x_t = (1 - sigma) x0 + sigma noise,
     target noise - x0, t = 1000 sigma; the high-noise expert learns sigma >= 0.875, the low-noise
     one below, each on its own batch every step. Captions are dropped to "" with p = 0.1 (the
     unconditional branch of classifier-free guidance; the preset's negative prompt is "").
  4. export: <out>/demo_model/ (official layout, fp32), <out>/demo_loss.png, <out>/train_log.json
     (recipe, command, steps, wall time per stage, losses, held-out loss, sizes).

`--deadline_s` bounds the wall time: after a stage's first 30 steps its step count is re-planned to
fit its share of what is left (the plan is saved, so a resumed run keeps it), and the train log
records the steps that ran, so the run can be repeated without a deadline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.demo_data import SPLIT_SEEDS, observe, parse_caption, render_clips
from wan import attention
from wan.configs import DEMO
from wan.dit import WanModel
from wan.pipeline import WanT2V
from wan.t5 import T5TextEncoder
from wan.vae import ResidualBlock, RMSNorm, WanVAE
from wan.video import video_to_uint8

MAX_BYTES = 20 * 10 ** 6      # the shipped weights, all files together
STAGES = ("vae", "dit", "done")


@dataclass(frozen=True)
class Recipe:
    vae_steps: int = 300
    vae_batch: int = 8
    vae_frames: int = 17         # whole clips: trained on 9 frames (3 latent), the decoder's error grew
                                 # from L1 0.10 to 0.25 over frames 9-17 of a 17-frame video (2026-12-07)
    vae_lr: float = 2e-3
    latent_noise: float = 0.1    # decoder input noise, relative to mu's std
    object_gain: float = 10.0    # reconstruction weight 1 + gain x saturation (the objects)
    dit_steps: int = 2000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    clips: int = 2000            # training clips (rendered, encoded once)
    heldout: int = 64            # held-out clips (the other split's seed)
    caption_drop: float = 0.1
    warmup: int = 50
    size: int = 64
    frames: int = 17


RECIPES = {"cpu": Recipe(),
           "gpu": Recipe(vae_steps=3000, vae_batch=16, dit_steps=8000, dit_batch=64, dit_lr=6e-4, clips=16000,
                         heldout=256, warmup=200)}


# ------------------------------------------------------------------ helpers

def gen(device, seed: int, *key: int) -> torch.Generator:
    """A generator for one random draw, seeded from (seed, key...): resuming redraws the same values."""
    h = seed
    for k in key:
        h = (h * 1_000_003 + k + 1) % (2 ** 61 - 1)
    return torch.Generator(device=device).manual_seed(h)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10 % of the peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def sigma_of(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The official shift of the flow schedule: sigma = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def s_boundary(cfg) -> float:
    """The unshifted s where sigma reaches the boundary: the high-noise expert trains on s >= this."""
    b, k = cfg.boundary, cfg.sample_shift
    return b / (k - (k - 1) * b)


def build_vae(device, seed: int) -> WanVAE:
    """The demo VAE, trainable: convs He-normal (N(0, 2 / fan_in)) with zero biases, RMSNorm gains 1, and
    the last conv of every residual branch zero (each block starts as its shortcut). PyTorch's default
    conv init (gain 1/sqrt(3) per conv, random biases) let the input's signal fade to ~1e-2 of the biases
    through the stages, and training settled on the mean frame (measured: stuck even on 4 images)."""
    torch.manual_seed(seed)
    vae = WanVAE(DEMO.vae)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, RMSNorm):
                m.gamma.fill_(1.0)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()))
                m.bias.zero_()
        for m in vae.modules():
            if isinstance(m, ResidualBlock):
                m.residual[6].weight.zero_()
    return vae.to(device).train().requires_grad_(True)


def build_experts(device, seed: int) -> dict:
    """Both experts with the official init (zero head), fp32, trainable."""
    return {name: WanModel.from_config(DEMO.dit, device=device, dtype=torch.float32, seed=seed + k, zero_head=True)
            .train().requires_grad_(True) for k, name in ((11, "high"), (12, "low"))}


def text_encoder(device, seed: int) -> T5TextEncoder:
    """The fixed random umT5 encoder, drawn on the CPU (a GPU draws other values) and then moved."""
    return T5TextEncoder.from_config(DEMO, device="cpu", dtype=torch.float32, seed=seed + 7).to(device)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------ state

class Run:
    """The training state of one output folder: models, optimizers, stage, step, log, plan."""

    def __init__(self, out: Path, recipe: Recipe, seed: int, device):
        self.out, self.recipe, self.seed, self.device = out, recipe, seed, torch.device(device)
        self.vae = build_vae(self.device, seed)
        self.experts = build_experts(self.device, seed)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
        self.dit_opt = {k: torch.optim.AdamW(m.parameters(), lr=recipe.dit_lr, weight_decay=0.01)
                        for k, m in self.experts.items()}
        self.stage, self.step = "vae", 0
        self.log = {"vae": [], "dit": [], "heldout": []}
        self.plan = {"vae": recipe.vae_steps, "dit": recipe.dit_steps}
        self.wall = {"vae": 0.0, "encode": 0.0, "dit": 0.0, "export": 0.0}
        self.folded = None   # the latent statistics folded into the VAE (mean, std per channel)

    @property
    def path(self) -> Path:
        return self.out / "state.pt"

    def save(self) -> None:
        state = dict(recipe=asdict(self.recipe), seed=self.seed, stage=self.stage, step=self.step, log=self.log,
                     plan=self.plan, wall=self.wall, folded=self.folded, vae=self.vae.state_dict(),
                     vae_opt=self.vae_opt.state_dict(), experts={k: m.state_dict() for k, m in self.experts.items()},
                     dit_opt={k: o.state_dict() for k, o in self.dit_opt.items()})
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a stop while writing leaves the previous checkpoint whole

    def load(self) -> None:
        st = torch.load(self.path, map_location=self.device, weights_only=False)
        if st["recipe"] != asdict(self.recipe) or st["seed"] != self.seed:
            raise SystemExit(f"{self.path} was made with another recipe or seed; resume with the same flags "
                             f"(saved: seed {st['seed']}, {st['recipe']})")
        self.vae.load_state_dict(st["vae"])
        self.vae_opt.load_state_dict(st["vae_opt"])
        for k, m in self.experts.items():
            m.load_state_dict(st["experts"][k])
            self.dit_opt[k].load_state_dict(st["dit_opt"][k])
        self.stage, self.step, self.log = st["stage"], st["step"], st["log"]
        self.plan, self.wall, self.folded = st["plan"], st["wall"], st["folded"]


class Stop(Exception):
    """--stop_after reached (the state is saved): run again with --resume to go on."""


class Clock:
    """Wall time against an optional deadline (a stage may use `share` of what is left) and the
    optional number of steps this invocation may run (--stop_after)."""

    def __init__(self, deadline_s: float | None, stop_after: int | None = None):
        self.t0, self.deadline = time.perf_counter(), deadline_s
        self.steps_left = stop_after

    def tick(self, run: "Run") -> None:
        """Count one step; at --stop_after, save and stop."""
        if self.steps_left is None:
            return
        self.steps_left -= 1
        if self.steps_left <= 0:
            run.save()
            raise Stop(f"stopped by --stop_after at {run.stage} step {run.step}; saved {run.path}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget(self, share: float) -> float:
        return math.inf if self.deadline is None else max(0.0, (self.deadline - self.elapsed()) * share)


def replan(run: Run, stage: str, done: int, sec_per_step: float, budget_s: float) -> None:
    """Cut the stage's planned steps to what fits its time budget (once, after 30 steps)."""
    if math.isinf(budget_s):
        return
    fits = done + int(budget_s / max(sec_per_step, 1e-6))
    if fits < run.plan[stage]:
        print(f"[{stage}] deadline: {run.plan[stage]} -> {fits} steps ({sec_per_step:.3f} s/step)", flush=True)
        run.plan[stage] = max(fits, done + 1)


# ------------------------------------------------------------------ stage 1: the VAE

def object_weight(x: torch.Tensor, gain: float) -> torch.Tensor:
    """1 + gain x saturation, per pixel ([B, 1, F, H, W]): the shapes are the only saturated pixels and cover
    ~5 % of a frame, so an unweighted loss is met first by the background alone."""
    rgb = (x + 1) / 2
    mx = rgb.amax(1, keepdim=True)
    return 1 + gain * (mx - rgb.amin(1, keepdim=True)) / mx.clamp_min(1e-3)


def vae_loss(vae: WanVAE, x: torch.Tensor, g: torch.Generator, latent_noise: float, gain: float) -> torch.Tensor:
    """Object-weighted L1 + MSE of the reconstruction from mu plus noise of `latent_noise` x mu's std (so the
    decoder tolerates the small errors of generated latents). A plain autoencoder: with a KL term the small
    model spent its latents on noise (measured: it stalled at the mean frame)."""
    mu = vae.conv1(vae.encoder(x))[:, :vae.z_dim]
    eps = torch.randn(mu.shape, generator=g, device=mu.device)
    y = vae.decoder(vae.conv2(mu + latent_noise * mu.detach().std() * eps))
    w = object_weight(x, gain)
    return ((y - x).abs() * w).mean() + ((y - x).pow(2) * w).mean()


@torch.no_grad()
def vae_eval(vae: WanVAE, x: torch.Tensor) -> tuple[float, float]:
    """(L1 over all pixels, L1 over the object's pixels) of the plain reconstruction of held-out clips."""
    vae.eval()
    y = vae.decoder(vae.conv2(vae.conv1(vae.encoder(x))[:, :vae.z_dim]))
    vae.train()
    err = (y - x).abs()
    obj = (object_weight(x, 1.0) > 1.3).expand_as(err)
    return err.mean().item(), (err[obj].mean().item() if obj.any() else 0.0)


def train_vae(run: Run, clock: Clock, ckpt_every: int, log_every: int, share: float = 0.3) -> None:
    r, dev = run.recipe, run.device
    t_stage = t_win = time.perf_counter()
    win0 = run.step
    held, _ = render_clips(range(8), SPLIT_SEEDS["heldout"], r.frames, r.size, dev)
    held = held[:, :, :r.vae_frames]
    while run.step < run.plan["vae"]:
        i = run.step
        idx = range(i * r.vae_batch, (i + 1) * r.vae_batch)  # a fresh stream of training clips
        x, _ = render_clips(idx, SPLIT_SEEDS["train"], r.frames, r.size, dev)
        x = x[:, :, :r.vae_frames]
        for group in run.vae_opt.param_groups:
            group["lr"] = lr_at(i, run.plan["vae"], r.vae_lr, r.warmup)
        loss = vae_loss(run.vae, x, gen(dev, run.seed, 1, i), r.latent_noise, r.object_gain)
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.vae.parameters(), 1.0)
        run.vae_opt.step()
        run.step += 1
        run.log["vae"].append([run.step, round(loss.item(), 6)])
        clock.tick(run)
        if run.step == win0 + 30:
            replan(run, "vae", run.step, (time.perf_counter() - t_win) / 30, clock.budget(share))
        if run.step % log_every == 0 or run.step == run.plan["vae"]:
            l1, l1_obj = vae_eval(run.vae, held)
            run.log.setdefault("vae_eval", []).append([run.step, round(l1, 5), round(l1_obj, 5)])
            print(f"[vae] step {run.step}/{run.plan['vae']} loss {loss.item():.4f}; held-out L1 {l1:.4f}, on the "
                  f"objects {l1_obj:.4f}; {(time.perf_counter() - t_win) / (run.step - win0):.2f} s/step", flush=True)
        if run.step % ckpt_every == 0:
            run.wall["vae"] += time.perf_counter() - t_stage
            t_stage = time.perf_counter()
            run.save()
    run.wall["vae"] += time.perf_counter() - t_stage


@torch.no_grad()
def fold_latent_stats(run: Run, clips: int = 64) -> None:
    """Measure mu's per-channel mean m and std s on training clips and fold them into conv1 (mu rows)
    and conv2 (input columns) so that (mu - MEAN) / STD with the official constants is ~N(0, 1) and the
    decoder sees what it was trained on:  mu' = mu S/s + (M - m S/s),  conv2'(mu') = conv2(mu)."""
    vae, r, dev = run.vae.eval(), run.recipe, run.device
    x, _ = render_clips(range(10 ** 6, 10 ** 6 + clips), SPLIT_SEEDS["train"], r.frames, r.size, dev)
    mu = torch.cat([vae.conv1(vae.encoder(x[i:i + 8]))[:, :vae.z_dim] for i in range(0, clips, 8)])
    m = mu.transpose(0, 1).reshape(vae.z_dim, -1).mean(1).double()
    s = mu.transpose(0, 1).reshape(vae.z_dim, -1).std(1).double()
    M = torch.tensor(DEMO.vae.mean, dtype=torch.float64, device=dev)
    S = torch.tensor(DEMO.vae.std, dtype=torch.float64, device=dev)
    a = S / s                                      # mu' = a mu + c
    c = M - m * a
    z = vae.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias      # [2z, 2z, 1, 1, 1]
    w1[:z] = (w1[:z].double() * a.view(-1, 1, 1, 1, 1)).float()
    b1[:z] = (b1[:z].double() * a + c).float()
    w2, b2 = vae.conv2.weight, vae.conv2.bias      # [z, z, 1, 1, 1]: mu = (mu' - c) / a
    b2.copy_((b2.double() - (w2.double()[:, :, 0, 0, 0] @ (c / a))).float())
    w2.copy_((w2.double() / a.view(1, -1, 1, 1, 1)).float())
    run.folded = {"mean": m.tolist(), "std": s.tolist()}
    vae.train()
    print(f"[vae] latent statistics folded in: mean {m.abs().max():.3f} max |.|, std {s.min():.3f}..{s.max():.3f}",
          flush=True)


# ------------------------------------------------------------------ stage 2: latents and text features

@torch.no_grad()
def encode_set(run: Run, t5: T5TextEncoder, split: str, count: int, batch: int = 64):
    """(latents [N, 16, F', h, w], contexts [N, text_len, dim] zero-padded as the pipeline pads) of the
    first `count` clips of `split`, with the VAE's official normalisation."""
    vae, r, dev = run.vae.eval(), run.recipe, run.device
    lat, caps = [], []
    for i in range(0, count, batch):
        x, c = render_clips(range(i, min(count, i + batch)), SPLIT_SEEDS[split], r.frames, r.size, dev)
        lat.append(vae._encode_full(x))
        caps += c
    return torch.cat(lat), contexts(t5, caps)


@torch.no_grad()
def contexts(t5: T5TextEncoder, captions: list[str]) -> torch.Tensor:
    """umT5 features of each caption, trimmed to its tokens and zero-padded to text_len (what the DiT's
    text embedding sees in the pipeline)."""
    uniq = sorted(set(captions))
    feats = dict(zip(uniq, t5(uniq)))
    out = torch.zeros(len(captions), t5.text_len, t5.model.config.dim, device=t5.device)
    for i, c in enumerate(captions):
        f = feats[c]
        out[i, :f.shape[0]] = f
    return out


# ------------------------------------------------------------------ stage 3: the two experts

def expert_batch(run: Run, data, expert: str, step: int, batch: int, null_ctx: torch.Tensor, drop: float):
    """(x_t, t, context, target) of one flow-matching batch for one expert."""
    lat, ctx = data
    dev, sb = run.device, s_boundary(DEMO)
    g = gen(dev, run.seed, 3, step, 0 if expert == "high" else 1)
    idx = torch.randint(lat.shape[0], (batch,), generator=g, device=dev)
    x0, c = lat[idx], ctx[idx].clone()
    dropped = torch.rand(batch, generator=g, device=dev) < drop
    c[dropped] = null_ctx
    lo, hi = (sb, 1.0) if expert == "high" else (0.0, sb)
    s = lo + (hi - lo) * torch.rand(batch, generator=g, device=dev)
    sigma = sigma_of(s, DEMO.sample_shift)
    noise = torch.randn(x0.shape, generator=g, device=dev)
    sg = sigma.view(-1, 1, 1, 1, 1)
    return (1 - sg) * x0 + sg * noise, sigma * DEMO.num_train_timesteps, c, noise - x0


@torch.no_grad()
def heldout_loss(run: Run, data, null_ctx) -> dict:
    """Flow-matching loss of each expert on the held-out clips with fixed noise and timesteps."""
    out = {}
    for name, m in run.experts.items():
        m.eval()
        xt, t, c, target = expert_batch(run, data, name, -1, data[0].shape[0], null_ctx, 0.0)
        out[name] = round(sum(F.mse_loss(m(xt[i:i + 64], t[i:i + 64], c[i:i + 64]), target[i:i + 64]).item()
                              * len(t[i:i + 64]) for i in range(0, len(t), 64)) / len(t), 6)
        m.train()
    out["mean"] = round((out["high"] + out["low"]) / 2, 6)
    return out


def train_dit(run: Run, train, held, null_ctx, clock: Clock, ckpt_every: int, log_every: int) -> None:
    r = run.recipe
    t_stage = t_win = time.perf_counter()
    win0 = run.step
    while run.step < run.plan["dit"]:
        i, losses = run.step, {}
        lr = lr_at(i, run.plan["dit"], r.dit_lr, r.warmup)
        for name, m in run.experts.items():
            xt, t, c, target = expert_batch(run, train, name, i, r.dit_batch, null_ctx, r.caption_drop)
            loss = F.mse_loss(m(xt, t, c), target)
            opt = run.dit_opt[name]
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            losses[name] = loss.item()
        run.step += 1
        run.log["dit"].append([run.step, round(losses["high"], 6), round(losses["low"], 6)])
        clock.tick(run)
        if run.step == win0 + 30:
            replan(run, "dit", run.step, (time.perf_counter() - t_win) / 30, clock.budget(0.9))
        last = run.step == run.plan["dit"]
        if run.step % log_every == 0 or last:
            print(f"[dit] step {run.step}/{run.plan['dit']} loss high {losses['high']:.4f} low {losses['low']:.4f} "
                  f"lr {lr:.2e} {(time.perf_counter() - t_win) / (run.step - win0):.2f} s/step", flush=True)
        if run.step % ckpt_every == 0 or last:
            h = heldout_loss(run, held, null_ctx)
            run.log["heldout"].append([run.step, h["high"], h["low"]])
            print(f"[dit] held-out loss at step {run.step}: high {h['high']:.4f} low {h['low']:.4f}", flush=True)
            run.wall["dit"] += time.perf_counter() - t_stage
            t_stage = time.perf_counter()
            run.save()
    run.wall["dit"] += time.perf_counter() - t_stage


# ------------------------------------------------------------------ stage 4: export

CHECK_PROMPTS = ("a red circle bouncing on a black background",
                 "a blue square moving right on a gray background",
                 "a green triangle rotating on a striped background",
                 "a yellow circle moving up on a checkered background",
                 "a magenta square moving left on a black background",
                 "a cyan triangle moving down on a gray background",
                 "a red triangle moving down on a striped background",
                 "a blue circle moving left on a checkered background")
DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}


@torch.no_grad()
def prompt_check(folder: Path, device, seeds=(0, 1)) -> dict:
    """Sample the exported model (as wan-generate does) on CHECK_PROMPTS and measure what the frames show
    (bench.demo_data.observe): the share of videos whose object has the prompt's colour, and of the straight
    motions, the share that move the prompt's way (by more than 5 % of the side)."""
    pipe = WanT2V.from_pretrained(folder, DEMO, device=device, init_on_cpu=False)
    rows = []
    for prompt in CHECK_PROMPTS:
        colour, _, motion, _ = parse_caption(prompt)
        for seed in seeds:
            seen = observe(video_to_uint8(pipe.generate(prompt, size="64*64", frame_num=17, seed=seed,
                                                        progress=False)))
            dx, dy = seen.shift if seen.colour else (math.nan, math.nan)
            d = DIRECTIONS.get(motion)
            rows.append(dict(prompt=prompt, seed=seed, colour=seen.colour, colour_ok=seen.colour == colour,
                             area=round(seen.object_area, 4), shift=[round(dx, 3), round(dy, 3)],
                             direction_ok=None if d is None else bool(d[0] * dx + d[1] * dy > 0.05)))
    straight = [r for r in rows if r["direction_ok"] is not None]
    out = dict(colour=sum(r["colour_ok"] for r in rows) / len(rows),
               direction=sum(r["direction_ok"] for r in straight) / max(1, len(straight)), videos=rows)
    print(f"[check] colour right in {out['colour']:.0%} of {len(rows)} videos; direction right in "
          f"{out['direction']:.0%} of {len(straight)} straight motions", flush=True)
    return out


def export(run: Run, held_loss: dict, command: str, dest: Path) -> Path:
    """Write <dest>/demo_model (official layout), <dest>/demo_loss.png, <dest>/train_log.json."""
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    vae = run.vae.to(cpu).eval().requires_grad_(False)
    experts = {k: m.to(cpu).eval().requires_grad_(False) for k, m in run.experts.items()}
    pipe = WanT2V(DEMO, text_encoder(cpu, run.seed), vae, experts["low"], experts["high"], device=cpu)
    dest.mkdir(parents=True, exist_ok=True)
    folder = dest / "demo_model"
    pipe.save_pretrained(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    total = sum(files.values())
    if total > MAX_BYTES:
        raise SystemExit(f"the exported weights take {total / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget")
    WanT2V.from_pretrained(folder, DEMO, device="cpu")  # loads unchanged, as wan-generate will
    plotted = plot_losses(run.log, dest / "demo_loss.png")
    check = prompt_check(folder, run.device, seeds=(0,) if run.device.type == "cpu" else (0, 1))
    run.wall["export"] = time.perf_counter() - t0
    r = run.recipe
    info = dict(recipe=asdict(r), seed=run.seed, device=str(run.device), torch=torch.__version__,
                command=command, steps_run={"vae": run.plan["vae"], "dit": run.plan["dit"]},
                repeat=repeat_command(run), wall_s={k: round(v, 1) for k, v in run.wall.items()},
                wall_total_s=round(sum(run.wall.values()), 1), heldout_loss=held_loss, folded_latent_stats=run.folded,
                params={"dit_expert": n_params(experts["high"]), "vae": n_params(vae),
                        "t5": n_params(pipe.text_encoder.model)},
                bytes=files, bytes_total=total, loss_png=plotted, prompt_check=check, log=run.log)
    (dest / "train_log.json").write_text(json.dumps(info, indent=1))
    print(f"[export] {folder}: {total / 1e6:.1f} MB; held-out loss {held_loss}; "
          f"wall {info['wall_total_s']:.0f} s ({info['wall_s']})", flush=True)
    return folder


def repeat_command(run: Run) -> str:
    """The command that repeats this run's steps without a deadline: the named recipe it is closest to,
    every field that differs as a flag, the steps that ran."""
    base = min(RECIPES, key=lambda n: len(_differences(RECIPES[n], run.recipe)))
    ran = replace(run.recipe, vae_steps=run.plan["vae"], dit_steps=run.plan["dit"])
    flags = " ".join(f"--{k} {v}" for k, v in _differences(RECIPES[base], ran).items())
    return (f"python -m bench.train_demo --out OUT --device {run.device.type} --seed {run.seed} --recipe {base} "
            f"{flags}").strip()


def _differences(a: Recipe, b: Recipe) -> dict:
    return {k: v for k, v in asdict(b).items() if asdict(a)[k] != v}


def smooth(values: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= n:
            acc -= values[i - n]
        out.append(acc / min(i + 1, n))
    return out


def plot_losses(log: dict, path: Path) -> str | None:
    """The loss curves (VAE; each expert's training loss, smoothed, and its held-out loss) as a PNG;
    None when matplotlib is missing (plot later with --plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[export] matplotlib is missing: no loss PNG (python -m bench.train_demo --plot <out> makes it)")
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if log["vae"]:
        steps, rec = zip(*log["vae"])
        a.plot(steps, smooth(list(rec), 20), color="tab:purple")
    a.set(title="VAE reconstruction (L1 + MSE)", xlabel="step", yscale="log")
    if log["dit"]:
        steps, hi, lo = zip(*log["dit"])
        b.plot(steps, smooth(list(hi), 50), color="tab:red", label="high-noise expert (train)")
        b.plot(steps, smooth(list(lo), 50), color="tab:blue", label="low-noise expert (train)")
    if log["heldout"]:
        steps, hi, lo = zip(*log["heldout"])
        b.plot(steps, hi, "o--", color="tab:red", ms=3, label="high-noise (held-out)")
        b.plot(steps, lo, "o--", color="tab:blue", ms=3, label="low-noise (held-out)")
    b.set(title="DiT flow-matching loss", xlabel="step")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------ the command line

def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train the demo model (docs/demo_model.md).")
    ap.add_argument("--out", required=True, help="work folder: state.pt, latents, demo_model/, train_log.json")
    ap.add_argument("--export_to", default=None,
                    help="where demo_model/, demo_loss.png and train_log.json go (default: --out)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="go on from <out>/state.pt")
    ap.add_argument("--deadline_s", type=float, default=None, help="bound the wall time (steps re-planned to fit)")
    ap.add_argument("--vae_share", type=float, default=0.3,
                    help="with --deadline_s: the share of the time left that the VAE stage may use (default 0.3)")
    ap.add_argument("--ckpt_every", type=int, default=200)
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--stop_after", type=int, default=None,
                    help="save and stop after this many training steps in this invocation (go on with --resume)")
    ap.add_argument("--plot", action="store_true", help="only redraw <out>/demo_loss.png from <out>/train_log.json")
    for f in ("vae_steps", "dit_steps", "clips", "vae_batch", "vae_frames", "dit_batch", "heldout", "warmup"):
        ap.add_argument(f"--{f}", type=int, default=None, help="override the recipe's value")
    for f in ("vae_lr", "dit_lr"):
        ap.add_argument(f"--{f}", type=float, default=None, help="override the recipe's value")
    return ap.parse_args(argv)


def recipe_of(args) -> Recipe:
    over = {k: getattr(args, k) for k in ("vae_steps", "dit_steps", "clips", "vae_batch", "vae_frames", "dit_batch",
                                          "heldout", "warmup", "vae_lr", "dit_lr") if getattr(args, k) is not None}
    return replace(RECIPES[args.recipe], **over)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot:
        info = json.loads((out / "train_log.json").read_text())
        print(plot_losses(info["log"], out / "demo_loss.png"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; the shipped weights are fp32
    attention.set_backend("sdpa")  # every device, with a backward
    run = Run(out, recipe_of(args), args.seed, args.device)
    if run.path.exists() and not args.resume:
        raise SystemExit(f"{run.path} exists: pass --resume to go on, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and run.path.exists():
        run.load()
        print(f"resumed {run.path}: stage {run.stage}, step {run.step}", flush=True)
    command = "python -m bench.train_demo " + shlex.join(sys.argv[1:] if argv is None else argv)
    clock = Clock(args.deadline_s, args.stop_after)
    print(f"recipe {run.recipe}; seed {run.seed}; device {run.device}; DiT expert {n_params(run.experts['high']):,} "
          f"params, VAE {n_params(run.vae):,}", flush=True)
    try:
        stages(run, clock, args, command)
    except Stop as stop:
        print(stop, flush=True)
    return 0


def stages(run: Run, clock: Clock, args, command: str) -> None:
    if run.stage == "vae":
        train_vae(run, clock, args.ckpt_every, args.log_every, args.vae_share)
        fold_latent_stats(run)
        run.stage, run.step = "dit", 0
        run.save()
    t0 = time.perf_counter()
    t5 = text_encoder(run.device, run.seed)
    train = encode_set(run, t5, "train", run.recipe.clips)
    held = encode_set(run, t5, "heldout", run.recipe.heldout)
    null_ctx = contexts(t5, [""])[0]
    run.wall["encode"] += time.perf_counter() - t0
    print(f"[encode] {run.recipe.clips} + {run.recipe.heldout} clips in {time.perf_counter() - t0:.0f} s; latents "
          f"mean {train[0].mean():.3f} std {train[0].std():.3f}", flush=True)
    if run.stage == "dit":
        train_dit(run, train, held, null_ctx, clock, args.ckpt_every, args.log_every)
        run.stage = "done"
        run.save()
    export(run, heldout_loss(run, held, null_ctx), command, Path(args.export_to or args.out))


if __name__ == "__main__":
    raise SystemExit(main())
