"""Two-expert pipeline on the tiny task: official semantics, determinism, checkpoints, video bytes."""
import re

import pytest
import torch

from wan import denoise as wden, pipeline as wp
from wan.configs import TINY, get_config
from wan.pipeline import WanT2V
from wan.requests import InputError, check_request
from wan.video import save_video, video_to_uint8


@pytest.fixture(scope="module")
def pipe():
    return WanT2V.from_config("tiny", device="cpu", seed=0)


def gen(pipe, **kw):
    args = dict(size="128*128", frame_num=5, sampling_steps=3, seed=7, progress=False, return_latents=True)
    args.update(kw)
    return pipe.generate("a red fox runs through snow", **args)


def test_end_to_end_video_shape_and_range(pipe):
    video = gen(pipe, return_latents=False, size="160*96")
    assert video.shape == (3, 5, 96, 160) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0
    tm = pipe.last_timings
    assert len(tm.steps) == 3 and tm.total > 0 and tm.decode > 0


def test_expert_placement_is_timed_apart_from_the_steps(pipe, monkeypatch):
    """Placing the experts (here: each step's `_expert` call made 0.1 s slower, and the block rings
    parked after the last step by a stand-in that sleeps 0.2 s) lands in Timings.offload, not in
    the steps, and in the total: a step's time is the model's work alone."""
    import time

    import wan.denoise

    place = pipe._expert

    def slow_place(t, offload):
        time.sleep(0.1)
        return place(t, offload)

    monkeypatch.setattr(pipe, "offload", "blocks")
    monkeypatch.setattr("wan.pipeline.switch_experts", lambda use, idle, dev: None)
    monkeypatch.setattr(pipe, "_expert", slow_place)
    monkeypatch.setattr(wan.denoise, "park_all", lambda *models: time.sleep(0.2))
    gen(pipe, sampling_steps=2)
    tm = pipe.last_timings
    assert len(tm.moves) == 3 and tm.moves[0] >= 0.1 and tm.moves[-1] >= 0.2
    assert tm.offload >= 0.4 and tm.total >= sum(tm.steps) + tm.offload + tm.text_encode
    assert f"offload {tm.offload:.2f}s" in tm.summary()


def test_same_seed_same_latents_other_seed_differs(pipe):
    a, b, c = gen(pipe, seed=3), gen(pipe, seed=3), gen(pipe, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (16, 2, 16, 16)


def test_expert_switch_and_guidance_at_defaults(pipe, monkeypatch):
    scales = []
    real = wp.cfg_combine

    def spy(uncond, cond, scale):
        scales.append(scale)
        return real(uncond, cond, scale)

    monkeypatch.setattr(wp, "cfg_combine", spy)
    gen(pipe, frame_num=1, sampling_steps=40, shift=12.0)
    experts = pipe.last_timings.experts
    assert experts == ["high"] * 26 + ["low"] * 14  # t >= 875 for the first 26 of 40 steps
    assert scales == [4.0] * 26 + [3.0] * 14        # (low, high) = (3.0, 4.0)


def test_single_guide_scale_applies_to_both(pipe, monkeypatch):
    scales = []
    real = wp.cfg_combine
    monkeypatch.setattr(wp, "cfg_combine", lambda u, c, s: scales.append(s) or real(u, c, s))
    gen(pipe, frame_num=1, sampling_steps=6, guide_scale=5.5)
    assert scales == [5.5] * 6


def test_batched_cfg_matches_two_calls(pipe):
    a = gen(pipe, seed=11)
    pipe.use_batched_cfg = True
    try:
        b = gen(pipe, seed=11)
    finally:
        pipe.use_batched_cfg = False
    assert ((a - b).norm() / a.norm()).item() < 2e-2


def test_dpm_solver_runs(pipe):
    out = gen(pipe, sample_solver="dpm++", sampling_steps=4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size,frames,solver,msg", [
    ("100*100", 5, "unipc", "multiples of 16"),
    ("1280*720", 5, "unipc", "not supported"),
    ("128*128", 6, "unipc", "4n\\+1"),
    ("128*128", 5, "heun", "unknown solver"),
    ("128x", 5, "unipc", "WIDTH\\*HEIGHT"),
])
def test_bad_requests(size, frames, solver, msg):
    with pytest.raises(ValueError, match=msg):
        check_request(TINY, size, frames, solver)


def test_frame_limit_is_the_rope_table():
    """frame_num past config.max_frame_num (4093: 1024 latent frames, the RoPE table's rows) is
    refused before any work (issue 31, item 3: 4097 passed the checks and died in the DiT with an
    IndexError); 4093 is the exact limit: its latent frames index the table's last row."""
    from wan.configs import ROPE_POSITIONS, T2V_A14B
    from wan.dit import WanModel

    for cfg in (TINY, T2V_A14B):
        assert cfg.max_frame_num == 4093
        w, h = cfg.default_size.split("*")
        assert check_request(cfg, cfg.default_size, 4093) == (int(w), int(h))
        for n in (4097, 1000001):
            with pytest.raises(InputError, match=f"^frame_num {n} is past the limit of 4093 frames "
                                                 rf"\(1024 latent frames, the length of the model's RoPE table\)$"):
                check_request(cfg, cfg.default_size, n)
    model = WanModel.from_config(TINY.dit, zero_head=False)
    latent_frames = (TINY.max_frame_num - 1) // TINY.vae_stride[0] + 1
    assert latent_frames == ROPE_POSITIONS
    for f in (latent_frames, latent_frames + 1):  # one token per latent frame (2x2 latents, patch 2x2)
        x = torch.randn(1, 16, f, 2, 2)
        run = lambda: model(x, torch.tensor([500.0]), [torch.randn(3, 32)])  # noqa: E731
        if f <= ROPE_POSITIONS:
            assert run().shape == x.shape
        else:
            with pytest.raises(IndexError):
                run()


def test_official_layout_checkpoint_round_trip(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "ckpt", max_shard_bytes=256 * 1024)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {TINY.t5_checkpoint, TINY.vae_checkpoint, "low_noise_model", "high_noise_model", "google"} <= names
    assert (tmp_path / "ckpt" / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = WanT2V.from_pretrained(tmp_path / "ckpt", "tiny", device="cpu", convert_model_dtype=True)
    torch.testing.assert_close(gen(loaded, seed=5), gen(pipe, seed=5))


def test_video_bytes_truncate_like_official():
    v = torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0, 2.0]).reshape(1, 6, 1, 1).expand(3, 6, 1, 1)
    u8 = video_to_uint8(v)
    assert u8.shape == (6, 1, 1, 3)
    assert u8[:, 0, 0, 0].tolist() == [0, 1, 127, 254, 255, 255]  # (x+1)/2*255 truncated


def test_save_video_mp4(tmp_path):
    video = torch.rand(3, 9, 64, 96) * 2 - 1
    path = save_video(video, tmp_path / "out.mp4", fps=16)
    frames = _read_ffmpeg(path)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 96)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left


def _read_ffmpeg(path):
    import imageio
    import numpy as np

    with imageio.get_reader(str(path), format="FFMPEG") as r:
        return np.stack([f for f in r])  # list(r) asks len(), which is inf for ffmpeg


def test_random_weights_with_the_real_umt5_vocab_build():
    """`from_config` at the real vocab (as --random-weights does at full size) needs no tokenizer files."""
    from dataclasses import replace

    cfg = TINY.replace(name="tiny-bigvocab", t5=replace(TINY.t5, vocab_size=256384))
    p = WanT2V.from_config(cfg, device="cpu")
    ctx = p.encode_text(["hello"])
    assert ctx[0].shape == (len("hello") + 1, TINY.t5.dim)


# ------------------------------------------------------------------ lean pipeline: state, logs, precision

def test_last_seed_and_timings_start_empty_and_drawn_seed_is_kept():
    p = WanT2V.from_config("tiny", device="cpu", seed=0)
    assert p.last_seed is None and p.last_timings is None
    gen(p, seed=-1, sampling_steps=1, frame_num=1)
    assert isinstance(p.last_seed, int) and p.last_seed >= 0
    tm = p.last_timings
    assert len(tm.steps) == 1 and tm.text_encode > 0 and tm.total >= tm.text_encode + tm.denoise


def test_timings_measure_sets_floats_and_appends_lists():
    from wan.timing import Timings

    tm = Timings(device="cpu")
    with tm.measure("decode"):
        pass
    with tm.measure("steps"):
        pass
    with tm.measure("steps"):
        pass
    assert tm.decode >= 0 and len(tm.steps) == 2 and "2 steps" in tm.summary()


def test_long_prompt_is_cut_with_a_warning(pipe, caplog):
    caplog.set_level("INFO", logger="wan.pipeline")
    text_len = pipe.text_encoder.text_len
    prompt = "a fox " * 20  # 120 bytes -> 120 byte tokens + </s> with the tiny byte tokenizer
    n = pipe.prompt_tokens(prompt)
    assert n > text_len
    pipe.generate(prompt, size="128*128", frame_num=1, sampling_steps=1, seed=1, progress=False,
                  return_latents=True)
    warn = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warn == [f"the prompt is {n} tokens long; the text encoder keeps the first {text_len} (text_len) "
                    "and ignores the rest"]
    caplog.clear()
    pipe.generate("short", size="128*128", frame_num=1, sampling_steps=1, seed=1, progress=False,
                  return_latents=True)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_decode_is_announced_and_attention_is_resolved_before_the_bar(pipe, caplog, monkeypatch):
    """The attention backend's log line comes before the progress bar starts (not inside it),
    and the VAE decode, which shows no bar, is announced."""
    from wan import attention as att

    seen = []
    real = wden._progress

    def spy(it, enabled, desc):
        seen.append(str(pipe.device) in att._state["resolved"])
        return real(it, enabled, desc)

    att.set_backend(att.get_backend())  # clears the per-device cache: the next call logs again
    monkeypatch.setattr(wden, "_progress", spy)
    caplog.set_level("INFO")
    gen(pipe, sampling_steps=2, frame_num=5, return_latents=False)
    assert seen == [True]
    msgs = [r.getMessage() for r in caplog.records]
    assert "decoding 5 frames with the VAE ..." in msgs
    assert any(m.startswith("attention backend on cpu") for m in msgs)


def test_cpu_runs_under_the_same_bf16_autocast_as_cuda(pipe, monkeypatch):
    """The documented CPU precision: the DiT runs under bf16 autocast on CPU too (as on CUDA),
    so CPU results follow the GPU's precision map (see the wan.pipeline docstring)."""
    seen = []
    real = type(pipe.low_noise_model).forward

    def spy(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *a, **k)

    monkeypatch.setattr(type(pipe.low_noise_model), "forward", spy)
    gen(pipe, sampling_steps=2, frame_num=1)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)


# ------------------------------------------------------------------ video output never leaves a broken file

class _Writer:
    """Wraps imageio's writer: fail on frame `fail_at` (OSError, like a full disk during the
    frames), or after closing cut the file to `cut_to` bytes (ffmpeg failing on the trailer,
    which imageio does not report)."""

    def __init__(self, real, path, fail_at=None, cut_to=None):
        self.real, self.path, self.fail_at, self.cut_to, self.n = real, path, fail_at, cut_to, 0

    def __enter__(self):
        return self

    def append_data(self, frame):
        if self.n == self.fail_at:
            raise OSError(28, "No space left on device")
        self.n += 1
        self.real.append_data(frame)

    def __exit__(self, *exc):
        self.real.close()
        if self.cut_to is not None:
            with open(self.path, "r+b") as f:
                f.truncate(self.cut_to)
        return False


@pytest.mark.parametrize("how,msg", [
    ("mid_file", "No space left on device"),
    ("trailer", "the finished MP4 does not decode"),
    ("empty", "ffmpeg wrote an empty file"),
])
def test_failing_writer_leaves_no_file(tmp_path, monkeypatch, how, msg):
    import imageio

    from wan.video import VideoWriterError

    real_get_writer = imageio.get_writer

    def get_writer(path, **kw):
        real = real_get_writer(path, **kw)
        if how == "mid_file":
            return _Writer(real, path, fail_at=3)
        return _Writer(real, path, cut_to=0 if how == "empty" else 2000)

    monkeypatch.setattr(imageio, "get_writer", get_writer)
    dest = tmp_path / "v.mp4"
    video = torch.rand(3, 9, 64, 64) * 2 - 1
    with pytest.raises(VideoWriterError, match=msg) as e:
        save_video(video, dest, fps=16)
    assert str(e.value).startswith(f"cannot write {dest}: ") and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_missing_frames_are_caught(tmp_path, monkeypatch):
    """A file that decodes but lacks frames is not a saved video either."""
    from wan import video as wv

    monkeypatch.setattr("imageio_ffmpeg.count_frames_and_secs", lambda p: (4, 0.25))
    with pytest.raises(wv.VideoWriterError, match="holds 4 of 9 frames"):
        save_video(torch.rand(3, 9, 32, 32) * 2 - 1, tmp_path / "v.mp4")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ issue 22: bad numbers and tensors

@pytest.mark.parametrize("kw,msg", [
    (dict(shift=0.0), "shift must be > 0, got 0.0"),
    (dict(shift=-1.0), "shift must be > 0, got -1.0"),
    (dict(shift=float("nan")), "shift must be a finite number, got nan"),
    (dict(guide_scale=float("nan")), "guide_scale must be a finite number, got nan"),
    (dict(guide_scale=(3.0, float("inf"))), "guide_scale must be a finite number, got inf"),
    (dict(seed=2 ** 64), "seed must be -1 (random) or 0..9223372036854775807"),
    (dict(seed=-2), "seed must be -1 (random) or 0..9223372036854775807"),
])
def test_generate_refuses_bad_numbers_before_any_work(pipe, kw, msg):
    pipe.last_timings = None
    with pytest.raises(InputError, match=re.escape(msg)):
        pipe.generate("a cat", size=(128, 128), frame_num=5, sampling_steps=1, progress=False, **kw)
    assert pipe.last_timings is None  # nothing ran


def test_negative_guidance_is_allowed_and_logged(pipe, caplog):
    with caplog.at_level("WARNING", logger="wan.pipeline"):
        z = pipe.generate("a cat", size=(128, 128), frame_num=5, sampling_steps=1, guide_scale=-2.0, seed=1,
                          progress=False, return_latents=True)
    assert torch.isfinite(z).all() and "guidance scale -2/-2 is negative" in caplog.text


@pytest.mark.parametrize("video,name,msg", [
    (torch.full((3, 5, 32, 32), float("nan")), "v.mp4", "holds 15360 non-finite values (NaN or inf)"),
    (torch.rand(3, 32, 32), "v.mp4", "got shape [3, 32, 32] (one frame? add the frame axis: video.unsqueeze(1))"),
    (torch.rand(5, 32, 32, 3), "v.mp4", "needs a [3, F, H, W] video tensor"),
    (torch.rand(3, 5, 32, 32), "v.gif", "videos are written as MP4 only, got '.gif'; use a name ending in .mp4"),
])
def test_save_video_refuses_what_it_cannot_write(tmp_path, video, name, msg):
    with pytest.raises(InputError, match=re.escape(msg)) as e:
        save_video(video, tmp_path / name)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_random_a14b_on_a_small_host_is_one_line(monkeypatch):
    from wan import hostmem
    from wan.footprint import build_footprint

    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(24 * 10 ** 9, "cgroup memory.max"))
    with pytest.raises(InputError, match=r"building t2v-A14B on cpu needs ~69\.0 GB of host RAM .* and 24\.0 GB is "
                                         r"free \(cgroup memory.max\)"):
        WanT2V.from_config("t2v-A14B", device="cpu")
    cuda = build_footprint(get_config("t2v-A14B"), "cuda", t5_cpu=True)  # experts on the GPU: only the T5 here
    assert [name for name, _ in cuda.parts] == ["text encoder"]
