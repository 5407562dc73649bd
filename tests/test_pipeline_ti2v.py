"""TI2V-5B pipeline (tiny preset on the CPU): text and image modes against the official loop written
out (dense per-token timesteps, mask arithmetic), the official image sizing, checkpoints, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from wan.configs import TI2V_5B, TI2V_TINY
from wan.image import best_output_size, i2v_latent_size, load_image, ti2v_frame, ti2v_size
from wan.offload import OffloadError
from wan.pipeline_ti2v import WanTI2V
from wan.requests import InputError
from wan.schedulers import make_scheduler
from wan.tokens import TokenTimesteps

RUN = dict(size="128*128", frame_num=5, sampling_steps=2, seed=7, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return WanTI2V.from_config("ti2v-tiny", device="cpu")


def _image(w=160, h=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def official_loop(pipe, prompt, image, size, frame_num, steps, seed, g=5.0, shift=5.0):
    """wan/textimage2video.py's loop written out: mask2 with frame 0 at 0 in image mode, per-token
    t = mask2[0][:, ::2, ::2] * t padded with t, latent = (1 - mask2) * z + mask2 * latent."""
    w, h = size
    if image is not None:
        w, h = ti2v_size(image, w * h, 32)
    ctx, ctx_null = pipe.encode_text([prompt]), pipe.encode_text([pipe.config.sample_neg_prompt])
    shape = (48, (frame_num - 1) // 4 + 1, h // 16, w // 16)
    seq_len = shape[1] * shape[2] * shape[3] // 4
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(noise)
    latent = noise
    if image is not None:
        z = pipe.vae.encode(ti2v_frame(image, w, h)[None])[0]
        mask[:, 0] = 0
        latent = (1.0 - mask) * z + mask * latent
    sch = make_scheduler("unipc", steps, shift, "cpu", 1000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for t in sch.timesteps:
            ts = (mask[0][:, ::2, ::2] * t).flatten()
            ts = torch.cat([ts, ts.new_ones(seq_len - ts.numel()) * t])[None]
            cond = pipe.model([latent], ts, ctx, seq_len=seq_len)[0]
            uncond = pipe.model([latent], ts, ctx_null, seq_len=seq_len)[0]
            v = uncond + g * (cond - uncond)
            latent = sch.step(v[None], t, latent[None], return_dict=False)[0][0]
            if image is not None:
                latent = (1.0 - mask) * z + mask * latent
    return latent


def test_config_is_the_official_ti2v_5b():
    c = TI2V_5B
    assert (c.sample_fps, c.frame_num, c.sample_shift, c.sample_steps, c.sample_guide_scale) == (24, 121, 5.0, 50, 5.0)
    assert c.sizes == ("1280*704", "704*1280") and c.default_size == "1280*704" and c.vae_stride == (4, 16, 16)
    assert (c.vae_checkpoint, c.dit_folders) == ("Wan2.2_VAE.pth", (".",)) and c.vae.z_dim == 48


def test_text_mode_is_the_official_loop(pipe):
    got = pipe.generate("a red fox", **RUN, return_latents=True)
    assert got.shape == (48, 2, 8, 8)
    assert torch.equal(got, official_loop(pipe, "a red fox", None, (128, 128), 5, 2, 7))
    assert pipe.last_size == (128, 128) and pipe.last_timings.experts == ["model", "model"]


def test_image_mode_is_the_official_loop(pipe):
    img = _image()
    got = pipe.generate("a red fox", image=img, **RUN, return_latents=True)
    w, h = ti2v_size(img, 128 * 128, 32)
    assert pipe.last_size == (w, h) == (160, 96)  # the image's aspect ratio within the area of 128*128
    assert got.shape == (48, 2, h // 16, w // 16)
    want = official_loop(pipe, "a red fox", img, (128, 128), 5, 2, 7)
    assert torch.equal(got, want)
    z = pipe.vae.encode(ti2v_frame(img, w, h)[None])[0]
    assert torch.equal(got[:, :1], z)  # the first latent frame is the image's
    assert pipe.last_timings.image_encode > 0


def test_image_mode_calls_the_model_with_two_timesteps(pipe, monkeypatch):
    seen = []
    real = pipe.model.forward

    def spy(x, t, context, seq_len=None, y=None):
        seen.append(t)
        return real(x, t, context, seq_len=seq_len, y=y)

    monkeypatch.setattr(pipe.model, "forward", spy)
    pipe.generate("a red fox", image=_image(), **RUN)
    assert len(seen) == 4 and all(isinstance(t, TokenTimesteps) for t in seen)
    tt = seen[0]
    assert tt.values[0] == 0 and tt.values[1] > 900 and tt.index.shape == (1, 2 * 3 * 5)  # latent 2 x 6 x 10
    assert tt.index[0, :15].eq(0).all() and tt.index[0, 15:].eq(1).all()  # the 3x5 first-frame tokens at 0


def test_generate_video_and_determinism(pipe):
    a = pipe.generate("a red fox", **RUN)
    b = pipe.generate("a red fox", **RUN)
    assert a.shape == (3, 5, 128, 128) and torch.equal(a, b) and a.abs().max() <= 1


def test_bad_requests(pipe):
    with pytest.raises(InputError, match="one guidance scale"):
        pipe.generate("x", guide_scale=(3.0, 4.0), **RUN)
    with pytest.raises(InputError, match="not supported by ti2v-tiny"):
        pipe.generate("x", **{**RUN, "size": "1280*720"})
    with pytest.raises(OffloadError, match="ti2v-5B is one model"):
        WanTI2V.from_config("ti2v-tiny", offload="blocks")
    with pytest.raises(OffloadError, match="ti2v-5B is one model"):
        pipe.enable_block_streaming()
    from wan.lora import LoraError
    with pytest.raises(LoraError, match="ti2v-5B is not supported"):
        pipe.load_lora("x.safetensors")


def test_checkpoint_round_trip_official_layout(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt", max_shard_bytes=256 * 1024)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google"} <= names
    assert "diffusion_pytorch_model.safetensors.index.json" in names  # the DiT at the top, sharded
    loaded = WanTI2V.from_pretrained(tmp_path / "ckpt", TI2V_TINY, device="cpu")
    for a, b in zip(pipe.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "ckpt" / "Wan2.2_VAE.pth").unlink()
    from wan.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="Wan2.2_VAE.pth"):
        WanTI2V.from_pretrained(tmp_path / "ckpt", TI2V_TINY, device="cpu")


# ------------------------------------------------------------------ the official sizing rules

@pytest.mark.parametrize("w, h, want", [(1920, 1080, (1248, 704)), (1080, 1920, (704, 1248)),
                                        (1000, 1000, (960, 928)), (1280, 704, (1280, 704))])
def test_best_output_size(w, h, want):
    """Worked by hand from the official rule (width-first vs height-first, closer ratio; tie: height-first)."""
    got = best_output_size(w, h, 32, 32, 1280 * 704)
    assert got == want and got[0] * got[1] <= 1280 * 704 and got[0] % 32 == got[1] % 32 == 0


@pytest.mark.parametrize("w, h, want", [(1920, 1080, (160, 90)), (1080, 1920, (90, 160)), (1000, 1000, (120, 120))])
def test_i2v_latent_size(w, h, want):
    """sqrt(area * h/w) // 8 // 2 * 2 (and w/h) for 1280*720."""
    assert i2v_latent_size(Image.new("RGB", (w, h)), 1280 * 720, 8, 2) == want


def test_ti2v_frame_and_load_image(tmp_path):
    img = _image(200, 100)
    x = ti2v_frame(img, 160, 96)
    assert x.shape == (3, 1, 96, 160) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    img.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").size == (200, 100)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot be read as an image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "none.png")
