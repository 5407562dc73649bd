"""Frozen dataclass configs and named presets for the Wan 2.2 T2V stack.

`PRESETS["t2v-A14B"]` is the official configuration (docs/checkpoint.md, docs/schedulers.md); `PRESETS["tiny"]`
has the same architecture at toy widths, for tests (random weights); `PRESETS["demo"]` is the trained demo
model, whose weights ship in the package at `DEMO_CKPT_DIR` (docs/demo_model.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

# Exact default negative prompt of the official config (the commas are U+FF0C).
DEFAULT_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Official latent statistics of the Wan2.1 VAE (per channel; not stored in Wan2.1_VAE.pth).
VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of `WanModel`; field names are the official config.json keys."""
    model_type: str = "t2v"
    patch_size: tuple = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["window_size"] = list(self.window_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from an official/diffusers config.json dict; bookkeeping keys are ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("patch_size", "window_size"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder hyper-parameters (official umt5-xxl encoder)."""
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE hyper-parameters."""
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)
    mean: tuple = VAE_MEAN
    std: tuple = VAE_STD


@dataclass(frozen=True)
class T2VConfig:
    """Everything the two-expert text-to-video pipeline needs (official t2v-A14B values by default)."""
    name: str
    dit: DiTConfig
    t5: T5Config
    vae: VAEConfig
    param_dtype: torch.dtype = torch.bfloat16
    t5_dtype: torch.dtype = torch.bfloat16
    num_train_timesteps: int = 1000
    sample_fps: int = 16
    frame_num: int = 81
    vae_stride: tuple = (4, 8, 8)
    sample_shift: float = 12.0
    sample_steps: int = 40
    boundary: float = 0.875
    sample_guide_scale: tuple = (3.0, 4.0)  # (low-noise expert, high-noise expert)
    sample_neg_prompt: str = DEFAULT_NEG_PROMPT
    sizes: tuple = ("720*1280", "1280*720", "480*832", "832*480")
    default_size: str = "1280*720"
    # official checkpoint layout (relative to the checkpoint folder)
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    low_noise_checkpoint: str = "low_noise_model"
    high_noise_checkpoint: str = "high_noise_model"
    seed: int = -1

    def replace(self, **kw) -> "T2VConfig":
        return replace(self, **kw)


T2V_A14B = T2VConfig(name="t2v-A14B", dit=DiTConfig(), t5=T5Config(), vae=VAEConfig())

# Same architecture at toy widths: head_dim 32 keeps the 3-axis RoPE split non-trivial
# (16 pairs -> 6/5/5), the VAE keeps all its stages, the T5 keeps relative buckets.
TINY = T2VConfig(
    name="tiny",
    dit=DiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, text_len=32),
    t5=T5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                num_buckets=32, max_distance=128, text_len=32),
    vae=VAEConfig(dim=8),
    param_dtype=torch.bfloat16,
    t5_dtype=torch.float32,
    frame_num=17,
    sample_steps=8,
    sizes=("128*128", "256*256", "160*96", "96*160"),
    default_size="128*128",
    seed=42,
)

# The trained demo model (docs/demo_model.md; trained by bench/train_demo.py on procedural clips of coloured
# shapes): the official architecture, schedule (shift 12, boundary 0.875, guidance (3, 4)) and file layout
# at a size that trains on a CPU and samples 17 frames of 64x64 in seconds. Its text encoder keeps fixed
# random weights and the byte tokenizer; the latent statistics are the official ones (training folds its
# own into the VAE's 1x1 convs). The negative prompt is empty: training dropped captions to "".
DEMO = T2VConfig(
    name="demo",
    dit=DiTConfig(dim=128, ffn_dim=512, freq_dim=64, text_dim=64, num_heads=4, num_layers=4, text_len=64),
    t5=T5Config(vocab_size=384, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2,
                num_buckets=32, max_distance=128, text_len=64),
    vae=VAEConfig(dim=8),
    param_dtype=torch.bfloat16,
    t5_dtype=torch.float32,
    frame_num=17,
    sample_steps=20,
    sample_neg_prompt="",
    sizes=("64*64",),
    default_size="64*64",
    seed=42,
)
# the demo model's weights, in the official layout, installed with the package (setup.py package_data)
DEMO_CKPT_DIR = Path(__file__).resolve().parent / "demo_model"

PRESETS: dict[str, T2VConfig] = {c.name: c for c in (T2V_A14B, TINY, DEMO)}


def get_config(name: str) -> T2VConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (width, height)."""
    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise ValueError(f"size must look like WIDTH*HEIGHT, got {size!r}") from None
    return w, h
