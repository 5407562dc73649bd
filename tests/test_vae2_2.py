"""Wan2.2 VAE (vae2_2): the official key table, the new pieces against their formulas in float64,
chunked == whole-sequence, causality, normalisation, checkpoints under the official names."""
import pytest
import torch

from wan.checkpoint import CheckpointError
from wan.configs import VAE22_MEAN, VAE22_STD, VAE22Config
from wan.vae2_2 import AvgDown, DupUp, Wan22VAE, fold_pixels, unfold_pixels, vae_class
from wan.vae import WanVAE

TINY = VAE22Config(dim=8, dec_dim=8)


def _video(b, f, h, w, dtype=torch.float32):
    return (torch.rand(b, 3, f, h, w) * 2 - 1).to(dtype)


@pytest.fixture(scope="module")
def tiny32():
    return Wan22VAE.from_config(TINY, seed=1)


@pytest.fixture(scope="module")
def tiny64():
    return Wan22VAE.from_config(TINY, dtype=torch.float64, seed=2)


# ------------------------------------------------------------------ the official key table

def _rb(prefix, i, o):
    """The tensors of one official ResidualBlock(i, o) under `prefix`."""
    keys = {f"{prefix}.residual.0.gamma": (i, 1, 1, 1), f"{prefix}.residual.2.weight": (o, i, 3, 3, 3),
            f"{prefix}.residual.2.bias": (o,), f"{prefix}.residual.3.gamma": (o, 1, 1, 1),
            f"{prefix}.residual.6.weight": (o, o, 3, 3, 3), f"{prefix}.residual.6.bias": (o,)}
    if i != o:
        keys.update({f"{prefix}.shortcut.weight": (o, i, 1, 1, 1), f"{prefix}.shortcut.bias": (o,)})
    return keys


def _middle(prefix, c):
    keys = {**_rb(f"{prefix}.0", c, c), **_rb(f"{prefix}.2", c, c)}
    keys.update({f"{prefix}.1.norm.gamma": (c, 1, 1), f"{prefix}.1.to_qkv.weight": (3 * c, c, 1, 1),
                 f"{prefix}.1.to_qkv.bias": (3 * c,), f"{prefix}.1.proj.weight": (c, c, 1, 1),
                 f"{prefix}.1.proj.bias": (c,)})
    return keys


def _conv(prefix, o, i, k):
    return {f"{prefix}.weight": (o, i, *k), f"{prefix}.bias": (o,)}


# The official tree (wan/modules/vae2_2.py at dim 160, dec_dim 256, z 48): per encoder stage
# (in, out, residual blocks, resample: None / '2d' / '3d'), per decoder stage likewise.
ENC_STAGES = [(160, 160, 2, "2d"), (160, 320, 2, "3d"), (320, 640, 2, "3d"), (640, 640, 2, None)]
DEC_STAGES = [(1024, 1024, 3, "3d"), (1024, 1024, 3, "3d"), (1024, 512, 3, "2d"), (512, 256, 3, None)]


def official_keys() -> dict:
    keys = _conv("encoder.conv1", 160, 12, (3, 3, 3))
    for s, (i, o, n, res) in enumerate(ENC_STAGES):
        for j in range(n):
            keys.update(_rb(f"encoder.downsamples.{s}.downsamples.{j}", i if j == 0 else o, o))
        if res is not None:
            keys.update(_conv(f"encoder.downsamples.{s}.downsamples.{n}.resample.1", o, o, (3, 3)))
        if res == "3d":
            keys.update(_conv(f"encoder.downsamples.{s}.downsamples.{n}.time_conv", o, o, (3, 1, 1)))
    keys.update(_middle("encoder.middle", 640))
    keys.update({"encoder.head.0.gamma": (640, 1, 1, 1), **_conv("encoder.head.2", 96, 640, (3, 3, 3))})
    keys.update({**_conv("conv1", 96, 96, (1, 1, 1)), **_conv("conv2", 48, 48, (1, 1, 1))})
    keys.update(_conv("decoder.conv1", 1024, 48, (3, 3, 3)))
    keys.update(_middle("decoder.middle", 1024))
    for s, (i, o, n, res) in enumerate(DEC_STAGES):
        for j in range(n):
            keys.update(_rb(f"decoder.upsamples.{s}.upsamples.{j}", i if j == 0 else o, o))
        if res is not None:
            keys.update(_conv(f"decoder.upsamples.{s}.upsamples.{n}.resample.1", o, o, (3, 3)))
        if res == "3d":
            keys.update(_conv(f"decoder.upsamples.{s}.upsamples.{n}.time_conv", 2 * o, o, (3, 1, 1)))
    keys.update({"decoder.head.0.gamma": (256, 1, 1, 1), **_conv("decoder.head.2", 12, 256, (3, 3, 3))})
    return keys


def test_state_dict_is_the_official_key_table():
    with torch.device("meta"):
        vae = Wan22VAE(VAE22Config())
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    want = official_keys()
    assert set(got) - set(want) == set() and set(want) - set(got) == set()
    assert got == want
    assert len(got) == 196
    assert sum(v.numel() for v in vae.state_dict().values()) == 704_688_668  # 2.82 GB in fp32


def test_official_names_load_unchanged(tiny32, tmp_path):
    """A state dict saved by our module under the official names (Wan2.2_VAE.pth) loads strictly,
    from the file or from its folder, and decodes bit for bit as the module that saved it."""
    tiny32.save_pretrained(tmp_path / "Wan2.2_VAE.pth")
    sd = torch.load(tmp_path / "Wan2.2_VAE.pth", weights_only=True)
    assert set(sd) == set(tiny32.state_dict())
    assert any(k.startswith("decoder.upsamples.0.upsamples.3.time_conv") for k in sd)
    for src in (tmp_path / "Wan2.2_VAE.pth", tmp_path):
        loaded = Wan22VAE.from_pretrained(src, cfg=TINY)
        z = torch.randn(1, 48, 2, 2, 2)
        assert torch.equal(loaded.decode(z), tiny32.decode(z))
    bad = dict(sd)
    bad["decoder.upsamples.0.upsamples.3.resample.1.weight"] = torch.randn(8, 32, 3, 3)  # Wan2.1's halving conv
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Wan22VAE.from_pretrained(tmp_path / "bad.pth", cfg=TINY)


def test_vae_class_by_config():
    assert vae_class(VAE22Config()) is Wan22VAE and vae_class(Wan22VAE.config_class()) is Wan22VAE
    from wan.configs import VAEConfig
    assert vae_class(VAEConfig()) is WanVAE


# ------------------------------------------------------------------ the new pieces, from their formulas

def test_fold_pixels_formula(seed):
    x = torch.randn(2, 3, 2, 4, 6, dtype=torch.float64)
    y = fold_pixels(x, 2)
    assert y.shape == (2, 12, 2, 2, 3)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                torch.testing.assert_close(y[:, 4 * c + 2 * dx + dy], x[:, c, :, dy::2, dx::2], atol=0, rtol=0)
    assert torch.equal(unfold_pixels(y, 2), x)


def test_avg_down_formula(seed):
    """out[o] = mean over the o-th group of (channel, dt, dy, dx) positions, frames front-padded with zeros."""
    x = torch.randn(1, 4, 3, 4, 4, dtype=torch.float64)
    got = AvgDown(4, 8, ft=2, fs=2)(x)
    assert got.shape == (1, 8, 2, 2, 2)
    xp = torch.cat([torch.zeros_like(x[:, :, :1]), x], dim=2)  # 3 frames -> pad 1 in front
    flat = []
    for c in range(4):
        for dt in range(2):
            for dy in range(2):
                for dx in range(2):
                    flat.append(xp[:, c, dt::2, dy::2, dx::2])
    flat = torch.stack(flat, dim=1)  # [1, 32, 2, 2, 2]
    want = flat.reshape(1, 8, 4, 2, 2, 2).mean(dim=2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_dup_up_formula(seed):
    """out[o, t*ft + dt, h*fs + dy, w*fs + dx] = repeated channel (o*f + (dt*fs + dy)*fs + dx) // repeats."""
    x = torch.randn(1, 4, 2, 2, 3, dtype=torch.float64)
    up = DupUp(4, 2, ft=2, fs=2)  # f = 8, repeats = 2*8/4 = 4
    got = up(x)
    assert got.shape == (1, 2, 4, 4, 6)
    for o in range(2):
        for dt in range(2):
            for dy in range(2):
                for dx in range(2):
                    src = (o * 8 + (dt * 2 + dy) * 2 + dx) // up.repeats
                    torch.testing.assert_close(got[:, o, dt::2, dy::2, dx::2], x[:, src], atol=0, rtol=0)
    assert torch.equal(up(x, first_chunk=True), got[:, :, 1:])


# ------------------------------------------------------------------ shapes, chunking, causality

def test_encode_decode_shapes_and_range(tiny32):
    z = tiny32.encode(_video(1, 9, 64, 32))
    assert z.shape == (1, 48, 3, 4, 2) and z.dtype == torch.float32 and torch.isfinite(z).all()
    x = tiny32.decode(torch.randn(1, 48, 3, 4, 2))
    assert x.shape == (1, 3, 9, 64, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    assert tiny32.space_stride == 16 and tiny32.time_stride == 4
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny32.encode(_video(1, 1, 24, 32))


@pytest.mark.parametrize("t", [1, 2, 3])
def test_chunked_decode_equals_whole_sequence(tiny64, t):
    z = torch.randn(1, 48, t, 2, 3, dtype=torch.float64)
    out = tiny64.decode(z)
    assert out.shape == (1, 3, 1 + 4 * (t - 1), 32, 48)
    torch.testing.assert_close(out, tiny64._decode_full(z), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("f", [1, 5, 9])
def test_chunked_encode_equals_whole_sequence(tiny64, f):
    v = _video(1, f, 32, 16, torch.float64)
    out = tiny64.encode(v)
    assert out.shape == (1, 48, 1 + (f - 1) // 4, 2, 1)
    torch.testing.assert_close(out, tiny64._encode_full(v), atol=1e-10, rtol=1e-10)


def test_decoder_and_encoder_causal(tiny32):
    z = torch.randn(1, 48, 3, 2, 2)
    z2 = z.clone()
    z2[:, :, 2:] += 1
    a, b = tiny32.decode(z), tiny32.decode(z2)
    assert torch.equal(a[:, :, :5], b[:, :, :5]) and not torch.allclose(a[:, :, 5:], b[:, :, 5:])
    v = _video(1, 9, 32, 32)
    v2 = v.clone()
    v2[:, :, 5:] = _video(1, 4, 32, 32)
    ea, eb = tiny32.encode(v), tiny32.encode(v2)
    assert torch.equal(ea[:, :, :2], eb[:, :, :2]) and not torch.allclose(ea[:, :, 2:], eb[:, :, 2:])


def test_latent_normalisation_uses_the_wan22_statistics(tiny32):
    assert len(VAE22_MEAN) == len(VAE22_STD) == 48 and tiny32.config.mean == VAE22_MEAN
    mean = torch.tensor(VAE22_MEAN).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(VAE22_STD).view(1, -1, 1, 1, 1)
    z = torch.randn(1, 48, 1, 2, 2)
    with torch.no_grad():
        ref = tiny32.decoder(tiny32.conv2(z / inv_std + mean)).clamp(-1, 1)
    assert torch.equal(tiny32.decode(z), ref)
    v = _video(1, 1, 32, 32)
    with torch.no_grad():
        mu = tiny32.conv1(tiny32.encoder(v))[:, :48]
    assert torch.equal(tiny32.encode(v), (mu - mean) * inv_std)
