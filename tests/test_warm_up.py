"""WanT2V.warm_up: the first calls of a generation (kernel compilation, cuDNN plans, the T5) made
outside a timed run; the generation after it is the same, bit for bit; under host RAM low it does
not read the idle expert; wan-benchmark makes it when no warm-up generation is asked (the
lightning-4step recipe's timed run then holds no first-call cost)."""
import torch

from wan.pipeline import WanT2V
from wan.streaming import streamer_of

ARGS = dict(size="128*128", frame_num=5, sampling_steps=2, shift=3.0, progress=False, return_latents=True,
            offload_model=False)


def test_warm_up_changes_nothing_a_generation_computes(seed, tmp_path):
    a = WanT2V.from_config("tiny", device="cpu", seed=0).generate("a fox", seed=seed % 1000, **ARGS)
    pipe = WanT2V.from_config("tiny", device="cpu", seed=0, t5_release=True)
    assert pipe.warm_up("128*128", 5) > 0 and pipe.text_encoder.released
    assert torch.equal(a, pipe.generate("a fox", seed=seed % 1000, **ARGS))
    WanT2V.from_config("tiny", device="cpu", seed=0).save_pretrained(tmp_path, max_shard_bytes=40_000)
    low = WanT2V.from_pretrained(tmp_path, "tiny", device="cpu", offload="blocks", host_ram="low", allow_cpu=True)
    low.warm_up("128*128", 5)
    assert streamer_of(low.low_noise_model).stats.reloads == 0  # the idle expert is not read
    assert streamer_of(low.high_noise_model).stats.forwards == 1
    assert torch.equal(a, low.generate("a fox", seed=seed % 1000, **ARGS))


def test_benchmark_warms_up_without_warmup_runs(tmp_path, monkeypatch):
    from wan_triton import benchmark

    calls = []
    real = WanT2V.warm_up
    monkeypatch.setattr(WanT2V, "warm_up", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    rc = benchmark.main(["--task", "tiny", "--size", "128*128", "--frame_num", "5", "--sample_steps", "2", "--mode",
                         "optimized", "--num_runs", "1", "--warmup", "0", "--no-triton", "--device", "cpu",
                         "--out_dir", str(tmp_path), "--quiet"])
    assert rc == 0 and calls == [("128*128", 5, True)]
