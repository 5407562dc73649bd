"""bench/probe_gelu_epilogue.py: the probe of the FFN's GELU folded into its product. On a CPU it
refuses in one line; the fact it rests on (torch's CPU `_addmm_activation` computes the erf GELU,
not Wan's tanh GELU, so only a GPU can say what the CUDA epilogue computes) is pinned here."""
import torch

from bench import probe_gelu_epilogue


def test_cpu_addmm_activation_is_the_erf_gelu():
    r = probe_gelu_epilogue.which_gelu(torch.device("cpu"))
    assert r["vs erf GELU"] < 1e-6 < r["vs tanh GELU"], r


def test_without_cuda_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe_gelu_epilogue.main([]) == 2
    err = capsys.readouterr().err
    assert err == "probe_gelu_epilogue: error: needs a CUDA GPU (the CPU kernel computes another GELU)\n"


def test_ulps_counts_bf16_steps():
    b = torch.tensor([1.0, 3.0, -0.5])
    a = b + torch.tensor([2.0 ** -7, 2 * 2.0 ** -6, 0.0])  # one ulp at 1 (2^-7), two at 3 (ulp 2^-6), none
    assert probe_gelu_epilogue._ulps(a, b).tolist() == [1.0, 2.0, 0.0]
