"""The demo model's training set: procedural clips of one coloured shape moving over a plain or
textured background, each with a caption. Rendered on demand from a seed, never stored.

    python -m bench.demo_data --out strip.png --count 6          # look at a few clips (a PNG strip)
    python -m bench.demo_data --sample --out docs/demo_strip.png # the shipped model's videos (the README's strip)

A clip is drawn from its (seed, index) alone (`clip_params`), so any subset renders the same on
any machine and in any order; `render` draws a batch of clips on a CPU or a GPU (float32 math;
the two agree to rounding). Caption: "a <colour> <shape> <motion> on a <background> background",
e.g. "a red circle bouncing on a black background".

    colours      red, green, blue, yellow, magenta, cyan (saturated; the backgrounds are grey)
    shapes       circle, square, triangle
    motions      moving left / right / up / down (straight, constant speed), bouncing (diagonal,
                 reflected at the borders), rotating (in place; squares and triangles only)
    backgrounds  black, gray (plain), striped, checkered (grey, low-contrast, soft-edged textures, still)

The vocabulary and grammar are wan.demo_captions' (the CLI's demo prompt comes from there).
Pixels are in [-1, 1] (the VAE's range); shapes are anti-aliased (coverage from a signed distance).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from wan.configs import DEMO, DEMO_CKPT_DIR
from wan.demo_captions import BACKGROUNDS, COLOURS, DEMO_PROMPT, MOTIONS, SHAPES, parse_caption
from wan.demo_captions import caption as caption_of
from wan.pipeline import WanT2V

__all__ = ["COLOURS", "SHAPES", "MOTIONS", "BACKGROUNDS", "ClipParams", "clip_params", "caption", "render",
           "render_clips", "parse_caption", "SPLIT_SEEDS", "Observed", "observe"]

# the training set and the held-out set draw from disjoint seeds of the same distribution
SPLIT_SEEDS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class ClipParams:
    """Everything one clip is drawn from (sizes in units of the frame side, angles in radians)."""
    colour: str
    shape: str
    motion: str
    background: str
    radius: float            # circumradius / side
    start: tuple             # (x, y) centre at frame 0, / side
    velocity: tuple          # (dx, dy) per frame, / side (bouncing: before reflections)
    angle0: float
    spin: float              # radians per frame (rotating only)
    bg_levels: tuple         # two grey levels in [0, 1] (plain backgrounds use the first; textures: low contrast)
    bg_period: float         # texture period, / side
    bg_angle: float          # stripe orientation
    brightness: float        # the object colour's gain (0.85 .. 1)


def _rng(seed: int, index: int) -> torch.Generator:
    # one generator per clip: its parameters do not depend on which other clips are drawn
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 12_345) % (2 ** 62))


def clip_params(index: int, seed: int = 0, frames: int = 17) -> ClipParams:
    """The parameters of clip `index` of the set `seed` (deterministic)."""
    g = _rng(seed, index)

    def u(lo=0.0, hi=1.0) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=g))]

    colour, shape, background = pick(tuple(COLOURS)), pick(SHAPES), pick(BACKGROUNDS)
    motion = pick(MOTIONS if shape != "circle" else MOTIONS[:-1])  # a spinning circle shows nothing
    r = u(0.13, 0.19)
    steps = max(frames - 1, 1)
    angle0, spin, vel = 0.0, 0.0, (0.0, 0.0)
    if motion.startswith("moving"):
        dist = u(0.30, 0.50)                          # how far it travels over the clip
        d = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion.split()[1]]
        lo, hi = r, 1.0 - r
        along = u(lo, hi - dist)                      # start so that it stays inside the frame
        across = u(lo + 0.05, hi - 0.05)
        start_along = along if d[0] + d[1] > 0 else 1.0 - along
        start = (start_along, across) if d[0] else (across, start_along)
        vel = (d[0] * dist / steps, d[1] * dist / steps)
    elif motion == "bouncing":
        speed = u(1.0, 1.5) / steps                   # about one bounce per clip
        theta = pick((0.25, 0.75, 1.25, 1.75)) * math.pi + u(-0.2, 0.2)
        start = (u(r, 1 - r), u(r, 1 - r))
        vel = (speed * math.cos(theta), speed * math.sin(theta))
    else:  # rotating, in place
        start = (u(0.35, 0.65), u(0.35, 0.65))
        spin = pick((-1, 1)) * math.radians(u(50.0, 80.0)) / steps
        angle0 = u(0.0, 2 * math.pi)
    dark = u(0.0, 0.12) if background == "black" else u(0.35, 0.55) if background == "gray" else u(0.1, 0.35)
    light = dark + u(0.12, 0.25)                  # textures: low contrast, so the object stands out
    return ClipParams(colour=colour, shape=shape, motion=motion, background=background, radius=r, start=start,
                      velocity=vel, angle0=angle0, spin=spin, bg_levels=(dark, light), bg_period=u(0.18, 0.3),
                      bg_angle=pick((0.0, 0.5 * math.pi, 0.25 * math.pi, 0.75 * math.pi)), brightness=u(0.85, 1.0))


def caption(p: ClipParams) -> str:
    return caption_of(p.colour, p.shape, p.motion, p.background)


def _reflect(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fold x into [lo, hi] as a ball bouncing between two walls."""
    span = hi - lo
    y = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(y > span, 2 * span - y, y)


def _trajectory(ps: list[ClipParams], frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres [B, F, 2] and angles [B, F] in units of the side."""
    t = torch.arange(frames, dtype=torch.float32, device=device)
    start = torch.tensor([p.start for p in ps], dtype=torch.float32, device=device)
    vel = torch.tensor([p.velocity for p in ps], dtype=torch.float32, device=device)
    r = torch.tensor([p.radius for p in ps], dtype=torch.float32, device=device)[:, None, None]
    c = start[:, None, :] + vel[:, None, :] * t[None, :, None]
    bounce = torch.tensor([p.motion == "bouncing" for p in ps], device=device)[:, None, None]
    c = torch.where(bounce, _reflect(c, r, 1.0 - r), c)
    a0 = torch.tensor([p.angle0 for p in ps], dtype=torch.float32, device=device)
    spin = torch.tensor([p.spin for p in ps], dtype=torch.float32, device=device)
    return c, a0[:, None] + spin[:, None] * t[None, :]


def _circle(qx, qy, r):
    return torch.sqrt(qx * qx + qy * qy) - r


def _square(qx, qy, r):
    return torch.maximum(qx.abs(), qy.abs()) - 0.8 * r


def _triangle(qx, qy, r):
    """Equilateral, apex up (image y points down), circumradius r, inradius r / 2."""
    s3 = math.sqrt(3.0) / 2
    return torch.maximum(torch.maximum(qy, -0.5 * qy - s3 * qx), -0.5 * qy + s3 * qx) - 0.5 * r


# signed distance (units of the side) to each shape, in the shape's own rotated frame
_SDF = {"circle": _circle, "square": _square, "triangle": _triangle}


def _background(ps: list[ClipParams], size: int, device) -> torch.Tensor:
    """[B, 1, 1, H, W] grey levels in [0, 1]."""
    y, x = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                          torch.arange(size, device=device, dtype=torch.float32), indexing="ij")
    x, y = (x + 0.5) / size, (y + 0.5) / size
    lv = torch.tensor([p.bg_levels for p in ps], dtype=torch.float32, device=device)
    dark, light = lv[:, 0, None, None], lv[:, 1, None, None]
    per = torch.tensor([p.bg_period for p in ps], dtype=torch.float32, device=device)[:, None, None]
    ang = torch.tensor([p.bg_angle for p in ps], dtype=torch.float32, device=device)[:, None, None]
    along = x * torch.cos(ang) + y * torch.sin(ang)
    # soft edges (about a pixel and a half at 64 x 64): tanh of a sine, in [0, 1]
    stripes = 0.5 + 0.5 * torch.tanh(3 * torch.sin(2 * math.pi * along / per))
    checks = 0.5 + 0.5 * torch.tanh(3 * torch.sin(math.pi * x / per) * torch.sin(math.pi * y / per) * 2)
    kind = torch.tensor([BACKGROUNDS.index(p.background) for p in ps], device=device)[:, None, None]
    pattern = torch.where(kind == 2, stripes, torch.where(kind == 3, checks, torch.zeros_like(stripes)))
    return (dark + (light - dark) * pattern)[:, None, None]


def render(ps: list[ClipParams], frames: int = 17, size: int = 64, device="cpu") -> torch.Tensor:
    """Clips [B, 3, F, H, W] in [-1, 1], float32, on `device`."""
    device = torch.device(device)
    centre, angle = _trajectory(ps, frames, device)                     # [B, F, 2], [B, F]
    pix = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    dx = pix[None, None, None, :] - centre[:, :, 0, None, None]         # [B, F, 1, W]
    dy = pix[None, None, :, None] - centre[:, :, 1, None, None]         # [B, F, H, 1]
    cos, sin = torch.cos(angle)[:, :, None, None], torch.sin(angle)[:, :, None, None]
    qx, qy = cos * dx + sin * dy, -sin * dx + cos * dy                  # into the shape's frame
    r = torch.tensor([p.radius for p in ps], dtype=torch.float32, device=device)[:, None, None, None]
    sdf = torch.empty(len(ps), frames, size, size, dtype=torch.float32, device=device)
    for name, fn in _SDF.items():  # each clip's own shape only
        idx = torch.tensor([i for i, p in enumerate(ps) if p.shape == name], dtype=torch.long, device=device)
        if len(idx):
            sdf[idx] = fn(qx[idx], qy[idx], r[idx])
    alpha = (0.5 - sdf * size).clamp(0.0, 1.0)[:, None]                # [B, 1, F, H, W]: pixel coverage
    rgb = torch.tensor([[c * p.brightness for c in COLOURS[p.colour]] for p in ps], dtype=torch.float32,
                       device=device)[:, :, None, None, None]
    img = _background(ps, size, device) * (1 - alpha) + rgb * alpha
    return img * 2 - 1


def render_clips(indices, seed: int = 0, frames: int = 17, size: int = 64, device="cpu"):
    """(video [B, 3, F, H, W], captions) of the clips `indices` of the set `seed`."""
    ps = [clip_params(int(i), seed, frames) for i in indices]
    return render(ps, frames, size, device), [caption(p) for p in ps]


# ------------------------------------------------------------------ what a video shows (tests, evaluation)

def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of [..., 3] values in [0, 1]."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.amax(-1), rgb.amin(-1)
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


_HUES = {name: _hue(torch.tensor(rgb)).item() for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Observed:
    """What a clip shows, measured on its uint8 frames."""
    colour: str | None           # the colour name nearest in hue to most saturated pixels (None: none)
    colour_share: float          # share of the saturated pixels that vote for it
    object_area: float           # saturated pixels per frame, as a share of the frame
    centroids: tuple             # (x, y) per frame of the saturated pixels, in units of the side
    background: float            # mean grey level of the other pixels, in [0, 1]
    roughness: float             # mean |difference| of horizontally adjacent pixels, in [0, 1] (noise: ~0.33)

    @property
    def shift(self) -> tuple[float, float]:
        """(dx, dy) of the object from the first frame to the last."""
        (x0, y0), (x1, y1) = self.centroids[0], self.centroids[-1]
        return x1 - x0, y1 - y0


def observe(frames: torch.Tensor, min_saturation: float = 0.45, min_value: float = 0.3) -> Observed:
    """Measure [F, H, W, 3] uint8 frames (what save_video writes, or an MP4 decoded): a pixel is the
    object's when it is saturated ((max - min) / max >= min_saturation and max >= min_value): the
    backgrounds of the set are grey, the objects saturated."""
    x = frames.float() / 255.0
    mx, mn = x.amax(-1), x.amin(-1)
    sat = ((mx - mn) / mx.clamp_min(1e-6) >= min_saturation) & (mx >= min_value)     # [F, H, W]
    rough = (x[:, :, 1:] - x[:, :, :-1]).abs().mean().item()
    bg = x.mean(-1)[~sat].mean().item() if (~sat).any() else math.nan
    f, hgt, wid = sat.shape
    if not sat.any():
        return Observed(None, 0.0, 0.0, ((math.nan, math.nan),) * f, bg, rough)
    hues = _hue(x[sat])
    names = list(_HUES)
    dist = torch.stack([torch.minimum((hues - h).abs(), 360 - (hues - h).abs()) for h in _HUES.values()])
    votes = torch.bincount(dist.argmin(0), minlength=len(names))
    best = int(votes.argmax())
    ys, xs = torch.meshgrid(torch.arange(hgt, dtype=torch.float32), torch.arange(wid, dtype=torch.float32),
                            indexing="ij")
    cents = []
    for m in sat:
        n = m.sum().item()
        cents.append(((xs[m].sum().item() / n + 0.5) / wid, (ys[m].sum().item() / n + 0.5) / hgt) if n else
                     (math.nan, math.nan))
    return Observed(names[best], votes[best].item() / votes.sum().item(), sat.float().mean().item(), tuple(cents),
                    bg, rough)


def _save_strip(path: str, video: torch.Tensor, every: int = 4) -> None:
    """Rows = clips, columns = every `every`-th frame."""
    import imageio.v2 as imageio

    v = ((video[:, :, ::every].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)     # [B, 3, f, H, W]
    v = torch.nn.functional.pad(v, (0, 2, 0, 2), value=255)                            # white gaps
    rows = [torch.cat(list(clip.permute(1, 2, 3, 0)), dim=1) for clip in v]           # each [H, f*W, 3]
    imageio.imwrite(path, torch.cat(rows, dim=0).numpy())


# the README's strip (docs/demo_strip.png): the demo prompt first (wan-generate's default video), then a few others
STRIP_PROMPTS = (DEMO_PROMPT, "a blue square moving down on a gray background",
                 "a green triangle rotating on a striped background",
                 "a yellow circle bouncing on a checkered background")


def sample_strip(path: str, ckpt_dir, prompts, seed: int = 42, steps: int | None = None) -> None:
    """The demo model's videos for `prompts` (one row each, every 4th frame) as a PNG: sampled as
    wan-generate's default does (the demo task's size, frames, steps and guidance; `seed`: its seed)."""
    pipe = WanT2V.from_pretrained(ckpt_dir, DEMO, device="cpu")
    videos = [pipe.generate(p, size=DEMO.default_size, frame_num=DEMO.frame_num, sampling_steps=steps, seed=seed,
                            progress=False) for p in prompts]
    _save_strip(path, torch.stack(videos))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render a few clips of the demo training set as a PNG strip (or, with "
                                             "--sample, the demo model's videos for --prompts).")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--sample", nargs="?", default=None, const=str(DEMO_CKPT_DIR), metavar="CKPT_DIR",
                    help="sample this demo checkpoint instead (no value: the shipped one, wan/demo_model)")
    ap.add_argument("--prompts", nargs="*", default=None,
                    help="with --sample: one row per prompt (default: the demo prompt and three others)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--first", type=int, default=0, help="index of the first clip")
    ap.add_argument("--split", choices=tuple(SPLIT_SEEDS), default="train")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    if args.sample:
        sample_strip(args.out, args.sample, args.prompts or list(STRIP_PROMPTS), args.seed)
        return 0
    video, caps = render_clips(range(args.first, args.first + args.count), SPLIT_SEEDS[args.split], args.frames,
                               args.size)
    _save_strip(args.out, video)
    for i, c in enumerate(caps):
        print(f"{args.first + i}: {c}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
