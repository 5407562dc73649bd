"""Wan 2.2 I2V-A14B pipeline: image-to-video with the two-expert DiT of T2V-A14B, 36 input channels.

The official `wan/image2video.py` (docs/models.md): the image sets the video's aspect ratio
within the area of `size` (wan.image.i2v_latent_size: latent sides rounded down to the VAE
stride, then to the patch); it is resized (bicubic) to that size and encoded by the Wan2.1 VAE as
the first frame of a video whose other frames are zeros; the conditioning `y` = 4 mask channels
(1 on the first latent frame, 0 after) + those 16 latent channels is concatenated after the 16
noise channels of every DiT call. Experts switch at t >= 900 (boundary 0.900), guidance (3.5,
3.5), shift 5.0, 40 steps, 81 frames at 16 fps.

Everything else is WanT2V's: loading (same folder layout), experts and their offloading, block
streaming, LoRAs, fp8, the CFG modes, sequence and CFG parallelism.
"""
from __future__ import annotations

import logging

import torch

from . import attention
from .checkpoint import CheckpointError, is_diffusers_layout
from .conditioning import begin_generation, encode_prompts
from .denoise import Conditioning, denoise, schedule_steps
from .image import i2v_frame, i2v_latent_size
from .pipeline import WanT2V
from .requests import InputError, check_request
from .schedulers import make_scheduler
from .timing import Timings

__all__ = ["WanI2V", "i2v_mask"]

log = logging.getLogger("wan.pipeline")


def i2v_mask(frames: int, lat_f: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """The official 4-channel mask [4, lat_f, lat_h, lat_w]: the video's frame mask (1 on frame 0)
    with frame 0 repeated 4 times, folded 4 frames per latent frame into the channels."""
    msk = torch.zeros(1, frames + 3, lat_h, lat_w, device=device)
    msk[:, :4] = 1
    if (frames + 3) // 4 != lat_f:
        raise ValueError(f"{frames} frames do not make {lat_f} latent frames")
    return msk.view(1, lat_f, 4, lat_h, lat_w).transpose(1, 2)[0]


class WanI2V(WanT2V):
    """Wan 2.2 I2V-A14B: WanT2V's text encoder, experts, VAE and solver, conditioned on an image."""

    @classmethod
    def from_pretrained(cls, ckpt_dir, config="i2v-A14B", **kw) -> "WanI2V":
        """The official Wan2.2-I2V-A14B folder (the T2V-A14B layout); the diffusers layout is not read."""
        if is_diffusers_layout(ckpt_dir):
            raise CheckpointError(f"i2v-A14B reads the official layout only; {ckpt_dir} is in the diffusers layout")
        return super().from_pretrained(ckpt_dir, config, **kw)

    @classmethod
    def from_config(cls, config="i2v-tiny", **kw) -> "WanI2V":
        return super().from_config(config, **kw)

    def video_size(self, size, image) -> tuple[int, int]:
        """(width, height): the official rule for `image` within the area of `size`."""
        w, h = size
        st, pt = self.config.vae_stride[1], self.config.dit.patch_size[1]
        lat_w, lat_h = i2v_latent_size(image, w * h, st, pt)
        return lat_w * st, lat_h * st

    def _warm_up_forward(self, model, x, tt, context, seq_len):
        """warm_up's forward, given zero conditioning channels (mask + image latent)."""
        y = torch.zeros(model.config.in_dim - x.shape[0], *x.shape[1:], device=x.device)
        model([x], tt, context, seq_len=seq_len, y=[y])

    def condition(self, image, width: int, height: int, frame_num: int) -> torch.Tensor:
        """y [20, F_lat, H/8, W/8]: the mask, then the VAE latent of [image, zeros...] (frame_num frames)."""
        dev = self.device
        first = i2v_frame(image, width, height)
        video = torch.cat([first, torch.zeros(3, frame_num - 1, height, width)], dim=1)
        lat = self.vae.encode(video[None].to(dev))[0]
        return torch.cat([i2v_mask(frame_num, *lat.shape[1:], device=dev), lat])

    @torch.no_grad()
    def generate(self, prompt: str, image=None, size=(1280, 720), frame_num: int = 81, shift: float | None = None,
                 sample_solver: str = "unipc", sampling_steps: int | None = None, guide_scale=None,
                 n_prompt: str = "", seed: int = -1, offload_model: bool | None = None, progress: bool = True,
                 return_latents: bool = False):
        """-> video [3, frame_num, height, width] float32 in [-1, 1] (or latents [16, F, H/8, W/8]).

        image: a PIL image (wan.image.load_image), required. size: 'W*H' or (width, height), one of
        config.sizes: the area the video fills at the image's aspect ratio; the video's (width,
        height) lands in `last_size`. Other arguments as WanT2V.generate."""
        if image is None:
            raise InputError(f"{self.config.name} needs an image (image=wan.image.load_image(path))")
        offload_model = self.offload == "model" if offload_model is None else offload_model
        cfg = self.config
        shift = cfg.sample_shift if shift is None else shift
        steps = cfg.sample_steps if sampling_steps is None else sampling_steps
        g = cfg.sample_guide_scale if guide_scale is None else guide_scale
        g = (float(g), float(g)) if isinstance(g, (int, float)) else tuple(g)
        w, h = self.video_size(check_request(cfg, size, frame_num, sample_solver, steps, shift=shift,
                                             guide_scale=g, seed=seed), image)
        n_prompt, seed, progress = begin_generation(self, prompt, n_prompt, seed, g, progress)
        dev = self.device
        tm = Timings(device=str(dev))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with tm.measure("total"):
            with tm.measure("text_encode"):
                context, context_null = encode_prompts(self, prompt, n_prompt, g)
            shape = self.latent_shape(w, h, frame_num)
            seq_len = self.seq_len(shape)
            gen = torch.Generator(device=dev).manual_seed(seed)
            latent = torch.randn(*shape, dtype=torch.float32, device=dev, generator=gen)
            with tm.measure("image_encode"):
                y = self.condition(image, w, h, frame_num)
            scheduler = make_scheduler(sample_solver, steps, shift, dev, cfg.num_train_timesteps)
            attention.resolve_backend(dev)  # its log line comes before the progress bar
            with torch.autocast(device_type=dev.type, dtype=cfg.param_dtype):  # WanT2V's loop, every call given y
                latent = denoise(self, latent, scheduler, schedule_steps(cfg, scheduler.timesteps),
                                 Conditioning(context, context_null, seq_len, g, y=y), generator=gen,
                                 offload_model=offload_model, timings=tm, progress=progress, solver=sample_solver,
                                 shift=shift)
            out = latent
            if not return_latents and (self.parallel is None or self.parallel.is_main):
                log.info("decoding %d frames with the VAE ...", frame_num)
                with tm.measure("decode"):
                    z = latent.unsqueeze(0)
                    out = (self.vae.decode(z, progress=True) if progress else self.vae.decode(z))[0]
            elif not return_latents:
                out = None  # rank 0 decodes
        if dev.type == "cuda":
            tm.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
        self.last_timings, self.last_seed, self.last_size = tm, seed, (w, h)
        return out
