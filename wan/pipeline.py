"""Two-expert Wan 2.2 text-to-video pipeline with the official semantics (spec section 6).

prompt -> umT5 context; noise -> DiT (high-noise expert while t >= boundary * 1000, then the
low-noise expert), classifier-free guidance, flow solver -> latents -> VAE decode -> video.

`cfg_combine` is a module-level function so `wan_triton.patch()` can swap it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configs import T2VConfig, get_config, parse_size

log = logging.getLogger("wan.pipeline")


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), float32."""
    return uncond + scale * (cond - uncond)


class InputError(ValueError):
    """Bad user input (size, frame count, solver, ...): reported as one line by the CLI."""


def check_request(config: T2VConfig, size, frame_num: int, solver: str = "unipc") -> tuple[int, int]:
    """Validate a request; returns (width, height)."""
    w, h = parse_size(size) if isinstance(size, str) else size
    sz = f"{w}*{h}"
    if w % 16 or h % 16:
        raise InputError(f"size {sz}: width and height must be multiples of 16")
    if sz not in config.sizes:
        raise InputError(f"size {sz} is not supported by {config.name}; choose from {', '.join(config.sizes)}")
    if frame_num < 1 or (frame_num - 1) % 4:
        raise InputError(f"frame_num must be 4n+1 (e.g. 5, 17, 81), got {frame_num}")
    if solver not in ("unipc", "dpm++"):
        raise InputError(f"unknown solver {solver!r}; choose 'unipc' or 'dpm++'")
    return w, h


@dataclass
class Timings:
    """Per-stage wall times (seconds, device-synchronised) and peak GPU memory of one call."""
    text_encode: float = 0.0
    steps: list = field(default_factory=list)
    decode: float = 0.0
    total: float = 0.0
    peak_mem_gb: float = 0.0
    experts: list = field(default_factory=list)
    device: str = ""

    @property
    def denoise(self) -> float:
        return sum(self.steps)

    def summary(self) -> str:
        mem = f" | peak GPU mem {self.peak_mem_gb:.1f} GB" if self.device == "cuda" else ""
        return (f"text {self.text_encode:.2f}s | denoise {self.denoise:.2f}s ({len(self.steps)} steps) | "
                f"decode {self.decode:.2f}s | total {self.total:.2f}s{mem}")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WanT2V:
    """Wan 2.2 T2V-A14B: text encoder, two DiT experts, VAE, flow solver.

    Build with `from_pretrained(ckpt_dir)` (official layout) or `from_preset(name)` (random weights).
    """

    parallel = None  # wan.parallel.ParallelState under torchrun (set by wan.parallel.apply_to_pipeline)

    def __init__(self, config: T2VConfig, text_encoder, vae, low_noise_model, high_noise_model,
                 device="cuda", t5_cpu: bool = False, use_batched_cfg: bool = False):
        self.config = config
        self.text_encoder = text_encoder
        self.vae = vae
        self.low_noise_model = low_noise_model
        self.high_noise_model = high_noise_model
        self.device = torch.device(device)
        self.t5_cpu = t5_cpu
        self.use_batched_cfg = use_batched_cfg
        self.last_timings: Timings | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, ckpt_dir, config: T2VConfig | str = "t2v-A14B", device="cuda", t5_cpu=False,
                        convert_model_dtype=False, init_on_cpu=True, progress: bool = False, **kw) -> "WanT2V":
        """Load an official checkpoint folder. DiT params stay in their stored dtype (fp32) unless
        `convert_model_dtype` (then `config.param_dtype`, as the official flag does)."""
        from .checkpoint import CheckpointError
        from .dit import WanModel
        from .t5 import T5TextEncoder
        from .vae import WanVAE

        config = get_config(config) if isinstance(config, str) else config
        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {ckpt}")
        device = torch.device(device)
        dit_dtype = config.param_dtype if convert_model_dtype else None
        dit_dev = "cpu" if init_on_cpu else device
        t5 = T5TextEncoder.from_pretrained(ckpt, config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype)
        vae = WanVAE.from_pretrained(ckpt / config.vae_checkpoint, device=device, dtype=torch.float32,
                                     cfg=config.vae)
        low = WanModel.from_pretrained(ckpt / config.low_noise_checkpoint, dtype=dit_dtype, device=dit_dev,
                                       progress=progress)
        high = WanModel.from_pretrained(ckpt / config.high_noise_checkpoint, dtype=dit_dtype, device=dit_dev,
                                        progress=progress)
        return cls(config, t5, vae, low, high, device=device, t5_cpu=t5_cpu, **kw)

    @classmethod
    def from_preset(cls, config: T2VConfig | str = "tiny", device="cpu", dtype=None, seed: int = 0,
                    t5_cpu=False, **kw) -> "WanT2V":
        """Random weights at the preset's real shapes (official init, head randomised so the
        output is not zero), built directly on `device`. DiT dtype defaults to `param_dtype`."""
        from .dit import WanModel
        from .t5 import T5TextEncoder
        from .vae import WanVAE

        config = get_config(config) if isinstance(config, str) else config
        device = torch.device(device)
        dtype = dtype or config.param_dtype
        tok = None
        if config.t5.vocab_size > 256 + 3:  # real umT5 vocab: no tokenizer files without a checkpoint
            from .t5 import byte_tokenizer
            log.info("random weights: the built-in byte tokenizer stands in for umT5's (no tokenizer files)")
            tok = byte_tokenizer(config.t5.text_len)
        t5 = T5TextEncoder.from_config(config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype, seed=seed,
                                       tokenizer=tok)
        vae = WanVAE.from_config(config.vae, device=device, dtype=torch.float32, seed=seed)
        low = WanModel.from_config(config.dit, device=device, dtype=dtype, seed=seed + 1, zero_head=False)
        high = WanModel.from_config(config.dit, device=device, dtype=dtype, seed=seed + 2, zero_head=False)
        return cls(config, t5, vae, low, high, device=device, t5_cpu=t5_cpu, **kw)

    def save_pretrained(self, ckpt_dir, max_shard_bytes: int = 5 * 2 ** 30):
        """Write the official layout (tests use this to make small checkpoints)."""
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(ckpt, self.config)
        self.vae.save_pretrained(ckpt / self.config.vae_checkpoint)
        self.low_noise_model.save_pretrained(ckpt / self.config.low_noise_checkpoint, max_shard_bytes)
        self.high_noise_model.save_pretrained(ckpt / self.config.high_noise_checkpoint, max_shard_bytes)

    # ------------------------------------------------------------------ helpers
    def latent_shape(self, width: int, height: int, frame_num: int) -> tuple[int, int, int, int]:
        st, sh, sw = self.config.vae_stride
        return (self.config.vae.z_dim, (frame_num - 1) // st + 1, height // sh, width // sw)

    def seq_len(self, latent_shape) -> int:
        _, f, h, w = latent_shape
        pt, ph, pw = self.config.dit.patch_size
        u = self.parallel.ulysses_size if self.parallel is not None else 1  # official: a multiple of U
        return math.ceil((h * w) / (ph * pw) * f / pt / u) * u

    def _expert(self, t: int, offload: bool):
        boundary = self.config.boundary * self.config.num_train_timesteps
        if t >= boundary:
            use, idle, g = self.high_noise_model, self.low_noise_model, 1
        else:
            use, idle, g = self.low_noise_model, self.high_noise_model, 0
        if offload and self.device.type == "cuda":
            if next(idle.parameters()).device.type != "cpu":
                idle.to("cpu")
                torch.cuda.empty_cache()
        if next(use.parameters()).device != self.device:
            use.to(self.device)
        return use, g

    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        ctx = self.text_encoder(prompts, device=self.text_encoder_device)
        return [c.to(self.device) for c in ctx]

    @property
    def text_encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.t5_cpu else self.device

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str, size=(1280, 720), frame_num: int = 81, shift: float | None = None,
                 sample_solver: str = "unipc", sampling_steps: int | None = None, guide_scale=None,
                 n_prompt: str = "", seed: int = -1, offload_model: bool = True, progress: bool = True,
                 return_latents: bool = False):
        """-> video [3, frame_num, height, width] float32 in [-1, 1] (or latents [16, F, H, W]).

        size is (width, height). guide_scale: float (both experts) or (low-noise, high-noise).
        """
        from .schedulers import make_scheduler

        cfg = self.config
        shift = cfg.sample_shift if shift is None else shift
        sampling_steps = cfg.sample_steps if sampling_steps is None else sampling_steps
        guide_scale = cfg.sample_guide_scale if guide_scale is None else guide_scale
        if isinstance(guide_scale, (int, float)):
            guide_scale = (float(guide_scale), float(guide_scale))
        w, h = check_request(cfg, size, frame_num, sample_solver)
        if sampling_steps < 1:
            raise InputError(f"sampling_steps must be >= 1, got {sampling_steps}")
        n_prompt = n_prompt or cfg.sample_neg_prompt
        if seed is None or seed < 0:
            seed = random.randint(0, sys.maxsize)
        par = self.parallel
        if par is not None:  # every rank draws rank 0's noise; only rank 0 shows progress and decodes
            seed = par.broadcast_seed(seed)
            progress = progress and par.is_main
        dev = self.device
        tm = Timings(device=dev.type)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t_start = time.perf_counter()

        # 1. text (two batch-1 calls, as the official pipeline does)
        _sync(dev)
        t0 = time.perf_counter()
        context = self.encode_text([prompt])
        context_null = self.encode_text([n_prompt])
        _sync(dev)
        tm.text_encode = time.perf_counter() - t0

        # 2. noise: one float32 draw from a generator on the device
        shape = self.latent_shape(w, h, frame_num)
        seq_len = self.seq_len(shape)
        gen = torch.Generator(device=dev).manual_seed(seed)
        latent = torch.randn(*shape, dtype=torch.float32, device=dev, generator=gen)

        scheduler = make_scheduler(sample_solver, sampling_steps, shift, dev, cfg.num_train_timesteps)
        timesteps = scheduler.timesteps
        autocast = torch.autocast(device_type=dev.type, dtype=cfg.param_dtype)
        bar = _progress(timesteps, progress, desc="denoise")
        with autocast:
            for t in bar:
                _sync(dev)
                t0 = time.perf_counter()
                model, gi = self._expert(int(t.item()), offload_model)
                tm.experts.append("high" if gi == 1 else "low")
                v = self._guided(model, latent, t, context, context_null, seq_len, guide_scale[gi])
                latent = scheduler.step(v.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False,
                                        generator=gen)[0].squeeze(0)
                _sync(dev)
                tm.steps.append(time.perf_counter() - t0)
        if offload_model and dev.type == "cuda":
            self.low_noise_model.to("cpu")
            self.high_noise_model.to("cpu")
            torch.cuda.empty_cache()

        if return_latents:
            out = latent
        elif par is not None and not par.is_main:
            out = None
        else:
            t0 = time.perf_counter()
            out = self.vae.decode(latent.unsqueeze(0))[0]
            _sync(dev)
            tm.decode = time.perf_counter() - t0
        tm.total = time.perf_counter() - t_start
        if dev.type == "cuda":
            tm.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
        self.last_timings = tm
        self.last_seed = seed
        return out

    def _guided(self, model, latent, t, context, context_null, seq_len, scale):
        """One CFG-combined velocity for one step: two batch-1 forwards (official) or one batch-2."""
        tt = t.reshape(1).to(self.device)
        par = self.parallel
        if par is not None and par.cfg_parallel:  # this half runs one branch; one exchange per step
            mine = model([latent], tt, context if par.cfg_rank == 0 else context_null, seq_len=seq_len)[0]
            cond, uncond = par.exchange_cfg(mine)
        elif self.use_batched_cfg:
            both = model(latent.unsqueeze(0).expand(2, *latent.shape), tt.expand(2),
                         [context[0], context_null[0]], seq_len=seq_len)
            cond, uncond = both[0], both[1]
        else:
            cond = model([latent], tt, context, seq_len=seq_len)[0]
            uncond = model([latent], tt, context_null, seq_len=seq_len)[0]
        return cfg_combine(uncond, cond, scale)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------ video output

def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8, exactly as the official save_video:
    clamp, (x+1)/2, *255, truncate."""
    x = video.detach().float().clamp(-1, 1)
    x = (x + 1) / 2
    return (x * 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()


class VideoWriterError(InputError):
    """MP4 output is impossible in this environment (imageio or its ffmpeg binary missing)."""


def check_video_writer() -> None:
    """Raise VideoWriterError (one line) unless imageio can write MP4 here. The CLI calls this
    before loading any model, so a long generation never ends without its file."""
    hint = "pip install imageio imageio-ffmpeg"
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg
    except ImportError as err:
        raise VideoWriterError(f"writing MP4 needs imageio and imageio-ffmpeg ({err.name or err} is missing; "
                               f"{hint})") from None
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoWriterError(f"writing MP4 needs an ffmpeg binary: {first} ({hint}, or set "
                               f"IMAGEIO_FFMPEG_EXE)") from None


def check_output_path(path) -> Path:
    """Raise InputError (one line) unless a file can be created at `path`: it is not a directory,
    and its nearest existing ancestor is a writable directory. Creates nothing."""
    import os

    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path is a directory: {path}")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {path}: no write permission in {parent}")
    return path


def save_video(video: torch.Tensor, path, fps: int = 16) -> Path:
    """Write an MP4 (libx264, yuv420p, crf 10 via imageio quality 8) to a temporary name,
    renamed on success so no half-written file is left behind. Raises VideoWriterError when
    imageio-ffmpeg is missing."""
    check_video_writer()
    import imageio

    path = check_output_path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
    frames = video_to_uint8(video).numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with imageio.get_writer(str(tmp), fps=fps, codec="libx264", quality=8, format="FFMPEG") as wr:
            for f in frames:
                wr.append_data(f)
        tmp.replace(path)
    except OSError as err:  # disk full, permissions changed meanwhile, ...
        raise VideoWriterError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
