"""umT5 text encoder: official key layout, parity with HF UMT5EncoderModel, tokenizer,
cleaning, trimming and checkpoint round trips / errors (all CPU, tiny sizes)."""
import math

import pytest
import torch

from wan.checkpoint import CheckpointError
from wan.configs import DEFAULT_NEG_PROMPT, T2V_A14B, TINY, T5Config
from wan.t5 import (T5Encoder, T5TextEncoder, byte_tokenizer, clean_text, gelu_tanh, hf_to_official,
                    relative_position_bucket, t5_rms_norm)

TCFG = TINY.t5


# ------------------------------------------------------------------ helpers

def hf_model(cfg: T5Config, seed: int):
    """Tiny HF UMT5EncoderModel with random weights (incl. non-trivial norm weights)."""
    from transformers import UMT5Config, UMT5EncoderModel

    hcfg = UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads,
                      d_ff=cfg.dim_ffn, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.num_buckets,
                      relative_attention_max_distance=cfg.max_distance, dropout_rate=0.0,
                      layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = UMT5EncoderModel(hcfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # keep HF's scale, make sure nothing is left at a degenerate init
                p.copy_(p + 0.5 * p.std() * torch.randn(p.shape, generator=g))
    return m


def ours_from_hf(m, cfg: T5Config) -> T5Encoder:
    sd = hf_to_official(m.state_dict())
    enc = T5Encoder(cfg)
    enc.load_state_dict(sd, strict=True)
    return enc.eval()


def random_batch(cfg: T5Config, lens, L=None, g=None):
    L = L or cfg.text_len
    ids = torch.randint(3, cfg.vocab_size, (len(lens), L), generator=g)
    mask = torch.zeros(len(lens), L, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        ids[b, n - 1] = 1
        ids[b, n:] = 0
    return ids, mask


@pytest.fixture
def tiny_ckpt(tmp_path, seed):
    enc = T5TextEncoder.from_config(TINY, seed=seed)
    enc.save_pretrained(tmp_path, TINY)
    return tmp_path, enc


# ------------------------------------------------------------------ layout

def test_full_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        m = T5Encoder(T2V_A14B.t5)
    sd = m.state_dict()
    assert len(sd) == 242
    assert sum(v.numel() for v in sd.values()) == 5_680_910_336
    expect = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        expect.update({
            f"blocks.{i}.norm1.weight": (4096,), f"blocks.{i}.norm2.weight": (4096,),
            **{f"blocks.{i}.attn.{p}.weight": (4096, 4096) for p in "qkvo"},
            f"blocks.{i}.pos_embedding.embedding.weight": (32, 64),
            f"blocks.{i}.ffn.gate.0.weight": (10240, 4096), f"blocks.{i}.ffn.fc1.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc2.weight": (4096, 10240),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect
    out = m(torch.zeros(1, 512, dtype=torch.long, device="meta"), torch.ones(1, 512, device="meta"))
    assert out.shape == (1, 512, 4096)


# ------------------------------------------------------------------ math vs HF

def test_relative_bucket_matches_hf_and_spec():
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                    d_model=8, d_kv=2, num_heads=4), has_relative_attention_bias=True)
    rel = torch.arange(-1100, 1101)
    ours = relative_position_bucket(rel, 32, 128)
    assert torch.equal(ours, attn._relative_position_bucket(rel))
    # spec 3.3 written out
    for r in (-1100, -129, -128, -127, -64, -9, -8, -7, -1, 0, 1, 7, 8, 9, 15, 16, 63, 64, 127, 128, 500):
        a = abs(r)
        want = 16 * (r > 0) + (a if a < 8 else min(15, 8 + int(math.log(a / 8) / math.log(16) * 8)))
        assert int(relative_position_bucket(torch.tensor(r))) == want, r
    assert ours.min() == 0 and ours.max() == 31


def test_ops_bitwise_equal_hf_bf16(seed):
    from transformers.activations import ACT2FN
    from transformers.models.umt5.modeling_umt5 import UMT5LayerNorm

    x = (3 * torch.randn(4, 7, 64)).bfloat16()
    assert torch.equal(gelu_tanh(x), ACT2FN["gelu_new"](x))
    ln = UMT5LayerNorm(64).bfloat16()
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(64))
    assert torch.equal(t5_rms_norm(x, ln.weight, 1e-6), ln(x))


def test_hf_parity_fp32(seed):
    m = hf_model(TCFG, seed)
    ours = ours_from_hf(m, TCFG)
    g = torch.Generator().manual_seed(seed)
    ids, mask = random_batch(TCFG, [32, 17, 5, 1], g=g)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.dtype == torch.float32 and out.shape == (4, 32, TCFG.dim)
    for b, n in enumerate(mask.sum(1).tolist()):  # real tokens: tight; pad rows too (same math)
        torch.testing.assert_close(out[b, :n], ref[b, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hf_parity_bf16(seed):
    m = hf_model(TCFG, seed)
    ours = ours_from_hf(m, TCFG)
    g = torch.Generator().manual_seed(seed)
    ids, mask = random_batch(TCFG, [32, 11, 3], g=g)
    with torch.no_grad():
        ref32 = ours(ids, mask)
        m, ours = m.bfloat16(), ours.bfloat16()
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.dtype == torch.bfloat16
    real = mask.bool()

    def rel(a, b):
        a, b = a.float()[real].double(), b.float()[real].double()
        return ((a - b).norm() / b.norm()).item()

    err_ours, err_hf, ours_vs_hf = rel(out, ref32), rel(ref, ref32), rel(out, ref)
    # both bf16 graphs are within bf16 noise of the fp32 result, and of each other (norm-wise:
    # a max-abs bound on a few bf16 outliers depends on the seed)
    assert err_ours < 3e-2, err_ours
    assert err_ours <= 1.5 * err_hf + 5e-3, (err_ours, err_hf)
    assert ours_vs_hf < 3e-2, ours_vs_hf


# ------------------------------------------------------------------ masking / batching

def test_padding_does_not_change_real_tokens(seed):
    enc = T5Encoder(TCFG).init_weights(seed).eval()
    g = torch.Generator().manual_seed(seed)
    n = 9
    ids, mask = random_batch(TCFG, [n], g=g)
    ids2 = ids.clone()
    ids2[0, n:] = torch.randint(3, TCFG.vocab_size, (TCFG.text_len - n,), generator=g)  # garbage in pads
    with torch.no_grad():
        a, b = enc(ids, mask), enc(ids2, mask)
        short = enc(ids[:, :n], mask[:, :n])  # no padding at all
        nomask = enc(ids, None)
    assert torch.equal(a[0, :n], b[0, :n])
    torch.testing.assert_close(a[0, :n], short[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[0, :n], nomask[0, :n], atol=1e-3)  # the mask does act


def test_batched_equals_one_by_one(seed):
    enc = T5Encoder(TCFG).init_weights(seed).eval()
    g = torch.Generator().manual_seed(seed)
    ids, mask = random_batch(TCFG, [32, 20, 4], g=g)
    with torch.no_grad():
        full = enc(ids, mask)
        for b in range(3):
            torch.testing.assert_close(full[b], enc(ids[b:b + 1], mask[b:b + 1])[0], atol=1e-6, rtol=1e-6)


def test_init_weights_deterministic_and_scaled():
    cfg = T5Config(vocab_size=300, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=1, text_len=16)
    a, b, c = (T5Encoder(cfg).init_weights(s) for s in (3, 3, 4))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.blocks[0].attn.k.weight, c.blocks[0].attn.k.weight)
    blk = a.blocks[0]
    stds = {blk.attn.q.weight: (256 * 256) ** -0.5, blk.attn.k.weight: 256 ** -0.5,
            blk.attn.o.weight: (4 * 256) ** -0.5, blk.ffn.fc2.weight: 512 ** -0.5,
            blk.ffn.gate[0].weight: 256 ** -0.5, blk.pos_embedding.embedding.weight: (2 * 32 * 4) ** -0.5,
            a.token_embedding.weight: 1.0}
    for w, s in stds.items():
        assert abs(w.std().item() / s - 1) < 0.25
    assert torch.equal(blk.norm1.weight, torch.ones(256)) and torch.equal(a.norm.weight, torch.ones(256))


# ------------------------------------------------------------------ cleaning / tokenizer

def test_clean_text():
    neg = clean_text(DEFAULT_NEG_PROMPT)
    assert "\uff0c" in DEFAULT_NEG_PROMPT and "\uff0c" not in neg
    assert neg.count(",") == DEFAULT_NEG_PROMPT.count("\uff0c")
    assert clean_text("Tom &amp;amp; Jerry") == "Tom & Jerry"
    assert clean_text("  a \t\n  b\u3000c \r\n") == "a b c"
    assert clean_text("\u201cquoted\u201d") == '"quoted"'
    assert clean_text("") == ""


def test_byte_tokenizer_ids_padding_truncation():
    tok = byte_tokenizer()
    assert len(tok) == 259 <= TCFG.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    out = tok(["hé", "x" * 100, ""], return_tensors="pt", padding="max_length", truncation=True,
              max_length=8, add_special_tokens=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids[0].tolist() == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3, 1, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1].tolist() == [ord("x") + 3] * 7 + [1] and mask[1].all()  # truncation keeps </s>
    assert ids[2].tolist() == [1] + [0] * 7
    assert tok.decode(ids[0], skip_special_tokens=True) == "hé"


def test_tokenizer_save_load_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer(32)
    tok.save_pretrained(tmp_path / "google" / "umt5-xxl")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "google" / "umt5-xxl", local_files_only=True)
    texts = ["A cat, on a mat.", "日本語 ünïcödé \t tabs", "", "z" * 80]
    kw = dict(return_tensors="pt", padding="max_length", truncation=True, max_length=32, add_special_tokens=True)
    a, b = tok(texts, **kw), tok2(texts, **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert (tok2.pad_token_id, tok2.eos_token_id) == (0, 1)


# ------------------------------------------------------------------ wrapper

def test_text_encoder_trims_to_mask_length(seed):
    enc = T5TextEncoder.from_config(TINY, seed=seed)
    texts = ["hello", "a  \n b", "", DEFAULT_NEG_PROMPT]
    outs = enc(texts, torch.device("cpu"))
    want = [len(clean_text(t).encode()) + 1 for t in texts]
    want[3] = min(want[3], TCFG.text_len)
    assert [o.shape for o in outs] == [(n, TCFG.dim) for n in want]
    assert all(o.dtype == TINY.t5_dtype for o in outs)
    ids, mask = enc.tokenize(texts)
    with torch.no_grad():
        full = enc.model(ids, mask)
    for o, f, n in zip(outs, full, want):
        assert torch.equal(o, f[:n])
    # batch-1 call equals the batched row
    torch.testing.assert_close(enc(["hello"])[0], outs[0], atol=1e-6, rtol=1e-6)
    assert not enc.model.token_embedding.weight.requires_grad


def test_text_encoder_bf16(seed):
    enc = T5TextEncoder.from_config(TINY, seed=seed, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):  # caller's autocast must not leak in
        out = enc(["a bf16 prompt"], "cpu")[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_from_config_is_official_init(seed):
    enc = T5TextEncoder.from_config(TINY, seed=seed, dtype=torch.bfloat16)
    ref = T5Encoder(TCFG).init_weights(seed).bfloat16().state_dict()
    got = enc.model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_from_config_full_size_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        T5TextEncoder.from_config(T2V_A14B)


def test_from_pretrained_roundtrip(tiny_ckpt):
    folder, enc = tiny_ckpt
    assert (folder / TINY.t5_checkpoint).is_file()
    assert (folder / "google" / "umt5-xxl" / "tokenizer.json").is_file()
    enc2 = T5TextEncoder.from_pretrained(folder, TINY)
    assert enc2.device.type == "cpu" and enc2.dtype == TINY.t5_dtype
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, enc2.model.state_dict()[k]), k
    texts = ["a red fox jumps", DEFAULT_NEG_PROMPT]
    for a, b in zip(enc(texts), enc2(texts)):
        assert torch.equal(a, b)
    enc3 = T5TextEncoder.from_pretrained(folder, TINY, dtype=torch.bfloat16)
    assert enc3.dtype == torch.bfloat16 and enc3(["x"])[0].dtype == torch.bfloat16


# ------------------------------------------------------------------ bad checkpoints

def _corrupt(folder, case):
    path = folder / TINY.t5_checkpoint
    if case == "missing file":
        path.unlink()
        return [str(path)]
    if case == "truncated file":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return [str(path), "corrupt or truncated"]
    if case == "garbage file":
        path.write_bytes(b"not a checkpoint" * 10)
        return [str(path)]
    if case == "missing tokenizer":
        import shutil
        shutil.rmtree(folder / "google")
        return ["tokenizer", str(folder / TINY.t5_tokenizer)]
    sd = torch.load(path, weights_only=True)
    if case == "wrong key":
        sd["blocks.1.attn.query.weight"] = sd.pop("blocks.1.attn.q.weight")
        want = [str(path), "blocks.1.attn.q.weight"]
    elif case == "extra key":
        sd["pos_embedding.embedding.weight"] = torch.zeros(32, 4)
        want = [str(path), "unexpected", "pos_embedding.embedding.weight"]
    elif case == "wrong shape":
        sd["blocks.0.ffn.fc1.weight"] = torch.zeros(65, 32)
        want = [str(path), "blocks.0.ffn.fc1.weight", "(65, 32)", "(64, 32)"]
    torch.save(sd, path)
    return want


@pytest.mark.parametrize("case", ["missing file", "truncated file", "garbage file", "missing tokenizer",
                                  "wrong key", "extra key", "wrong shape"])
def test_bad_checkpoint_raises_clear_error(tiny_ckpt, case):
    folder, _ = tiny_ckpt
    want = _corrupt(folder, case)
    with pytest.raises(CheckpointError) as err:
        T5TextEncoder.from_pretrained(folder, TINY)
    msg = str(err.value)
    for w in want:
        assert w in msg, (w, msg)
