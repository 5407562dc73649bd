"""Frozen dataclass configs and the named tasks (model sizes) of the Wan 2.2 family.

`TASKS["t2v-A14B"]` is the official configuration (docs/checkpoint.md, docs/schedulers.md); `TASKS["tiny"]`
has the same architecture at toy widths, for tests and smoke runs (random weights). The rest of the family
(docs/models.md): `ti2v-5B` (one model, the Wan2.2 VAE, text or image to video) and `i2v-A14B` (two
experts conditioned on an image), each with a toy-width task (`ti2v-tiny`, `i2v-tiny`). (A "preset"
is a hardware profile of wan_triton, never a model size.)
`TASKS["demo"]` is the demo model that bench/train_demo.py trains on coloured shapes (a toy, not Wan's
weights): its weights ship in the package (`DEMO_CKPT_DIR`), the CLI's default without --ckpt_dir.
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

# Rows of the DiT's RoPE table per axis (frames, height, width): the official rope_params(1024, ...).
# A video's latent grid must fit it: at most 1024 latent frames (T2VConfig.max_frame_num).
ROPE_POSITIONS = 1024

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

    @property
    def max_frame_num(self) -> int:
        """The longest video (4n+1 frames) whose latent frames fit the RoPE table (ROPE_POSITIONS
        rows): 4093 for the official strides."""
        return (ROPE_POSITIONS * self.dit.patch_size[0] - 1) * self.vae_stride[0] + 1

    def replace(self, **kw) -> "T2VConfig":
        return replace(self, **kw)

    @property
    def dit_folders(self) -> tuple[str, ...]:
        """The DiT folders of the checkpoint layout, relative to the checkpoint folder."""
        return (self.high_noise_checkpoint, self.low_noise_checkpoint)


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

def get_config(name: str) -> "T2VConfig | TI2VConfig":
    """The config of a task by name ('t2v-A14B', 'tiny', 'demo', 'ti2v-5B', ...); KeyError naming the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}") from None


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (width, height)."""
    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise ValueError(f"size must look like WIDTH*HEIGHT, got {size!r}") from None
    return w, h


# ------------------------------------------------------------------ the rest of the family (docs/models.md)

# Official latent statistics of the Wan2.2 VAE (48 channels; not stored in Wan2.2_VAE.pth).
VAE22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
              0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
              -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
VAE22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class VAE22Config:
    """Wan2.2 VAE hyper-parameters (official vae2_2: 48 latent channels, stride 4x16x16 = 2x2 pixel
    folding x three x2 down-samplings)."""
    dim: int = 160                     # encoder base width
    dec_dim: int = 256                 # decoder base width
    z_dim: int = 48
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple = (False, True, True)
    patch_size: int = 2                # pixels folded into channels before the encoder (3 -> 12)
    mean: tuple = VAE22_MEAN
    std: tuple = VAE22_STD


@dataclass(frozen=True)
class TI2VConfig:
    """Everything the one-model text/image-to-video pipeline needs (official ti2v-5B values by default).

    No expert split: one DiT, stored in the checkpoint folder itself (`dit_checkpoint` = "."). In
    image mode the video size follows the image's aspect ratio within the area of `size`."""
    name: str
    dit: DiTConfig
    t5: T5Config
    vae: VAE22Config
    param_dtype: torch.dtype = torch.bfloat16
    t5_dtype: torch.dtype = torch.bfloat16
    num_train_timesteps: int = 1000
    sample_fps: int = 24
    frame_num: int = 121
    vae_stride: tuple = (4, 16, 16)
    sample_shift: float = 5.0
    sample_steps: int = 50
    sample_guide_scale: float = 5.0
    sample_neg_prompt: str = DEFAULT_NEG_PROMPT
    sizes: tuple = ("1280*704", "704*1280")
    default_size: str = "1280*704"
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    vae_checkpoint: str = "Wan2.2_VAE.pth"
    dit_checkpoint: str = "."          # config.json + safetensors at the top of the checkpoint folder
    seed: int = -1

    max_frame_num = T2VConfig.max_frame_num  # the same RoPE table and temporal stride

    def replace(self, **kw) -> "TI2VConfig":
        return replace(self, **kw)

    @property
    def dit_folders(self) -> tuple[str, ...]:
        return (self.dit_checkpoint,)


TI2V_5B = TI2VConfig(
    name="ti2v-5B",
    dit=DiTConfig(model_type="ti2v", in_dim=48, dim=3072, ffn_dim=14336, out_dim=48, num_heads=24, num_layers=30),
    t5=T5Config(), vae=VAE22Config())

TI2V_TINY = TI2VConfig(
    name="ti2v-tiny",
    dit=replace(TINY.dit, model_type="ti2v", in_dim=48, out_dim=48),
    t5=TINY.t5, vae=VAE22Config(dim=8, dec_dim=8), t5_dtype=torch.float32,
    frame_num=17, sample_steps=8, sizes=("128*128", "160*96", "96*160"), default_size="128*128", seed=42)

# I2V-A14B: the T2V-A14B experts' architecture with 36 input channels (16 noise + 4 mask + 16 image latent)
I2V_A14B = T2VConfig(name="i2v-A14B", dit=DiTConfig(model_type="i2v", in_dim=36), t5=T5Config(), vae=VAEConfig(),
                     sample_shift=5.0, sample_steps=40, boundary=0.900, sample_guide_scale=(3.5, 3.5))

I2V_TINY = TINY.replace(name="i2v-tiny", dit=replace(TINY.dit, model_type="i2v", in_dim=36), sample_shift=5.0,
                        boundary=0.900, sample_guide_scale=(3.5, 3.5))

# the task table: name -> config (T2VConfig: the two-expert tasks; TI2VConfig: the one-model task)
TASKS: dict[str, "T2VConfig | TI2VConfig"] = {c.name: c for c in (T2V_A14B, TINY, DEMO, TI2V_5B, TI2V_TINY,
                                                                   I2V_A14B, I2V_TINY)}
