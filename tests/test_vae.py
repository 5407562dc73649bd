"""Wan2.1 VAE: official key layout, shapes, causality, chunked == whole-sequence, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from wan.configs import VAEConfig
from wan.vae import CausalConv3d, FeatureCache, NearestUpsample2x, ResidualBlock, WanVAE, _cached_conv

TINY = VAEConfig(dim=8)


def _rand_video(b, f, h, w, dtype=torch.float32):
    return (torch.rand(b, 3, f, h, w) * 2 - 1).to(dtype)


@pytest.fixture(scope="module")
def tiny32():
    return WanVAE.from_config(TINY, seed=1)


@pytest.fixture(scope="module")
def tiny64():
    return WanVAE.from_config(TINY, dtype=torch.float64, seed=2)


# ------------------------------------------------------------------ layout

def test_official_layout_full_size_on_meta():
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(v.numel() for v in sd.values()) == 126_892_531
    shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.proj.weight": (384, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.8.residual.6.weight": (192, 192, 3, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.3.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert "encoder.downsamples.2.time_conv.weight" not in sd  # downsample2d
    assert "decoder.upsamples.11.time_conv.weight" not in sd   # upsample2d
    assert not any("shortcut" in k for k in sd if k.startswith("encoder.downsamples.0."))


# ------------------------------------------------------------------ shapes / API

def test_encode_decode_shapes_and_range(tiny32):
    z = tiny32.encode(_rand_video(1, 9, 32, 32))
    assert z.shape == (1, 16, 3, 4, 4) and z.dtype == torch.float32
    assert torch.isfinite(z).all() and z.std() > 1e-2
    x = tiny32.decode(torch.randn(1, 16, 3, 4, 4))
    assert x.shape == (1, 3, 9, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05 and (x.abs() < 1).float().mean() > 0.5  # not constant, not saturated


def test_encode_frame_count_and_batch(tiny32):
    assert tiny32.encode(_rand_video(2, 1, 16, 24)).shape == (2, 16, 1, 2, 3)
    assert tiny32.encode(_rand_video(1, 7, 16, 16)).shape == (1, 16, 2, 2, 2)  # trailing frames dropped
    assert tiny32.decode(torch.randn(2, 16, 1, 2, 3)).shape == (2, 3, 1, 16, 24)
    with pytest.raises(ValueError):
        tiny32.encode(torch.rand(1, 4, 5, 16, 16))
    with pytest.raises(ValueError):
        tiny32.encode(torch.rand(1, 3, 5, 12, 16))
    with pytest.raises(ValueError):
        tiny32.decode(torch.randn(1, 8, 2, 2, 2))


def test_batch_items_independent(tiny32):
    z = torch.randn(2, 16, 2, 2, 3)
    both = tiny32.decode(z)
    torch.testing.assert_close(both[1:], tiny32.decode(z[1:]), atol=1e-5, rtol=1e-5)


def test_latent_normalisation(tiny32):
    """encode = (mu - mean) * (1/std); decode starts from z / (1/std) + mean."""
    cfg = tiny32.config
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.std).view(1, -1, 1, 1, 1)
    video = _rand_video(1, 5, 16, 16)
    x = video.clone()
    with torch.no_grad():
        cache = FeatureCache()
        hs = []
        for chunk in (x[:, :, :1], x[:, :, 1:5]):
            cache.rewind()
            hs.append(tiny32.encoder(chunk, cache))
        mu = tiny32.conv1(torch.cat(hs, 2))[:, :16]
    torch.testing.assert_close(tiny32.encode(video), (mu - mean) * inv_std, atol=0, rtol=0)

    z = torch.randn(1, 16, 1, 2, 2)
    with torch.no_grad():
        ref = tiny32.decoder(tiny32.conv2(z / inv_std + mean), FeatureCache()).clamp(-1, 1)
    torch.testing.assert_close(tiny32.decode(z), ref, atol=0, rtol=0)


def test_decode_ignores_outer_autocast(tiny32):
    z = torch.randn(1, 16, 2, 2, 2)
    ref = tiny32.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny32.decode(z)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_bf16_params(tiny32):
    vae16 = WanVAE.from_config(TINY, dtype=torch.bfloat16, seed=1)
    z = torch.randn(1, 16, 2, 2, 2)
    out = vae16.decode(z)
    assert out.dtype == torch.float32
    ref = tiny32.decode(z)
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99
    assert vae16.encode(_rand_video(1, 5, 16, 16)).dtype == torch.float32


def test_from_config_deterministic():
    a, b, c = (WanVAE.from_config(TINY, seed=s) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.head.2.weight"], sc["decoder.head.2.weight"])


def test_progress_bar(tiny32, capsys):
    """Same output with the bar; the bar counts video frames (1 + 4 per latent frame after the
    first), as the pipeline's 'decoding 9 frames' line does (issue 31 item 9: it said 3/3)."""
    z = torch.randn(1, 16, 3, 2, 2)
    assert torch.equal(tiny32.decode(z, progress=True), tiny32.decode(z))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "9/9" in bar[-1] and "frame" in bar[-1] and not any("3/3" in line for line in bar), bar


# ------------------------------------------------------------------ causality / chunking

def test_decoder_causal(tiny32):
    z = torch.randn(1, 16, 4, 4, 4)
    z2 = z.clone()
    z2[:, :, 2:] = torch.randn(1, 16, 2, 4, 4)
    a, b = tiny32.decode(z), tiny32.decode(z2)
    assert torch.equal(a[:, :, :5], b[:, :, :5])       # latent frames 0,1 -> video frames 0..4
    assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_encoder_causal(tiny32):
    v = _rand_video(1, 13, 16, 16)
    v2 = v.clone()
    v2[:, :, 5:] = _rand_video(1, 8, 16, 16)
    a, b = tiny32.encode(v), tiny32.encode(v2)
    assert torch.equal(a[:, :, :2], b[:, :, :2])       # video frames 0..4 -> latent frames 0,1
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


@pytest.mark.parametrize("chunks", [(1, 4, 2), (1, 1, 1, 1, 3), (2, 5), (3, 1, 3)])
def test_causal_conv_cache_equals_one_pass(chunks):
    torch.manual_seed(0)
    conv = CausalConv3d(5, 6, 3, padding=1).double()
    x = torch.randn(2, 5, sum(chunks), 6, 7, dtype=torch.float64)
    ref = conv(x)
    cache, outs, t = FeatureCache(), [], 0
    for n in chunks:
        cache.rewind()
        outs.append(_cached_conv(conv, x[:, :, t:t + n], cache))
        t += n
    torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-12, rtol=1e-12)
    # the causal padding: output frame t only sees input frames <= t
    x2 = x.clone()
    x2[:, :, 3:] += 1
    torch.testing.assert_close(conv(x2)[:, :, :3], ref[:, :, :3], atol=1e-12, rtol=1e-12)


def test_residual_block_cache_equals_one_pass():
    block = ResidualBlock(4, 6).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(1, 4, 6, 5, 5, dtype=torch.float64)
        ref = block(x)
        cache, outs = FeatureCache(), []
        for s in (slice(0, 1), slice(1, 2), slice(2, 5), slice(5, 6)):
            cache.rewind()
            outs.append(block(x[:, :, s], cache))
    torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 4])
def test_chunked_decode_equals_whole_sequence(tiny64, t):
    z = torch.randn(1, 16, t, 3, 2, dtype=torch.float64)
    out = tiny64.decode(z)
    assert out.shape == (1, 3, 1 + 4 * (t - 1), 24, 16)
    torch.testing.assert_close(out, tiny64._decode_full(z), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("f", [1, 5, 13])
def test_chunked_encode_equals_whole_sequence(tiny64, f):
    v = _rand_video(1, f, 16, 24, torch.float64)
    out = tiny64.encode(v)
    assert out.shape == (1, 16, 1 + (f - 1) // 4, 2, 3)
    torch.testing.assert_close(out, tiny64._encode_full(v), atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------ checkpoints

def test_save_load_round_trip(tiny32, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    tiny32.save_pretrained(path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(tiny32.state_dict())
    loaded = WanVAE.from_pretrained(path, cfg=TINY)
    assert not any(p.is_meta for p in loaded.parameters())
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(loaded.decode(z), tiny32.decode(z))
    # folder form and dtype cast
    loaded16 = WanVAE.from_pretrained(tmp_path, cfg=TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded16.parameters())


def _ckpt_error(path, match):
    from wan.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=match):
        WanVAE.from_pretrained(path, cfg=TINY)


def test_bad_checkpoints(tiny32, tmp_path):
    good = tmp_path / "good.pth"
    tiny32.save_pretrained(good)
    sd = torch.load(good, weights_only=True)

    _ckpt_error(tmp_path / "nope.pth", "missing")

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    _ckpt_error(corrupt, "corrupt")

    truncated = tmp_path / "truncated.pth"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _ckpt_error(truncated, "corrupt")

    for name, bad, match in [
        ("missing_key", {k: v for k, v in sd.items() if k != "decoder.head.2.bias"},
         r"missing key.*decoder\.head\.2\.bias"),
        ("extra_key", {**sd, "decoder.extra.weight": torch.randn(2)}, r"unexpected key.*decoder\.extra\.weight"),
        ("shape", {**sd, "conv2.weight": torch.randn(16, 16, 1, 1, 2)},
         r"conv2\.weight.*\(16, 16, 1, 1, 2\).*\(16, 16, 1, 1, 1\)"),
    ]:
        p = tmp_path / f"{name}.pth"
        torch.save(bad, p)
        _ckpt_error(p, match)

    not_sd = tmp_path / "not_sd.pth"
    torch.save([torch.randn(2)], not_sd)
    _ckpt_error(not_sd, "state dict")

    full = tmp_path / "full_size_cfg.pth"  # tiny weights, official (dim=96) config
    torch.save(sd, full)
    from wan.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="shape mismatch"):
        WanVAE.from_pretrained(full)


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(tiny32, dtype):
    gpu = WanVAE.from_config(TINY, device="cuda", dtype=dtype, seed=1)
    z = torch.randn(1, 16, 3, 4, 4)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 convs
    try:
        out = gpu.decode(z.cuda())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (1, 3, 9, 32, 32)
    ref = tiny32.decode(z)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    else:
        assert torch.corrcoef(torch.stack([out.cpu().flatten(), ref.flatten()]))[0, 1] > 0.99
    lat = gpu.encode(_rand_video(1, 5, 32, 32).cuda())
    assert lat.is_cuda and lat.shape == (1, 16, 2, 4, 4)


def _upsample_same_bits(dtype, channels_last, device):
    x = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    work = torch.promote_types(dtype, torch.float32)
    official = F.interpolate(x.to(work), scale_factor=(2.0, 2.0), mode="nearest-exact").to(dtype)
    ours = NearestUpsample2x()(x)
    assert ours.dtype == dtype and torch.equal(ours, official)
    assert torch.equal(ours, x.repeat_interleave(2, -1).repeat_interleave(2, -2))  # each pixel a 2 x 2 block
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_upsample_same_bits_as_the_official_fp32_round_trip(dtype, channels_last):
    """The official Upsample interpolates a bf16 input in fp32 and casts back; nearest copies values,
    so interpolating in the input's own dtype gives the same bits (and keeps channels-last)."""
    _upsample_same_bits(dtype, channels_last, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_nearest_upsample_same_bits_as_the_official_fp32_round_trip(dtype, channels_last):
    _upsample_same_bits(dtype, channels_last, "cuda")
