"""Wan 2.2 TI2V-5B pipeline: text-to-video, or image-to-video from a first frame, with one DiT.

prompt -> umT5 context; noise [48, F, H/16, W/16] -> the DiT (classifier-free guidance, flow
solver) -> latents -> the Wan2.2 VAE (wan/vae2_2.py) -> video. Official semantics
(`wan/textimage2video.py`, docs/models.md):

* text mode (`image=None`): the video size is `size`; every token at the step's t.
* image mode: the video size follows the image (wan.image.ti2v_size, within the area of `size`);
  the image's latent is the first latent frame: it replaces the noise's first frame before the
  first step and after every step, and its tokens are at t = 0 while the others are at t
  (per-token timesteps, embedded once per distinct value: wan/tokens.py).

Defaults (TI2VConfig): 121 frames at 24 fps, 1280*704, 50 steps, shift 5.0, guidance 5.0 (one
scale: no experts). The text side, the sequence length and the CFG modes (two batch-1 calls,
batched, CFG-parallel) are WanT2V's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import attention
from .checkpoint import CheckpointError, check_checkpoint, is_diffusers_layout
from .conditioning import Conditioned, begin_generation, encode_prompts
from .configs import TI2VConfig, get_config
from .dit import WanModel
from .footprint import build_footprint, check_host_ram
from .image import ti2v_frame, ti2v_size
from .lora import LoraError
from .naming import Arg
from .offload import OffloadError, default_offload
from .parking import to_device, to_host
from .denoise import _progress
from .pipeline import WanT2V, _offload_mode
from .requests import InputError, check_request
from .schedulers import make_scheduler
from .t5 import T5TextEncoder, byte_tokenizer
from .timing import Timings
from .tokens import TokenTimesteps
from .vae2_2 import Wan22VAE

__all__ = ["WanTI2V"]

log = logging.getLogger("wan.pipeline")


def _one_model_only(offload: str | None) -> None:
    if offload == "blocks":
        raise OffloadError("block streaming ({a}) streams the two experts of an A14B task; ti2v-5B is one model "
                           "that fits a 24 GB GPU resident: use {model}", a=Arg("offload", "blocks"),
                           model=Arg("offload", "model"))


def _offload(offload: str | None, device, allow_cpu: bool) -> str:
    """A build's offload mode, as WanT2V's ('blocks' refused): None is the official default
    ('model' on CUDA: the model waits in host memory during the VAE decode)."""
    _one_model_only(offload)
    return _offload_mode(offload, device, allow_cpu)


class WanTI2V:
    """Wan 2.2 TI2V-5B: text encoder, one DiT (`model`), the Wan2.2 VAE, flow solver.

    Build with `from_pretrained(ckpt_dir)` (official layout) or `from_config(task)` (random weights).
    `offload` is where the model waits while the VAE decodes: 'none' or 'model' (host memory);
    None: the official default, 'model' on CUDA. `generate()` follows it unless its
    `offload_model` says otherwise ('blocks' is refused: one model, no experts to stream).
    """

    parallel = None  # wan.parallel.ParallelState under torchrun (set by wan.parallel.apply_to_pipeline)

    # the text side, the token count and the CFG modes are the T2V pipeline's
    encode_text = WanT2V.encode_text
    text_encoder_device = WanT2V.text_encoder_device
    prompt_tokens = WanT2V.prompt_tokens
    _warn_if_cut = WanT2V._warn_if_cut
    release_text_encoder = WanT2V.release_text_encoder
    latent_shape = WanT2V.latent_shape
    seq_len = WanT2V.seq_len
    _guided = WanT2V._guided

    def __init__(self, config: TI2VConfig, text_encoder, vae, model, device="cuda", t5_cpu: bool = False,
                 use_batched_cfg: bool = False, offload: str | None = None, t5_release: bool = False):
        self.config = config
        self.text_encoder = text_encoder
        self.vae = vae
        self.model = model
        self.device = torch.device(device)
        self.t5_cpu = t5_cpu
        self.use_batched_cfg = use_batched_cfg
        self.t5_release = t5_release  # free the text encoder after encoding (re-read per video)
        _one_model_only(offload)
        self.offload = default_offload(self.device) if offload is None else offload
        self.ckpt_dir = None
        self.last_timings: Timings | None = None
        self.last_seed: int | None = None
        self.last_size: tuple[int, int] | None = None  # (width, height) of the latest video

    def dit_models(self) -> tuple:
        """The DiT models this pipeline runs (one)."""
        return (self.model,)

    def enable_block_streaming(self, *args, **kw):
        """Refused: block streaming streams an A14B task's two experts (OffloadError, one line)."""
        _one_model_only("blocks")

    def load_lora(self, *args, **kw):
        """Refused: the LoRA tables merge into an A14B task's experts (LoraError, one line)."""
        raise LoraError("LoRAs merge into an A14B task's experts (high / low noise); ti2v-5B is not supported")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, ckpt_dir, config: TI2VConfig | str = "ti2v-5B", device="cuda", t5_cpu=False,
                        convert_model_dtype=False, init_on_cpu=True, progress: bool = False,
                        offload: str | None = None, host_ram: str = "auto", allow_cpu: bool = False,
                        expert_files=None, **kw) -> "WanTI2V":
        """Load the official Wan2.2-TI2V-5B folder: config.json + safetensors of the DiT at its top,
        Wan2.2_VAE.pth, the T5 and its tokenizer. The DiT keeps its stored dtype unless
        `convert_model_dtype` (then bf16, as the official flag). `host_ram` is block streaming's
        and unused here (offload='blocks' is refused); `offload` is recorded (see the class).
        `expert_files` (fp8 expert files) are an A14B task's: None here (CheckpointError otherwise)."""
        config = get_config(config) if isinstance(config, str) else config
        if expert_files is not None:
            raise CheckpointError(f"fp8 expert files are written from an A14B task's two experts; {config.name} has one model")
        offload = _offload(offload, device, allow_cpu)
        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {ckpt}")
        if is_diffusers_layout(ckpt):
            raise CheckpointError(f"{config.name} reads the official layout only; {ckpt} is in the diffusers layout")
        check_checkpoint(ckpt, config)
        device = torch.device(device)
        t5 = T5TextEncoder.from_pretrained(ckpt, config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype)
        vae = Wan22VAE.from_pretrained(ckpt / config.vae_checkpoint, device=device, dtype=torch.float32,
                                       cfg=config.vae)
        model = WanModel.from_pretrained(ckpt / config.dit_checkpoint, progress=progress,
                                         dtype=config.param_dtype if convert_model_dtype else None,
                                         device="cpu" if init_on_cpu else device)
        pipe = cls(config, t5, vae, model, device=device, t5_cpu=t5_cpu, offload=offload, **kw)
        pipe.ckpt_dir = ckpt
        return pipe

    @classmethod
    def from_config(cls, config: TI2VConfig | str = "ti2v-tiny", device="cpu", dtype=None, seed: int = 0,
                    t5_cpu=False, offload: str | None = None, allow_cpu: bool = False, **kw) -> "WanTI2V":
        """Random weights at the task's real shapes (official init, head randomised), built on
        `device` after the host-memory check (wan.footprint); `offload` is recorded (see the class)."""
        config = get_config(config) if isinstance(config, str) else config
        device = torch.device(device)
        offload = _offload(offload, device, allow_cpu)
        dtype = dtype or config.param_dtype
        check_host_ram(config, build_footprint(config, device, dtype, t5_cpu, offload), device)
        tok = None
        if config.t5.vocab_size > 256 + 3:
            log.info("random weights: the built-in byte tokenizer stands in for umT5's (no tokenizer files)")
            tok = byte_tokenizer(config.t5.text_len)
        t5 = T5TextEncoder.from_config(config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype, seed=seed,
                                       tokenizer=tok)
        vae = Wan22VAE.from_config(config.vae, device=device, dtype=torch.float32, seed=seed)
        model = WanModel.from_config(config.dit, device=device, dtype=dtype, seed=seed + 1, zero_head=False)
        return cls(config, t5, vae, model, device=device, t5_cpu=t5_cpu, offload=offload, **kw)

    def save_pretrained(self, ckpt_dir, max_shard_bytes: int = 5 * 2 ** 30):
        """Write the official layout (the DiT at the top of the folder)."""
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(ckpt, self.config)
        self.vae.save_pretrained(ckpt / self.config.vae_checkpoint)
        self.model.save_pretrained(ckpt / self.config.dit_checkpoint, max_shard_bytes)

    # ------------------------------------------------------------------ generation
    def video_size(self, size, image=None) -> tuple[int, int]:
        """(width, height) of the video: `size` in text mode; in image mode the official rule
        for the image within the area of `size` (sides multiples of VAE stride x patch)."""
        w, h = size
        if image is None:
            return w, h
        return ti2v_size(image, w * h, self.config.vae_stride[1] * self.config.dit.patch_size[1])

    @torch.no_grad()
    def generate(self, prompt: str, image=None, size=None, frame_num: int | None = None, shift: float | None = None,
                 sample_solver: str = "unipc", sampling_steps: int | None = None, guide_scale=None,
                 n_prompt: str = "", seed: int = -1, offload_model: bool | None = None, progress: bool = True,
                 return_latents: bool = False):
        """-> video [3, frame_num, height, width] float32 in [-1, 1] (or latents [48, F, H/16, W/16]).

        image: a PIL image (wan.image.load_image) for the image mode, None for text. size: (width,
        height) or 'W*H', one of config.sizes (default config.default_size); in image mode its area.
        guide_scale: one number (default 5.0). The video's (width, height) lands in `last_size`.
        offload_model: True moves the model to host memory for the decode; None follows `offload`."""
        offload_model = self.offload == "model" if offload_model is None else offload_model
        cfg = self.config
        size = cfg.default_size if size is None else size
        frame_num = cfg.frame_num if frame_num is None else frame_num
        shift = cfg.sample_shift if shift is None else shift
        steps = cfg.sample_steps if sampling_steps is None else sampling_steps
        g = cfg.sample_guide_scale if guide_scale is None else guide_scale
        if not isinstance(g, (int, float)):
            raise InputError(f"{cfg.name} takes one guidance scale (no experts), got {g!r}")
        w, h = self.video_size(check_request(cfg, size, frame_num, sample_solver, steps, shift=shift,
                                             guide_scale=g, seed=seed), image)
        n_prompt, seed, progress = begin_generation(self, prompt, n_prompt, seed, (g,), progress)
        dev = self.device
        tm = Timings(device=str(dev))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with tm.measure("total"):
            with tm.measure("text_encode"):
                context, context_null = encode_prompts(self, prompt, n_prompt, (g,))
            shape = self.latent_shape(w, h, frame_num)
            seq_len = self.seq_len(shape)
            gen = torch.Generator(device=dev).manual_seed(seed)
            latent = torch.randn(*shape, dtype=torch.float32, device=dev, generator=gen)
            first = None
            if image is not None:
                with tm.measure("image_encode"):
                    first = self.vae.encode(ti2v_frame(image, w, h)[None].to(dev))[0]
                latent[:, :1] = first
            latent = self._denoise(latent, first, context, context_null, seq_len, sample_solver, steps, shift, g,
                                   offload_model, progress, tm)
            out = self._decode(latent, frame_num, progress, return_latents, tm)
        if dev.type == "cuda":
            tm.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
        self.last_timings, self.last_seed, self.last_size = tm, seed, (w, h)
        return out

    def _denoise(self, latent, first, context, context_null, seq_len, solver, steps, shift, g, offload_model,
                 progress, tm):
        """The loop: one model, CFG, solver step; in image mode the first latent frame is `first`
        again after every step and its tokens are at t = 0."""
        dev, cfg = self.device, self.config
        scheduler = make_scheduler(solver, steps, shift, dev, cfg.num_train_timesteps)
        attention.resolve_backend(dev)
        with tm.measure("moves"):
            if next(self.model.parameters()).device != dev:
                to_device(self.model, dev)
        frame_tokens = latent.shape[2] * latent.shape[3] // (cfg.dit.patch_size[1] * cfg.dit.patch_size[2])
        with torch.autocast(device_type=dev.type, dtype=cfg.param_dtype):
            for t in _progress(scheduler.timesteps, progress, desc="denoise"):
                with tm.measure("steps"):
                    tm.experts.append("model")
                    call = Conditioned(self.model, None if first is None else
                                       TokenTimesteps.first_frame(t.to(dev), frame_tokens, seq_len))
                    v = self._guided(call, latent, t, context, context_null, seq_len, g)
                    latent = scheduler.step(v.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0].squeeze(0)
                    if first is not None:
                        latent[:, :1] = first
        if offload_model and dev.type == "cuda":  # the decode gets the memory (official offload_model)
            with tm.measure("moves"):
                to_host(self.model)
        return latent

    @torch.no_grad()
    def warm_up(self, size=None, frame_num: int | None = None, decode: bool = True) -> float:
        """As WanT2V.warm_up: the text encoder once, one forward of the model on fewer latent frames
        at full height and width (the token count's divisibility by 16 kept), the VAE decode of 2
        latent frames; the model is left on the device. Returns the seconds."""
        t0 = time.perf_counter()
        cfg = self.config
        w, h = check_request(cfg, cfg.default_size if size is None else size,
                             cfg.frame_num if frame_num is None else frame_num, "unipc", 1)
        z, f, lh, lw = self.latent_shape(w, h, cfg.frame_num if frame_num is None else frame_num)
        full = self.seq_len((z, f, lh, lw)) % 16 == 0
        frames = next(k for k in range(1, f + 1) if (self.seq_len((z, k, lh, lw)) % 16 == 0) == full)
        dev = self.device
        context = self.encode_text([""])
        if self.t5_release:
            self.release_text_encoder()
        if next(self.model.parameters()).device != dev:
            self.model.to(dev)
        x = torch.zeros(z, frames, lh, lw, device=dev)
        tt = torch.tensor([cfg.num_train_timesteps - 1], device=dev)
        with torch.autocast(device_type=dev.type, dtype=cfg.param_dtype):
            self.model([x], tt, context, seq_len=self.seq_len((z, frames, lh, lw)))
        if decode:
            self.vae.decode(torch.zeros(1, z, min(2, f), lh, lw, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def _decode(self, latent, frame_num, progress, return_latents, tm):
        par = self.parallel
        if return_latents:
            return latent
        if par is not None and not par.is_main:
            return None  # rank 0 decodes
        log.info("decoding %d frames with the VAE ...", frame_num)
        with tm.measure("decode"):
            z = latent.unsqueeze(0)
            return (self.vae.decode(z, progress=True) if progress else self.vae.decode(z))[0]
