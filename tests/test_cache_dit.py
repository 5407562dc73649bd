"""`wan_triton.patch(pipe)` with cache-dit (a step-cache library for diffusers pipelines) on a tiny
random two-expert WanPipeline, fp32 on the CPU (issue 32, docs/diffusers.md):

- patched + cache-dit gives cache-dit's own output within kernel rounding, in either order;
- cache-dit does skip (its output is not the exact one, fewer block calls), and the skipped
  block calls are the same with and without our kernels;
- our kernels launch inside the blocks cache-dit runs (no fallback: WAN_TRITON_STRICT=1).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[diffusers]')")
cache_dit = pytest.importorskip("cache_dit", reason="cache-dit not installed (pip install cache-dit; the [test] extra)")

import wan_triton  # noqa: E402

STEPS = 8


def tiny_pipe(seed: int):
    """WanPipeline with random tiny experts (3 blocks each), a tiny VAE, no text encoder (the
    prompt is given as embeddings)."""
    experts = []
    for i in range(2):
        torch.manual_seed(seed + i)
        m = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=16, freq_dim=32, ffn_dim=96, num_layers=3, rope_max_seq_len=64).eval()
        with torch.no_grad():  # diffusers zero-inits nothing we need, but make the head non-trivial
            m.proj_out.weight.normal_(0, 0.05)
        experts.append(m)
    torch.manual_seed(seed + 2)
    vae = diffusers.AutoencoderKLWan(base_dim=8).eval()
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sch, transformer=experts[0],
                                 transformer_2=experts[1], boundary_ratio=0.875)


def generate(pipe, seed: int):
    """Final latents and the block calls of both experts."""
    g = torch.Generator().manual_seed(seed + 10)
    pe, ne = torch.randn(1, 7, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    calls = [0]
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
             for m in (pipe.transformer, pipe.transformer_2) for b in m.blocks]
    try:
        with torch.no_grad():
            z = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=32, width=48, num_frames=5,
                     num_inference_steps=STEPS, guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent",
                     generator=torch.Generator().manual_seed(seed)).frames
    finally:
        for h in hooks:
            h.remove()
    return z, calls[0]


def with_cache_dit(pipe):
    """DBCache: the first block of each expert always runs; the rest reuse their residual when
    the first block's output changed by less than the threshold (after one warm-up step)."""
    pipe.set_progress_bar_config(disable=True)
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5,
                                  max_warmup_steps=1, num_inference_steps=STEPS)
    return cache_dit.enable_cache(pipe, cache_config=cfg)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.interpreter  # the kernels on CPU tensors: a child pytest with TRITON_INTERPRET=1 on a GPU machine
@pytest.mark.parametrize("order", ["patch, then cache-dit", "cache-dit, then patch"])
def test_patch_composes_with_cache_dit(order, seed):
    plain = tiny_pipe(seed)
    plain.set_progress_bar_config(disable=True)
    exact, exact_calls = generate(plain, seed)
    ref_pipe = with_cache_dit(tiny_pipe(seed))
    ref, ref_calls = generate(ref_pipe, seed)
    assert ref_calls < exact_calls and rel(ref, exact) > 1e-4  # cache-dit skipped blocks

    pipe = tiny_pipe(seed)
    if order.startswith("patch"):
        wan_triton.patch(pipe)
        with_cache_dit(pipe)
    else:
        with_cache_dit(pipe)
        wan_triton.patch(pipe)
    wan_triton.reset_kernel_stats()
    out, calls = generate(pipe, seed)
    stats = wan_triton.kernel_stats()
    print(order, rel(out, ref), calls, ref_calls, exact_calls, stats)
    assert calls == ref_calls  # the same steps skipped
    assert rel(out, ref) <= 1e-5  # fp32: the kernels' rounding, nothing more
    for op in ("modulate", "gated_residual", "rms_norm_rope"):
        assert stats[op]["launches"] > 0 and stats[op]["fallbacks"] == 0, (op, stats[op])
    wan_triton.unpatch(pipe)
