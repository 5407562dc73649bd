"""bench/profile_dit.py: kernel names sort into the right category; totals add up; no GPU -> one line."""
import pytest
import torch

from bench.profile_dit import categorize, main, summarize


@pytest.mark.parametrize("name,cat", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "matmul"),
    ("_rms_norm_kernel", "wan_triton"),
    ("_rope_kernel", "wan_triton"),
    ("_modulate_kernel", "wan_triton"),
    ("_gated_residual_kernel", "wan_triton"),
    ("_cfg_kernel", "wan_triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>", "other"),
    ("triton_poi_fused_add_mul_0", "other"),
])
def test_categorize(name, cat):
    assert categorize(name) == cat


def test_summarize_adds_up():
    rows = [dict(name="a", category="attention", ms=7.0, calls=2), dict(name="b", category="matmul", ms=2.5, calls=5),
            dict(name="c", category="other", ms=0.25, calls=9)]
    s = summarize(rows, wall_ms=10.0)
    assert s["busy_ms"] == pytest.approx(9.75) and s["categories"]["idle"]["ms"] == pytest.approx(0.25)
    assert s["categories"]["attention"] == dict(ms=7.0, calls=2) and s["categories"]["wan_triton"]["ms"] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_one_line(capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["--json", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "profile_dit: error: needs a CUDA GPU (it profiles device kernels)"]
    assert not out.exists()


def test_bad_mode_one_line(capsys):
    assert main(["--modes", "compiled"]) == 2
    assert "--modes takes reference and/or patched" in capsys.readouterr().err


def test_expert_inputs_follow_the_config():
    """The benchmarks' inputs: latent shape and token count derived from the config (720p x 81 = 75,600)."""
    from bench._expert import build_expert, expert_inputs
    from wan.configs import TINY
    from wan.pipeline import WanT2V

    g = torch.Generator().manual_seed(0)
    x, c, u, t, L = expert_inputs(1280, 720, 81, "cpu", g)
    assert tuple(x.shape) == (1, 16, 21, 90, 160) and L == 75_600
    assert c.shape == (1, 60, 4096) and u.shape == (1, 120, 4096) and c.dtype == torch.bfloat16
    x, c, u, t, L = expert_inputs(160, 96, 17, "cpu", g, config=TINY)
    pipe = WanT2V.from_config("tiny")
    assert L == pipe.seq_len(tuple(x.shape[1:])) and c.shape[-1] == TINY.dit.text_dim
    m = build_expert("cpu", layers=1, config=TINY)
    assert len(m.blocks) == 1 and m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, c, seq_len=L)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit code")
def test_bench_dit_and_profile_dit_agree_on_no_gpu(capsys):
    """Issue 22: both exit 2 (something unavailable), with one line each."""
    from bench.bench_dit import main as bench_dit_main

    assert bench_dit_main([]) == 2 == main([])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench_dit: error: needs a CUDA GPU (it times device kernels)",
                   "profile_dit: error: needs a CUDA GPU (it profiles device kernels)"]
