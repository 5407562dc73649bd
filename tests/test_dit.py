"""Reference DiT: official state-dict layout, API contracts, formulas (docs/) in float64."""
import json
import math

import pytest
import torch

from wan import dit
from wan.checkpoint import CheckpointError
from wan.configs import T2V_A14B, TINY, DiTConfig
from wan.dit import WanModel


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def tiny_model(seed):
    return WanModel.from_config(TINY.dit, seed=seed, zero_head=False)


def tiny_inputs(B=2, F=3, H=8, W=12, text=(5, 7)):
    x = torch.randn(B, 16, F, H, W)
    t = torch.randint(0, 1000, (B,))
    ctx = [torch.randn(n, TINY.dit.text_dim) for n in text[:B]]
    return x, t, ctx


# ---------------------------------------------------------------- layout

def test_a14b_state_dict_matches_official_layout():
    with torch.device("meta"):
        m = WanModel(T2V_A14B.dit)
    sd = m.state_dict()
    assert len(sd) == 1095
    assert sum(v.numel() for v in sd.values()) == 14_288_491_584
    shapes = {
        "patch_embedding.weight": (5120, 16, 1, 2, 2), "patch_embedding.bias": (5120,),
        "text_embedding.0.weight": (5120, 4096), "text_embedding.2.weight": (5120, 5120),
        "time_embedding.0.weight": (5120, 256), "time_embedding.2.weight": (5120, 5120),
        "time_projection.1.weight": (30720, 5120), "time_projection.1.bias": (30720,),
        "blocks.0.modulation": (1, 6, 5120), "blocks.39.self_attn.q.weight": (5120, 5120),
        "blocks.7.self_attn.norm_q.weight": (5120,), "blocks.7.cross_attn.norm_k.weight": (5120,),
        "blocks.3.norm3.weight": (5120,), "blocks.3.norm3.bias": (5120,),
        "blocks.5.ffn.0.weight": (13824, 5120), "blocks.5.ffn.2.weight": (5120, 13824),
        "head.modulation": (1, 2, 5120), "head.head.weight": (64, 5120), "head.head.bias": (64,),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm2", "head.norm")) for k in sd)
    assert sum(k.startswith("blocks.0.") for k in sd) == 27


def test_freqs_is_complex128_attribute_not_state():
    m = WanModel.from_config(TINY.dit).to(torch.bfloat16)
    assert m.freqs.dtype == torch.complex128
    assert "freqs" not in m.state_dict()
    assert m.freqs.shape == (1024, TINY.dit.head_dim // 2)


def test_config_from_official_json_ignores_bookkeeping():
    official = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 5120, "eps": 1e-06,
                "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
                "num_layers": 40, "out_dim": 16, "text_len": 512}
    assert DiTConfig.from_dict(official) == T2V_A14B.dit


def test_official_init_zero_head_gives_zero_output():
    m = WanModel.from_config(TINY.dit, seed=0)
    x, t, ctx = tiny_inputs()
    assert torch.count_nonzero(m(x, t, ctx)) == 0


# ---------------------------------------------------------------- forward contracts

def test_forward_shape_dtype_and_determinism(tiny_model):
    x, t, ctx = tiny_inputs()
    a = tiny_model(x, t, ctx)
    b = tiny_model(x, t, ctx)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.abs().mean() > 0


def test_list_and_tensor_api_agree(tiny_model):
    x, t, ctx = tiny_inputs()
    a = tiny_model(x, t, ctx)
    b = tiny_model(list(x), t, ctx)
    assert isinstance(b, list) and len(b) == 2
    torch.testing.assert_close(torch.stack(b), a)
    padded = torch.nn.utils.rnn.pad_sequence(ctx, batch_first=True)  # zero-padded tensor context
    torch.testing.assert_close(tiny_model(x, t, padded), a)


def test_batch_equals_single_calls(tiny_model):
    x, t, ctx = tiny_inputs()
    both = tiny_model(x, t, ctx)
    for i in range(2):
        one = tiny_model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
        assert rel_err(one[0], both[i]) < 2e-3


def test_padded_seq_len_keeps_valid_outputs(tiny_model):
    x, t, ctx = tiny_inputs()
    L = 3 * 4 * 6
    a = tiny_model(x, t, ctx)
    b = tiny_model(x, t, ctx, seq_len=L + 13)
    assert rel_err(b, a) < 2e-3
    with pytest.raises(ValueError, match="seq_len"):
        tiny_model(x, t, ctx, seq_len=L - 1)


def test_mixed_sizes_in_one_batch(tiny_model):
    xa, xb = torch.randn(16, 3, 8, 12), torch.randn(16, 2, 6, 4)
    ctx = [torch.randn(5, 32), torch.randn(3, 32)]
    t = torch.tensor([900, 100])
    out = tiny_model([xa, xb], t, ctx)
    assert [o.shape for o in out] == [xa.shape, xb.shape]
    alone = tiny_model([xb], t[1:], ctx[1:])[0]
    assert rel_err(out[1], alone) < 2e-3


def test_bad_inputs_raise(tiny_model):
    x, t, ctx = tiny_inputs()
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="contexts"):
        tiny_model(x, t, ctx[:1])
    with pytest.raises(ValueError, match="text_len"):
        tiny_model(x, t, [torch.randn(TINY.dit.text_len + 1, 32)] * 2)


def test_bf16_autocast_close_to_fp32(tiny_model):
    x, t, ctx = tiny_inputs()
    ref = tiny_model(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(x, t, ctx)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 5e-2


def test_fp32_regions_ignore_an_enclosing_autocast(tiny_model, device):
    """Time embedding and head run fp32 GEMMs under the pipeline's bf16 autocast, as the official
    autocast(float32) regions do: results equal the computation without autocast, bit for bit."""
    m = tiny_model.to(device)
    t = torch.tensor([950, 300], device=device)
    x = torch.randn(2, 37, TINY.dit.dim, device=device)
    e_ref, e0_ref = m.time_embed(t)
    head_ref = m.head(x, e_ref)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        e, e0 = m.time_embed(t)
        head = m.head(x, e)
    assert e.dtype == e0.dtype == head.dtype == torch.float32
    assert torch.equal(e, e_ref) and torch.equal(e0, e0_ref) and torch.equal(head, head_ref)


class _GemmDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (innermost module name, input dtypes) of every GEMM / convolution that reaches
    the kernels, i.e. after autocast has cast its inputs."""
    GEMMS = {"addmm", "mm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention_for_cpu"}

    def __init__(self, model):
        super().__init__()
        self.stack, self.seen, self.hooks = [""], [], []
        for name, mod in model.named_modules():
            self.hooks.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: self.stack.append(n)))
            self.hooks.append(mod.register_forward_hook(self._pop))

    def _pop(self, *_):
        self.stack.pop()  # returns None: the module's output is kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.GEMMS:
            dts = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((self.stack[-1], func.overloadpacket.__name__, dts))
        return func(*args, **(kwargs or {}))


def test_precision_map_under_bf16_autocast(tiny_model):
    """The precision map (docs/precision.md): under autocast(bf16) the time embedding / projection
    (at the model's top level) and the head GEMM take fp32 inputs; every other GEMM and the patch
    convolution take bf16 inputs."""
    x, t, ctx = tiny_inputs()
    rec = _GemmDtypes(tiny_model)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), rec:
            tiny_model(x, t, ctx)
    finally:
        for h in rec.hooks:
            h.remove()
    fp32 = [s for s in rec.seen if s[0] in ("", "head")]
    assert len(fp32) == 4, fp32  # time_embedding x2, time_projection, head
    assert all(dts == {torch.float32} for _, _, dts in fp32), fp32
    rest = [s for s in rec.seen if s[0] not in ("", "head")]
    assert rest and all(dts == {torch.bfloat16} for _, _, dts in rest), [s for s in rest if s[2] != {torch.bfloat16}]
    assert any(n == "patch_embedding" for n, _, _ in rest) and any(n.endswith("ffn.2") for n, _, _ in rest)


# ---------------------------------------------------------------- formulas (docs/rope.md, docs/precision.md) in float64

def _rope_by_formula(x, grid, head_dim):
    """docs/rope.md written directly: per token (f,h,w), per pair j, angle = pos * 10000^(-2j'/D_axis)."""
    B, L, H, D = x.shape
    c = D // 2
    cf, ch = c - 2 * (c // 3), c // 3
    out = x.double().clone()
    for b in range(B):
        Fg, Hg, Wg = grid[b]
        for n in range(min(L, Fg * Hg * Wg)):
            pos = (n // (Hg * Wg), (n % (Hg * Wg)) // Wg, n % Wg)
            for j in range(c):
                if j < cf:
                    axis, jj, Dax = 0, j, 2 * cf
                elif j < cf + ch:
                    axis, jj, Dax = 1, j - cf, 2 * ch
                else:
                    axis, jj, Dax = 2, j - cf - ch, 2 * ch
                ang = pos[axis] * 10000.0 ** (-2.0 * jj / Dax)
                re, im = x[b, n, :, 2 * j].double(), x[b, n, :, 2 * j + 1].double()
                out[b, n, :, 2 * j] = re * math.cos(ang) - im * math.sin(ang)
                out[b, n, :, 2 * j + 1] = re * math.sin(ang) + im * math.cos(ang)
    return out


def test_rope_matches_spec_formula(seed):
    head_dim = 32
    m = WanModel.from_config(DiTConfig(dim=64, num_heads=2, num_layers=1, ffn_dim=64, freq_dim=32, text_dim=32,
                                       text_len=8))
    grid = torch.tensor([[2, 3, 4], [1, 2, 5]])
    L = 2 * 3 * 4 + 3  # sample 0 has 3 padding tokens, sample 1 has 17
    x = torch.randn(2, L, 2, head_dim, dtype=torch.float64)
    got = dit.rope_apply(x, grid, m.freqs)
    want = _rope_by_formula(x, grid.tolist(), head_dim)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1, 10:], x[1, 10:].float())  # padding untouched


def test_rope_a14b_split():
    assert dit.rope_split(128) == (22, 21, 21)


@pytest.mark.parametrize("head_dim", [128, 32, 12])
def test_rope_freqs_is_the_official_table(head_dim):
    """Official construction: rope_params(1024, d - 4*(d//6)), then twice rope_params(1024, 2*(d//6))."""
    d = head_dim
    want = torch.cat([dit.rope_params(1024, d - 4 * (d // 6)), dit.rope_params(1024, 2 * (d // 6)),
                      dit.rope_params(1024, 2 * (d // 6))], dim=1)
    got = dit.rope_freqs(head_dim)
    assert got.dtype == torch.complex128 and torch.equal(got, want)


@pytest.mark.parametrize("offset", [0, 5, 23, 30])
def test_rope_token_offset_is_a_slice_of_the_full_sequence(seed, offset):
    """A sequence-parallel rank holding tokens [offset, offset + l) rotates them as the full
    sequence does (padding past F*H*W included)."""
    grid = torch.tensor([[2, 3, 4], [1, 2, 5]])
    L, l, fr = 2 * 3 * 4 + 6, 6, dit.rope_freqs(32)
    x = torch.randn(2, L, 3, 32)
    full = dit.rope_apply(x, grid, fr)
    part = dit.rope_apply(x[:, offset:offset + l], grid, fr, token_offset=offset)
    assert torch.equal(part, full[:, offset:offset + l])
    xc = torch.randn(2, L, 3 * 32)
    w = torch.rand(96) + 0.5
    full = dit.rms_norm_rope(xc, w, 1e-6, 3, grid, fr, torch.bfloat16)
    part = dit.rms_norm_rope(xc[:, offset:offset + l], w, 1e-6, 3, grid, fr, torch.bfloat16, token_offset=offset)
    assert torch.equal(part, full[:, offset:offset + l])
    with pytest.raises(ValueError, match="token_offset"):
        dit.rope_table(grid, l, fr, token_offset=-1)


def test_constructor_takes_one_config():
    cfg = TINY.dit
    m = WanModel(cfg)
    assert m.config is cfg
    official = dict(cfg.to_dict(), _class_name="WanModel")
    assert WanModel.from_kwargs(**official).config == cfg
    with pytest.raises(TypeError, match="DiTConfig"):
        WanModel(cfg.to_dict())


def test_modulate_and_residual_match_spec_formula(seed):
    x = torch.randn(2, 7, 96, dtype=torch.float64) * 3 + 1
    shift, scale = torch.randn(2, 1, 96, dtype=torch.float64), torch.randn(2, 1, 96, dtype=torch.float64)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    got = dit.modulate(x, shift, scale, 1e-6)
    assert got.dtype == torch.float64  # float64 in, float64 math: the kernels' parity reference
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    got32 = dit.modulate(x.float(), shift.float(), scale.float(), 1e-6)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, want.float(), atol=1e-5, rtol=1e-5)
    y, gate = torch.randn_like(x), torch.randn_like(shift)
    torch.testing.assert_close(dit.gated_residual(x, y, gate), x + y * gate)


def test_rms_norm_rounds_before_weight(seed):
    """The normalised x is rounded to x's dtype (bf16) before the product with the fp32 weight:
    every output element is exactly c * w in fp32, c a bf16 value at most one ulp from the float64
    normalisation. (Not "the float64 value rounded once": the fp32 computation can land on the other
    neighbour at a near-tie, so that reference would fail one element in a few thousand. A weight
    applied before the rounding would almost never give a bf16 value times w, on all 384 elements.)"""
    x = torch.randn(4, 96).bfloat16()
    w = torch.rand(96) + 0.5
    xf = x.double()
    n64 = xf / torch.sqrt((xf ** 2).mean(-1, keepdim=True) + 1e-6)
    near = n64.bfloat16()
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    down = torch.nextafter(near, torch.full_like(near, -math.inf))
    out = dit.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    hits = [out == c.float() * w for c in (near, up, down)]
    assert (hits[0] | hits[1] | hits[2]).all(), (out, near.float() * w)
    assert hits[0].float().mean() > 0.95  # mostly the nearest value: the normalisation itself is right


def test_sinusoid_is_cos_first_float64():
    e = dit.sinusoidal_embedding_1d(256, torch.tensor([999, 0]))
    assert e.dtype == torch.float64 and e.shape == (2, 256)
    assert e[1, :128].eq(1).all() and e[1, 128:].eq(0).all()
    assert math.isclose(e[0, 1].item(), math.cos(999 * 10000 ** (-1 / 128)), rel_tol=1e-12)


# ---------------------------------------------------------------- checkpoints

def test_sharded_checkpoint_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m", max_shard_bytes=64 * 1024)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    m2 = WanModel.from_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t, ctx = tiny_inputs()
    torch.testing.assert_close(m2(x, t, ctx), tiny_model(x, t, ctx))
    m3 = WanModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert m3.blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_load_progress_bar_counts_every_byte(tmp_path, tiny_model, monkeypatch, caplog):
    """progress=True: one bar over all shards whose count reaches the tensors' bytes; the model is unchanged."""
    import tqdm

    tiny_model.save_pretrained(tmp_path / "m", max_shard_bytes=64 * 1024)
    bars = []

    class Spy(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Spy)
    caplog.set_level("INFO", logger="wan.checkpoint")
    m2 = WanModel.from_pretrained(tmp_path / "m", progress=True)
    nbytes = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    assert len(bars) == 1 and bars[0].n == nbytes and bars[0].desc.startswith("load m")
    assert 0 < nbytes <= bars[0].total  # total = the files' sizes (headers included)
    assert "file(s)" in caplog.text
    for a, b in zip(tiny_model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_single_file_checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dim"] == TINY.dit.dim and cfg["_class_name"] == "WanModel"
    WanModel.from_pretrained(tmp_path / "m")


def _sharded(tmp_path, model):
    d = tmp_path / "m"
    model.save_pretrained(d, max_shard_bytes=64 * 1024)
    index = json.loads((d / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return d, index


def test_missing_shard_error(tmp_path, tiny_model):
    d, index = _sharded(tmp_path, tiny_model)
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim}"):
        WanModel.from_pretrained(d)


def test_truncated_shard_error(tmp_path, tiny_model):
    d, index = _sharded(tmp_path, tiny_model)
    victim = d / sorted(set(index["weight_map"].values()))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        WanModel.from_pretrained(d)


def test_missing_config_and_weights_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="missing model folder"):
        WanModel.from_pretrained(tmp_path / "nope")
    d = tmp_path / "m"
    tiny_model.save_pretrained(d)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        WanModel.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        WanModel.from_pretrained(d)


def test_key_and_shape_errors(tmp_path, tiny_model):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    tiny_model.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    path = d / "diffusion_pytorch_model.safetensors"

    bad = dict(sd)
    del bad["blocks.1.ffn.2.bias"]
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="missing key.*blocks.1.ffn.2.bias"):
        WanModel.from_pretrained(d)

    bad = dict(sd, **{"blocks.0.extra": torch.zeros(1)})
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="unexpected key blocks.0.extra"):
        WanModel.from_pretrained(d)

    bad = dict(sd, **{"head.head.weight": torch.randn(3, 3)})
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatch for head.head.weight.*\(3, 3\)"):
        WanModel.from_pretrained(d)


def test_load_pth_reads_legacy_pickle_format(tmp_path):
    from wan.checkpoint import load_pth

    sd = {"w": torch.randn(3, 4)}
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # not mmappable
    torch.save(sd, tmp_path / "new.pth")
    for name in ("old.pth", "new.pth"):
        got = load_pth(tmp_path / name)
        assert torch.equal(got["w"], sd["w"])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_pth(tmp_path / "bad.pth")
