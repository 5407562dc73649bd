"""wan_triton.patch() on diffusers' Wan transformers (wan_triton/diffusers.py).

Tiny WanTransformer3DModel (2 blocks, 2 heads of 32) with seeded random weights, where the
kernels run: on the GPU when there is one (where the suite runs without the interpreter, and CPU
tensors would only ever fall back), else on the CPU through the Triton interpreter (conftest sets
TRITON_INTERPRET=1 there). The reference is diffusers' own unpatched forward (the patch
must reproduce diffusers' computation order, not the official Wan one): fp32 within 1e-5
relative, bf16 (weights as from_pretrained(torch_dtype=bf16) leaves them) and bf16 autocast
within one bf16 rounding step per element. conftest sets WAN_TRITON_STRICT=1, so every test
here that does not unset it also proves no op fell back.
"""
from __future__ import annotations

import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[diffusers]')")

import wan_triton  # noqa: E402
from wan_triton import diffusers as wdz  # noqa: E402
from wan_triton import kernels  # noqa: E402
from wan_triton.patch import PatchError  # noqa: E402

OPS = ("rms_norm", "rms_norm_rope", "modulate", "gated_residual")

# Where the tests that run the kernels put the model and its inputs: the GPU when there is one,
# else the CPU, where the kernels need the interpreter from the start of the process.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(DEV == "cpu" and not kernels.interpret_mode(),
                                   reason="no CUDA device and TRITON_INTERPRET is not 1: the kernels cannot run")


def tiny_transformer(seed: int, layers: int = 2, device=DEV):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=96, num_layers=layers, rope_max_seq_len=64).eval().to(device)


def inputs(seed: int, dtype=torch.float32, batch: int = 1, device=DEV):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, 3, 8, 6, generator=g).to(device, dtype)  # grid 3 x 4 x 3: non-square RoPE axes
    ctx = torch.randn(batch, 7, 16, generator=g).to(device, dtype)
    return x, torch.tensor([700] * batch, device=device), ctx


def run(model, x, t, ctx, autocast=False):
    with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        return model(x, t, ctx, return_dict=False)[0]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def within_bf16_rounding(out, ref):
    """The whole output within one bf16 step (2^-7) of ref, in norm. Not per element: a few seeds
    round an element of a small value differently somewhere in the two blocks (seen on CPU: up to
    2e-3 in norm, a few bf16 steps on values near 0.02), while a wrong op moves it by O(1)."""
    return rel(out, ref) <= 2 ** -7


@needs_kernels
def test_fp32_patched_matches_diffusers(seed):
    model = tiny_transformer(seed)
    x, t, ctx = inputs(seed, batch=2)
    ref = run(model, x, t, ctx)
    wan_triton.reset_kernel_stats()
    names = wan_triton.patch(model)
    assert names == ["transformer: modulate, gated_residual, rms_norm_rope, rms_norm, attention"]
    out = run(model, x, t, ctx)
    assert out.dtype == ref.dtype and rel(out, ref) <= 1e-5, rel(out, ref)
    stats = wan_triton.kernel_stats()
    # 2 blocks: modulate x2, residual x2, q/k fused x2 (self-attn), q/k norm x2 (cross-attn)
    assert {op: stats[op]["launches"] for op in OPS} == {op: 4 for op in OPS}
    assert all(stats[op]["fallbacks"] == 0 for op in OPS)
    wan_triton.unpatch(model)


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_bf16_patched_within_rounding(seed, mode):
    model = tiny_transformer(seed)
    x, t, ctx = inputs(seed)
    if mode == "bf16":
        wdz.cast_like_from_pretrained(model, torch.bfloat16)
        assert model.rope.freqs_cos.dtype != torch.bfloat16 and model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        x, ctx = x.bfloat16(), ctx.bfloat16()
    ref = run(model, x, t, ctx, autocast=mode == "autocast")
    wan_triton.reset_kernel_stats()
    with wan_triton.patched(model):
        out = run(model, x, t, ctx, autocast=mode == "autocast")
    assert out.dtype == ref.dtype == torch.bfloat16
    assert within_bf16_rounding(out, ref), rel(out, ref)
    assert all(wan_triton.kernel_stats()[op]["launches"] == 4 for op in OPS)


@needs_kernels
def test_unpatch_restores_exactly(seed):
    model = tiny_transformer(seed)
    x, t, ctx = inputs(seed)
    ref = run(model, x, t, ctx)
    procs = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    wan_triton.patch(model)
    wan_triton.patch(model)  # twice: harmless
    assert all(type(b.attn1.processor).__name__ == "_Processor" for b in model.blocks)
    assert "forward" in vars(model.blocks[0]) and "forward" in vars(model.rope)
    wan_triton.unpatch(model)
    assert [(b.attn1.processor, b.attn2.processor) for b in model.blocks] == procs
    assert all(b.attn1.processor is p1 and b.attn2.processor is p2 for b, (p1, p2) in zip(model.blocks, procs))
    assert all("forward" not in vars(m) for m in [model, model.rope, *model.blocks])
    assert wdz._ATTR not in vars(model)
    assert torch.equal(run(model, x, t, ctx), ref)


class _Pipe:
    """Stands in for WanPipeline: only the two attributes patch() looks at."""

    def __init__(self, a, b):
        self.transformer, self.transformer_2 = a, b


@needs_kernels
def test_pipeline_with_two_transformers(seed):
    high, low = tiny_transformer(seed), tiny_transformer(seed + 7, layers=1)
    pipe = _Pipe(high, low)
    x, t, ctx = inputs(seed)
    refs = [run(m, x, t, ctx) for m in (high, low)]
    wan_triton.reset_kernel_stats()
    names = wan_triton.patch(pipe)
    assert [n.split(":")[0] for n in names] == ["transformer", "transformer_2"]
    outs = [run(m, x, t, ctx) for m in (high, low)]
    assert all(rel(o, r) <= 1e-5 for o, r in zip(outs, refs))
    assert wan_triton.kernel_stats()["modulate"]["launches"] == 2 * (2 + 1)
    wan_triton.unpatch(pipe)
    assert all(wdz._ATTR not in vars(m) for m in (high, low))
    assert torch.equal(run(high, x, t, ctx), refs[0]) and torch.equal(run(low, x, t, ctx), refs[1])


@needs_kernels
def test_strict_and_fallback(seed, monkeypatch):
    """model.to(bf16) also casts diffusers' RoPE table: diffusers then rotates in bf16, which the
    kernel does not reproduce. Strict mode raises with that reason; otherwise the call runs
    diffusers' own rotation (counted as a fallback). The other ops still run patched on bf16 norm
    weights, which now and then round one element differently (3 seeds in 60 on CPU, at most
    2.5e-3 relative): the whole output stays within one bf16 step (2^-7) in norm."""
    model = tiny_transformer(seed).to(torch.bfloat16)
    x, t, ctx = inputs(seed, torch.bfloat16)
    ref = run(model, x, t, ctx)
    with wan_triton.patched(model, strict=True):
        with pytest.raises(wan_triton.KernelFallback, match="rms_norm_rope .*RoPE table in torch.bfloat16"):
            run(model, x, t, ctx)
    monkeypatch.delenv("WAN_TRITON_STRICT", raising=False)
    wan_triton.reset_kernel_stats()
    with wan_triton.patched(model):
        out = run(model, x, t, ctx)
    stats = wan_triton.kernel_stats()["rms_norm_rope"]
    assert stats["launches"] == 0 and stats["fallbacks"] == 4 and "bfloat16" in stats["last_reason"]
    assert within_bf16_rounding(out, ref), rel(out, ref)


@needs_kernels
def test_flags_choose_the_ops(seed):
    """rope without rms_norm: diffusers' norm then the rope_apply kernel; modulation off: its own."""
    model = tiny_transformer(seed, layers=1)
    x, t, ctx = inputs(seed)
    ref = run(model, x, t, ctx)
    wan_triton.reset_kernel_stats()
    with wan_triton.patched(model, rms_norm=False, modulation=False):
        out = run(model, x, t, ctx)
    stats = wan_triton.kernel_stats()
    assert stats["rope_apply"]["launches"] == 2 and stats["modulate"]["launches"] == 0
    assert stats["rms_norm"]["launches"] == 0 and stats["gated_residual"]["launches"] == 2
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("version", ["0.34.0", "0.43.0", "1.0.0.dev0", None])
def test_unsupported_version_leaves_model_alone(seed, monkeypatch, caplog, version):
    model = tiny_transformer(seed, layers=1)
    procs = [model.blocks[0].attn1.processor]
    monkeypatch.setattr(wdz, "installed_version", lambda: version)
    monkeypatch.delenv("WAN_TRITON_STRICT", raising=False)
    with caplog.at_level(logging.WARNING, logger="wan_triton"):
        assert wan_triton.patch(model) == []
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msgs == [f"wan_triton: diffusers {version} is outside the supported range {wdz.SUPPORTED} "
                    "(tested: 0.42.1); the diffusers model is left unpatched"]
    assert "\n" not in msgs[0]
    assert model.blocks[0].attn1.processor is procs[0] and "forward" not in vars(model.blocks[0])
    with pytest.raises(PatchError, match="outside the supported range"):
        wan_triton.patch(model, strict=True)


def test_supported_range_includes_the_installed_release():
    assert wdz.version_problem() == "", wdz.version_problem()


def test_not_a_diffusers_object():
    assert not wdz.is_wan_diffusers(torch.nn.Linear(2, 2)) and not wdz.is_wan_diffusers(None)
    assert wdz.wan_transformers(_Pipe(None, None)) == []


def test_torch_rms_order_is_recognised():
    """The probe finds the rounding order of this torch's F.rms_norm (the kernels cover both)."""
    for xd, wd in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        order = wdz.torch_rms_order("cpu", xd, wd)
        assert order is not None and order[1] in (xd, torch.promote_types(xd, wd))


# ------------------------------------------------------------------ diffusers-layout checkpoints in `wan`

def _fp32_attention(q, k, v, k_lens=None, out_dtype=None, backend=None):
    """wan.attention in fp32 (the official path casts to bf16): compares everything else exactly."""
    assert k_lens is None
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).to(out_dtype or q.dtype)


def tiny_layout(root, seed: int):
    """Save tiny random diffusers components in the Wan2.2-T2V-A14B-Diffusers layout."""
    import json

    from transformers import UMT5Config, UMT5EncoderModel

    from wan.configs import TINY
    from wan.t5 import byte_tokenizer

    d = TINY.dit
    parts = {}
    for i, name in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed + i)
        parts[name] = diffusers.WanTransformer3DModel(
            patch_size=d.patch_size, num_attention_heads=d.num_heads, attention_head_dim=d.dim // d.num_heads,
            in_channels=d.in_dim, out_channels=d.out_dim, text_dim=d.text_dim, freq_dim=d.freq_dim,
            ffn_dim=d.ffn_dim, num_layers=d.num_layers).eval()
        with torch.no_grad():  # diffusers zero-inits nothing we need, but make the head non-trivial
            parts[name].proj_out.weight.normal_(0, 0.05)
    torch.manual_seed(seed + 2)
    parts["vae"] = diffusers.AutoencoderKLWan(base_dim=TINY.vae.dim).eval()
    t5 = TINY.t5
    torch.manual_seed(seed + 3)
    parts["text_encoder"] = UMT5EncoderModel(UMT5Config(
        vocab_size=t5.vocab_size, d_model=t5.dim, d_kv=t5.dim_attn // t5.num_heads, d_ff=t5.dim_ffn,
        num_layers=t5.num_layers, num_heads=t5.num_heads, relative_attention_num_buckets=t5.num_buckets,
        relative_attention_max_distance=t5.max_distance, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False)).eval()
    for name, m in parts.items():
        m.save_pretrained(str(root / name))
    byte_tokenizer(t5.text_len).save_pretrained(str(root / "tokenizer"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    return parts


def test_dit_key_map_round_trip(seed):
    from wan.configs import TINY
    from wan.diffusers_layout import dit_key_map
    from wan.dit import WanModel

    with torch.device("meta"):
        ours = WanModel(TINY.dit)
        theirs = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, text_dim=32,
                                                 freq_dim=32, ffn_dim=128, num_layers=2)
    table = dit_key_map(ours)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(table) == set(theirs_sd) and sorted(table.values()) == sorted(ours_sd)  # a bijection
    assert all(tuple(theirs_sd[k].shape) == tuple(ours_sd[v].shape) for k, v in table.items())
    assert table["blocks.1.norm2.weight"] == "blocks.1.norm3.weight"  # diffusers' norm2 is the affine one
    assert table["scale_shift_table"] == "head.modulation"


def test_vae_key_map_round_trip():
    from wan.configs import VAEConfig
    from wan.diffusers_layout import vae_key_map
    from wan.vae import WanVAE

    for cfg in (VAEConfig(dim=8), VAEConfig(dim=8, num_res_blocks=1, dim_mult=(1, 2, 4), temperal_downsample=(False, True))):
        with torch.device("meta"):
            ours = WanVAE(cfg)
            theirs = diffusers.AutoencoderKLWan(base_dim=8, num_res_blocks=cfg.num_res_blocks,
                                                dim_mult=list(cfg.dim_mult),
                                                temperal_downsample=list(cfg.temperal_downsample))
        table = vae_key_map(ours, cfg)
        ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
        assert set(table) == set(theirs_sd) and sorted(table.values()) == sorted(ours_sd)
        assert all(tuple(theirs_sd[k].shape) == tuple(ours_sd[v].shape) for k, v in table.items())


def test_diffusers_layout_loads_with_same_outputs(seed, tmp_path, monkeypatch):
    import wan.attention
    from wan import diffusers_layout as dl
    from wan.configs import TINY
    from wan.pipeline import WanT2V

    parts = tiny_layout(tmp_path, seed)
    pipe = WanT2V.from_pretrained(tmp_path, TINY, device="cpu")
    assert pipe.high_noise_model.config == dl.dit_config(parts["transformer"].config)
    # DiT: same output as diffusers' forward (attention in fp32 on both sides)
    monkeypatch.setattr(wan.attention, "attention", _fp32_attention)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 9, 32, generator=g)
    t = torch.tensor([650.0])
    for ours, name in ((pipe.high_noise_model, "transformer"), (pipe.low_noise_model, "transformer_2")):
        with torch.no_grad():
            want = parts[name](x, t, torch.nn.functional.pad(ctx, (0, 0, 0, 512 - 9)), return_dict=False)[0]
            got = ours.float()(x, t, ctx)
        assert rel(got, want) <= 1e-5, (name, rel(got, want))
    # VAE: same decoded video (ours un-normalises the latents; WanPipeline does it before decode)
    z = torch.randn(1, 16, 2, 4, 4, generator=g)
    cfg = parts["vae"].config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = parts["vae"].decode(z / inv_std + mean, return_dict=False)[0].clamp(-1, 1)
        got = pipe.vae.decode(z)
    assert got.shape == want.shape and rel(got, want) <= 1e-5, rel(got, want)
    # T5: same hidden states
    ids, mask = pipe.text_encoder.tokenize(["a red fox"])
    with torch.no_grad():
        want = parts["text_encoder"](input_ids=ids, attention_mask=mask).last_hidden_state
        got = pipe.text_encoder.model(ids, mask)
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_diffusers_layout_preflight_names_what_is_missing(seed, tmp_path):
    from wan.checkpoint import CheckpointError
    from wan.configs import TINY
    from wan.pipeline import WanT2V

    tiny_layout(tmp_path, seed)
    (tmp_path / "transformer_2" / "config.json").unlink()
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        WanT2V.from_pretrained(tmp_path, TINY, device="cpu")
    msg = str(err.value)
    assert "3 problems" in msg and "\n" not in msg
    assert "transformer_2/config.json" in msg and "vae/diffusion_pytorch_model.safetensors" in msg
    assert "tokenizer/tokenizer_config.json" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_without_cuda_exits_2_with_one_line(capsys, monkeypatch):
    from bench.bench_diffusers import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == "bench_diffusers needs a CUDA GPU (use --smoke for a CPU check of the script)\n"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--smoke"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_wan_generate_reads_the_diffusers_layout(seed, tmp_path):
    """The command line takes the diffusers folder as --ckpt_dir, as the README says."""
    import imageio.v3 as iio

    from wan_triton.generate import main

    tiny_layout(tmp_path / "ckpt", seed)
    out = tmp_path / "v.mp4"
    rc = main(["--task", "tiny", "--ckpt_dir", str(tmp_path / "ckpt"), "--save_file", str(out), "--device", "cpu",
               "--frame_num", "5", "--sample_steps", "1", "--base_seed", "3", "--no-triton", "--quiet"])
    assert rc == 0 and iio.imread(out, index=None).shape[0] == 5
