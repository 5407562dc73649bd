"""bench/quality.py, the quality gate: its metrics, its block-call counter, its Mode API (an identity
mode is exact, a plugged-in mode is counted, every mode is undone), the separation of the sanity
mode from the fp32 floor, the fp8 emulation's rounding, and its CLI's one-line errors. The pipeline
is the demo model's size with random fp32 weights (the trained weights are not needed for the
plumbing; the gate's numbers come from them, docs/quality.md)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn as nn

from bench import quality
from bench.demo_data import parse_caption
from wan import attention as att
from wan.configs import DEMO, get_config
from wan.pipeline import WanT2V
from wan_triton import fp8

STEPS = 4
FRAMES = 1


@pytest.fixture(scope="module")
def pipe():
    return WanT2V.from_config(DEMO, device="cpu", dtype=torch.float32, seed=0)


def _video(seed: int = 0) -> torch.Tensor:
    """A smooth [5, 64, 64, 3] uint8 video with room for noise either way (values 40..215)."""
    g = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    base = torch.rand(5, 8, 8, 3, generator=g)
    up = nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear", align_corners=False)
    return (40 + 175 * up.permute(0, 2, 3, 1)).round().to(torch.uint8)


def _noisy(v: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (v.float() + sigma * torch.randn(v.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_prompts_are_demo_captions():
    assert len(quality.PROMPTS) >= 8 and len(set(quality.PROMPTS)) == len(quality.PROMPTS)
    parsed = [parse_caption(p) for p in quality.PROMPTS]  # ValueError for a caption outside the grammar
    for i, name in enumerate(("colour", "shape", "motion", "background")):
        assert len({p[i] for p in parsed}) >= 3, name


def test_psnr_and_ssim_are_exact_for_identical_videos_and_drop_with_noise():
    v = _video()
    assert math.isinf(quality.psnr_uint8(v, v)) and quality.ssim_uint8(v, v) == pytest.approx(1.0, abs=1e-12)
    assert quality.psnr_uint8(v + 1, v) == pytest.approx(20 * math.log10(255))  # MSE 1
    small, large = _noisy(v, 2.0), _noisy(v, 20.0)
    p_small, p_large = quality.psnr_uint8(small, v), quality.psnr_uint8(large, v)
    s_small, s_large = quality.ssim_uint8(small, v), quality.ssim_uint8(large, v)
    print(p_small, p_large, s_small, s_large)
    assert 40 < p_small < 44 and 21 < p_large < 25        # 20 log10(255 / sigma), rounding aside
    assert 0.9 < s_small < 1.0 and s_large < s_small - 0.2
    assert quality.ssim_uint8(v, 255 - v) < 0           # anti-correlated structure


def _drop_last_block(p):
    """A mode written outside the gate: the last block of each expert left out."""
    kept = [(m, m.blocks) for m in (p.high_noise_model, p.low_noise_model)]
    for m, blocks in kept:
        m.blocks = nn.ModuleList(list(blocks)[:-1])

    def undo():
        for m, blocks in kept:
            m.blocks = blocks
    return undo


def test_judge_counts_block_calls_and_separates_the_sanity_mode(pipe):
    """An identity mode gives the exact videos bit for bit; the block hooks count every block call
    (steps x two CFG branches x layers), the sanity mode's half and a plugged-in mode's quarter; the
    sanity mode lands far below the fp32 floor; every mode is undone."""
    floor, sanity = quality.builtin_modes("cpu", ("floor", "sanity"))
    identity = quality.Mode("identity", lambda p: (lambda: None), lossy=False)
    backend, config = att.get_backend(), pipe.config
    rows = quality.judge(pipe, [identity, floor, sanity, quality.Mode("drop the last block", _drop_last_block)],
                         quality.PROMPTS[:1], (0,), frame_num=FRAMES, steps=STEPS)
    print(quality.markdown_table(rows))
    exact, same, fl, bad, drop = rows
    assert [r.mode for r in rows] == ["exact", "identity", floor.name, sanity.name, "drop the last block"]
    assert exact.block_calls == STEPS * 2 * DEMO.dit.num_layers and exact.forwards_saved == 0
    assert same.identical == 1 and math.isinf(same.psnr_db) and same.latent_rel_err == 0 and same.ssim == 1
    assert fl.forwards_saved == 0 and bad.forwards_saved == 0.5 and drop.forwards_saved == 0.25
    assert fl.psnr_db > bad.psnr_db + 10 and bad.latent_rel_err > 10 * fl.latent_rel_err > 0
    assert len(pipe.high_noise_model.blocks) == DEMO.dit.num_layers                     # undone
    assert pipe.config is config and att.get_backend() == backend
    assert "generate" not in vars(pipe) and "_guided" not in vars(pipe)


@pytest.mark.interpreter  # the kernels on CPU tensors: a child pytest with TRITON_INTERPRET=1 on a GPU machine
def test_fp8_modes_emulate_on_the_cpu_and_undo_exactly(pipe):
    """The fp8 rows on the CPU say 'emulation'; both fp8 modes move the video a little (lossy, no block
    call saved) and much less than the sanity mode; afterwards the bf16 layers and the attention
    backend are back, bit for bit."""
    before = {k: v.clone() for k, v in pipe.low_noise_model.state_dict().items()}
    modes = quality.builtin_modes("cpu", ("fp8-both", "sanity"))
    assert "emulation" in modes[0].name and "emulation" in modes[0].note
    rows = quality.judge(pipe, modes, quality.PROMPTS[1:2], (1,), frame_num=FRAMES, steps=STEPS)
    print(quality.markdown_table(rows))
    _, both, bad = rows
    assert not both.skipped and both.identical == 0 and both.forwards_saved == 0
    assert 0 < both.latent_rel_err < bad.latent_rel_err / 3
    assert not fp8.is_quantized(pipe.low_noise_model) and _emulation_gone()
    after = pipe.low_noise_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_vae_bf16_moves_only_the_frames_and_puts_the_fp32_vae_back(pipe):
    """The bf16 VAE mode leaves the latents exact (the DiT is untouched), changes the decoded frames
    a little (lossy, nothing saved), and restores the very fp32 VAE object, weights unrounded."""
    vae = pipe.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    (mode,) = quality.builtin_modes("cpu", ("vae-bf16",))
    rows = quality.judge(pipe, [mode], quality.PROMPTS[2:3], (0,), frame_num=FRAMES, steps=2)
    print(quality.markdown_table(rows))
    _, bf16 = rows
    assert not bf16.skipped and bf16.latent_rel_err == 0 and bf16.forwards_saved == 0
    assert bf16.identical == 0 and 20 < bf16.psnr_db < math.inf
    assert pipe.vae is vae and next(vae.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def _emulation_gone() -> bool:
    return quality.EMULATED not in att.backend_names() and att.get_backend() == "auto"


def test_a_mode_that_cannot_run_is_a_row_not_a_crash(pipe):
    def unavailable(p):
        raise quality.ModeUnavailable("needs a GPU")

    def broken(p):
        return _swap_generate_to_fail(p)

    rows = quality.judge(pipe, [quality.Mode("gpu only", unavailable), quality.Mode("broken", broken)],
                         quality.PROMPTS[:1], (0,), frame_num=FRAMES, steps=1)
    assert rows[1].skipped == "needs a GPU" and rows[2].skipped.startswith("failed: RuntimeError: boom")
    assert "generate" not in vars(pipe)
    assert "not run: needs a GPU" in quality.markdown_table(rows)


def _swap_generate_to_fail(p):
    def fail(*a, **kw):
        raise RuntimeError("boom")
    p.generate = fail
    return lambda: delattr(p, "generate")


@pytest.mark.interpreter  # the kernels on CPU tensors: a child pytest with TRITON_INTERPRET=1 on a GPU machine
def test_fp8_attention_emulation_rounds_like_the_kernel():
    """The emulation's per-tensor quantization equals kernels.attn_quant_fp8's (its unrounded scaled
    values, rounded to e4m3 the same way), and the emulated attention stays within e4m3's error."""
    pytest.importorskip("triton")
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

    g = torch.Generator().manual_seed(3)
    print("seed 3")
    q, k, v = (torch.randn(1, 40, 2, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    k = k + 3.0  # a channel offset: the k mean matters
    for x, sub in ((q, False), (k, True)):
        ref = quantize_fp8(x, subtract_mean=sub, out_dtype=torch.float32)
        ours, descale = quality._per_tensor(x, subtract_mean=sub)
        assert torch.equal(ours, quality._e4m3(ref.data.float())) and torch.equal(descale.reshape(1), ref.descale)
    exact = nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    got = quality.attention_fp8_emulated(q, k, v).float().transpose(1, 2)
    err = ((got - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 0.1, err
    masked = quality.attention_fp8_emulated(q, k, v, k_lens=torch.tensor([7])).float().transpose(1, 2)
    ref7 = nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k[:, :7], v[:, :7])))
    assert ((masked - ref7).norm() / ref7.norm()).item() < 0.1


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q"
    assert quality.main(["--modes", "fp8,bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown mode fp8, bogus" in err and "fp8-linears" in err
    assert quality.main(["--ckpt_dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_demo_task_resolves_for_the_gate_and_the_cache_sweep():
    """'demo' (the default --task of both scripts) is the demo model's size, not in wan.configs.TASKS."""
    from bench.cache_sweep import build

    assert get_config("demo") is DEMO and get_config("tiny").name == "tiny"
    p = build(argparse.Namespace(task="demo", random=True, device="cpu", ckpt_dir=None))
    assert p.config is DEMO


def test_the_floor_refuses_bf16_weights():
    """The floor compares with fp32 math: on bf16 weights it would compare bf16 with bf16, so it says so."""
    import types

    bf16 = types.SimpleNamespace(high_noise_model=nn.Linear(2, 2).bfloat16(), low_noise_model=nn.Linear(2, 2))
    with pytest.raises(quality.ModeUnavailable, match="fp32 DiT weights"):
        quality.fp32_floor(bf16)
