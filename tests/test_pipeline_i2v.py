"""I2V-A14B pipeline (tiny preset on the CPU) against the official loop written out: the mask and
image-latent channels after the noise's, the experts at boundary 0.900, guidance per expert."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wan.configs import I2V_A14B
from wan.image import i2v_latent_size, to_pixels
from wan.pipeline import expert_of
from wan.pipeline_i2v import WanI2V, i2v_mask
from wan.requests import InputError
from wan.schedulers import make_scheduler

RUN = dict(size="128*128", frame_num=5, sampling_steps=3, seed=11, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return WanI2V.from_config("i2v-tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((90, 160, 3)) * 255).astype(np.uint8))


def official_mask(frames, lat_h, lat_w):
    """wan/image2video.py's mask, step by step."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def official_loop(pipe, prompt, img, area, frame_num, steps, seed, shift=5.0, guide=(3.5, 3.5)):
    lat_w, lat_h = i2v_latent_size(img, area, 8, 2)
    h, w = lat_h * 8, lat_w * 8
    x = to_pixels(img)
    noise = torch.randn(16, (frame_num - 1) // 4 + 1, lat_h, lat_w, generator=torch.Generator().manual_seed(seed))
    ctx, ctx_null = pipe.encode_text([prompt]), pipe.encode_text([pipe.config.sample_neg_prompt])
    first = F.interpolate(x[None], size=(h, w), mode="bicubic").transpose(0, 1)
    y = pipe.vae.encode(torch.cat([first, torch.zeros(3, frame_num - 1, h, w)], dim=1)[None])[0]
    y = torch.cat([official_mask(frame_num, lat_h, lat_w), y])
    seq_len = noise.shape[1] * lat_h * lat_w // 4
    latent = noise
    sch = make_scheduler("unipc", steps, shift, "cpu", 1000)
    experts = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for t in sch.timesteps:
            high = t.item() >= 900
            experts.append("high" if high else "low")
            model, g = (pipe.high_noise_model, guide[1]) if high else (pipe.low_noise_model, guide[0])
            cond = model([latent], t=t[None], context=ctx, seq_len=seq_len, y=[y])[0]
            uncond = model([latent], t=t[None], context=ctx_null, seq_len=seq_len, y=[y])[0]
            v = uncond + g * (cond - uncond)
            latent = sch.step(v[None], t, latent[None], return_dict=False)[0][0]
    return latent, experts


def test_config_is_the_official_i2v_a14b():
    c = I2V_A14B
    assert (c.boundary, c.sample_guide_scale, c.sample_shift, c.sample_steps, c.frame_num, c.sample_fps) == \
        (0.900, (3.5, 3.5), 5.0, 40, 81, 16)
    assert (c.dit.model_type, c.dit.in_dim, c.dit.out_dim, c.vae.z_dim, c.vae_stride) == ("i2v", 36, 16, 16, (4, 8, 8))
    assert c.dit_folders == ("high_noise_model", "low_noise_model") and c.vae_checkpoint == "Wan2.1_VAE.pth"
    assert expert_of(c, 900) == "high" and expert_of(c, 899) == "low"


@pytest.mark.parametrize("frames", [1, 5, 81])
def test_mask_is_the_official_one(frames):
    lat_f = (frames - 1) // 4 + 1
    got = i2v_mask(frames, lat_f, 3, 5)
    assert got.shape == (4, lat_f, 3, 5) and torch.equal(got, official_mask(frames, 3, 5))
    assert got[:, 0].eq(1).all() and got[:, 1:].eq(0).all()


def test_generate_is_the_official_loop(pipe, image):
    got = pipe.generate("a cat on a surfboard", image=image, **RUN, return_latents=True)
    want, experts = official_loop(pipe, "a cat on a surfboard", image, 128 * 128, 5, 3, 11)
    assert pipe.last_size == (160, 96) and got.shape == (16, 2, 12, 20)
    assert torch.equal(got, want)
    assert pipe.last_timings.experts == experts and experts[0] == "high" and "low" in experts
    assert pipe.last_timings.image_encode > 0


def test_video_and_batched_cfg(pipe, image):
    video = pipe.generate("a cat", image=image, **RUN)
    assert video.shape == (3, 5, 96, 160) and video.abs().max() <= 1
    two = pipe.generate("a cat", image=image, **RUN, return_latents=True)
    pipe.use_batched_cfg = True
    try:
        one = pipe.generate("a cat", image=image, **RUN, return_latents=True)
    finally:
        pipe.use_batched_cfg = False
    assert ((one - two).norm() / two.norm()).item() < 2e-2  # one batch-2 call: GEMMs of another shape


def test_image_is_required(pipe):
    with pytest.raises(InputError, match="needs an image"):
        pipe.generate("a cat", **RUN)


def test_block_streaming_is_bit_identical(image):
    """The experts' machinery is WanT2V's: streamed blocks (on the CPU here, allow_cpu) give the same latents."""
    pipe = WanI2V.from_config("i2v-tiny", device="cpu")
    ref = pipe.generate("a cat", image=image, **RUN, return_latents=True)
    pipe.enable_block_streaming(allow_cpu=True)
    assert pipe.offload == "blocks"
    assert torch.equal(pipe.generate("a cat", image=image, **RUN, return_latents=True), ref)
