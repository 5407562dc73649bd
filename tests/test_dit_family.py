"""The DiT of the rest of the family: the 5B and I2V layouts, the image channels, and per-token
timesteps (TI2V's image mode) against the official per-token computation (same precision; the
row ops against their formula in float64)."""
import pytest
import torch

from wan import dit
from wan.configs import I2V_A14B, TI2V_5B, TINY, DiTConfig
from wan.dit import WanModel
from wan.tokens import TokenRows, TokenTimesteps, timesteps_to_embed

TI2V_TINY_DIT = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                          num_heads=2, num_layers=2, text_len=32)


@pytest.fixture
def model(seed):
    return WanModel.from_config(TI2V_TINY_DIT, seed=seed, zero_head=False)


def _inputs(B=1, F=3, H=8, W=12, dtype=torch.float32):
    x = torch.randn(B, 48, F, H, W, dtype=dtype)
    ctx = [torch.randn(5, 32, dtype=dtype) for _ in range(B)]
    return x, ctx


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("cfg, official, n_keys, n_params, patch, head", [
    (TI2V_5B.dit, dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                       num_layers=30), 825, 4_999_787_712, (3072, 48, 1, 2, 2), (192, 3072)),
    (I2V_A14B.dit, dict(model_type="i2v", in_dim=36, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40,
                        num_layers=40), 1095, 14_288_901_184, (5120, 36, 1, 2, 2), (64, 5120)),
])
def test_official_config_and_layout(cfg, official, n_keys, n_params, patch, head):
    """config.json of the release (bookkeeping keys ignored) -> the task's DiTConfig; the meta-built
    model's state dict has the official counts and shapes."""
    js = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "eps": 1e-06, "freq_dim": 256, "text_len": 512,
          **official}
    assert DiTConfig.from_dict(js) == cfg
    with torch.device("meta"):
        m = WanModel(cfg)
    sd = m.state_dict()
    assert len(sd) == n_keys and sum(v.numel() for v in sd.values()) == n_params
    assert tuple(sd["patch_embedding.weight"].shape) == patch and tuple(sd["head.head.weight"].shape) == head
    assert dit.rope_split(cfg.head_dim) == (22, 21, 21)


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type must be one of t2v, i2v, ti2v"):
        WanModel(DiTConfig(model_type="s2v", dim=64, num_heads=2, num_layers=1, ffn_dim=64, freq_dim=32,
                           text_dim=32, text_len=8))


def test_y_channels_are_concatenated_after_x(seed):
    """Official i2v call: model(x, t, ctx, seq_len, y=[mask + image latent]) == model(cat([x, y]))."""
    m = WanModel.from_config(I2V_A14B.dit.__class__(**{**TINY.dit.__dict__, "model_type": "i2v", "in_dim": 36}),
                             seed=seed, zero_head=False)
    x, y = torch.randn(16, 2, 4, 6), torch.randn(20, 2, 4, 6)
    ctx, t = [torch.randn(3, 32)], torch.tensor([900])
    want = m([torch.cat([x, y])], t, ctx, seq_len=12)[0]
    assert torch.equal(m([x], t, ctx, seq_len=12, y=[y])[0], want)
    assert torch.equal(m(x[None], t, ctx, y=y[None])[0], want)


# ---------------------------------------------------------------- per-token timesteps

def test_token_timesteps_first_frame():
    tt = TokenTimesteps.first_frame(torch.tensor(937), frame_tokens=6, seq_len=20)
    assert tt.values.tolist() == [0, 937] and tt.index.dtype == torch.int32 and tt.index.shape == (1, 20)
    assert tt.dense().tolist() == [[0] * 6 + [937] * 14]
    again = TokenTimesteps.from_dense(tt.dense())
    assert torch.equal(again.dense(), tt.dense())
    with pytest.raises(ValueError, match="frame_tokens"):
        TokenTimesteps.first_frame(torch.tensor(5), 0, 20)


def test_timesteps_to_embed_forms():
    v, idx = timesteps_to_embed(torch.tensor(7), 2, 10, "cpu")
    assert v.tolist() == [7, 7] and idx is None
    v, idx = timesteps_to_embed(torch.full((2, 10), 7.0), 2, 10, "cpu")  # per token, all equal: per sample
    assert v.tolist() == [7.0, 7.0] and idx is None
    v, idx = timesteps_to_embed(TokenTimesteps.first_frame(torch.tensor(7), 3, 10), 2, 10, "cpu")
    assert v.tolist() == [0, 7] and idx.shape == (1, 10)
    with pytest.raises(ValueError, match="cover"):
        timesteps_to_embed(TokenTimesteps.first_frame(torch.tensor(7), 3, 9), 2, 10, "cpu")
    with pytest.raises(ValueError, match="one timestep per sample"):
        timesteps_to_embed(torch.tensor([1, 2, 3]), 2, 10, "cpu")


def official_per_token(model, x, t_dense, ctx, seq_len, embed=None):
    """The official forward with one timestep per token (wan/modules/model.py): e [B, L, C] and
    e0 [B, L, 6, C] per token, modulation = table + e0 per token, head = table + e per token.
    `embed(t) -> (e, e0)` replaces the per-token time embedding (default: the model's, on all tokens)."""
    tokens, grid, lens = model._embed_video(x)
    B, L = tokens.shape[:2]
    h = torch.nn.functional.pad(tokens, (0, 0, 0, seq_len - L))
    e, e0 = (embed or model.time_embed)(t_dense.flatten())
    e, e0 = e.reshape(B, seq_len, -1), e0.reshape(B, seq_len, 6, -1)
    context = model._embed_text(ctx, B, x.device)
    k_lens = lens if seq_len > L else None
    for blk in model.blocks:
        m = blk.modulation[None] + e0
        y = blk.self_attn(dit.modulate(h, m[:, :, 0], m[:, :, 1], blk.eps), k_lens, grid, model.freqs, None)
        h = h + y * m[:, :, 2]
        h = h + blk.cross_attn(blk.norm3(h), context, None)
        y = blk.ffn(dit.modulate(h, m[:, :, 3], m[:, :, 4], blk.eps))
        h = h + y * m[:, :, 5]
    hm = model.head.modulation[None] + e[:, :, None, :]
    out = dit._linear_fp32(model.head.head, dit.modulate(h, hm[:, :, 0], hm[:, :, 1], model.eps))
    return torch.stack([u.float() for u in model._unpatchify(out, grid)])


@pytest.mark.parametrize("pad", [0, 5])
def test_per_token_equals_the_official_computation(model, pad):
    """TI2V image mode: first latent frame's 4*6 tokens at t = 0, the rest (padding included) at t.
    Rows + index == the official per-token embedding (only the time GEMMs' row count differs)."""
    x, ctx = _inputs()
    L = 3 * 4 * 6
    tt = TokenTimesteps.first_frame(torch.tensor(873), frame_tokens=4 * 6, seq_len=L + pad)
    got = model(x, tt, ctx, seq_len=L + pad)
    # the official embedding of every token (GEMMs of L rows, not K: fp32 noise, ~1e-6 in norm)
    want = official_per_token(model, x, tt.dense(), ctx, L + pad)
    err = ((got - want).norm() / want.norm()).item()
    print("relative error in norm", err)
    assert err < 2e-5
    # with the per-token rows taken from the K-row embedding, the official computation is ours bit for bit

    def rows_embed(t_flat):
        e, e0 = model.time_embed(tt.values)
        i = tt.index.long().flatten()
        return e[i], e0[i]
    assert torch.equal(got, official_per_token(model, x, tt.dense(), ctx, L + pad, embed=rows_embed))
    dense = model(x, tt.dense(), ctx, seq_len=L + pad)  # the official call form [B, seq] gives the same
    torch.testing.assert_close(dense, got, atol=0, rtol=0)
    # and it is not the one-timestep answer (the first frame really is at 0)
    assert not torch.allclose(model(x, torch.tensor([873]), ctx, seq_len=L + pad), got, atol=1e-3)


def test_per_token_all_equal_is_the_per_sample_path(model):
    x, ctx = _inputs()
    t = torch.full((1, 72), 500.0)
    assert torch.equal(model(x, t, ctx), model(x, torch.tensor([500.0]), ctx))


def test_per_token_batch_shares_the_index(model):
    """Batched CFG: one index row for both samples == two batch-1 calls."""
    x, _ = _inputs()
    ctx = [torch.randn(5, 32), torch.randn(3, 32)]
    tt = TokenTimesteps.first_frame(torch.tensor(640), 24, 72)
    both = model(x.expand(2, -1, -1, -1, -1), tt, ctx)
    for i in range(2):  # GEMMs of another shape: the batch-vs-single bound of tests/test_dit.py
        one = model(x, tt, ctx[i:i + 1])[0]
        assert ((both[i] - one).norm() / one.norm()).item() < 2e-3


class _Biggest(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_per_token_never_makes_the_L_x_6_x_C_modulation(model):
    """Two distinct timesteps: no tensor as large as the official [B, L, 6, C] appears."""
    x, ctx = _inputs()
    tt = TokenTimesteps.first_frame(torch.tensor(873), 24, 72)
    with _Biggest() as big:
        model(x, tt, ctx)
    assert 0 < big.numel < 72 * 6 * 64


def test_rows_ops_match_their_formula(seed):
    x = torch.randn(2, 7, 96, dtype=torch.float64) * 2 + 1
    shift, scale, gate = (torch.randn(3, 96, dtype=torch.float64) for _ in range(3))
    index = torch.randint(0, 3, (2, 7), dtype=torch.int32)
    mu = x.mean(-1, keepdim=True)
    n = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)
    i = index.long()
    want = n * (1 + scale[i]) + shift[i]
    torch.testing.assert_close(dit.modulate_rows(x, shift, scale, index, 1e-6), want, atol=1e-10, rtol=1e-10)
    y = torch.randn_like(x)
    torch.testing.assert_close(dit.gated_residual_rows(x, y, gate, index), x + y * gate[i], atol=0, rtol=0)
    assert torch.equal(TokenRows(gate, index).gather(), gate[i])
