"""Schedulers (spec section 5): schedules, step bookkeeping, hand-checked first steps, exact-flow convergence."""
import math

import numpy as np
import pytest
import torch

from wan.schedulers import (FlowDPMSolverMultistepScheduler, FlowUniPCMultistepScheduler, SchedulerOutput,
                            get_sampling_sigmas, make_scheduler)

SOLVERS = ["unipc", "dpm++"]

UNIPC_T = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
           922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235]
UNIPC_SIGMAS = [
    0.9999166, 0.9977826, 0.9955462, 0.9931996, 0.9907347, 0.9881422, 0.9854119, 0.9825327, 0.9794918, 0.9762754,
    0.9728677, 0.9692512, 0.9654062, 0.9613101, 0.9569377, 0.9522599, 0.9472436, 0.9418508, 0.9360373, 0.9297519,
    0.9229348, 0.9155154, 0.9074104, 0.8985199, 0.8887241, 0.8778773, 0.8658007, 0.8522726, 0.8370144, 0.8196719,
    0.7997865, 0.7767547, 0.7497655, 0.7177031, 0.6789888, 0.6313128, 0.5711563, 0.4928803, 0.3868470, 0.2351095, 0]
DPM_T = [1000, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 957, 952, 947, 941, 936, 929,
         923, 915, 907, 898, 888, 878, 865, 852, 837, 819, 800, 776, 750, 717, 679, 631, 571, 493, 387, 235]


def sample_loop(sch, velocity, x):
    """Run the whole schedule with velocity(x, sigma) as the model; returns the final sample."""
    for t in sch.timesteps:
        i = sch.step_index if sch.step_index is not None else sch.index_for_timestep(t)
        x = sch.step(velocity(x, sch.sigmas[i]), t, x, return_dict=False)[0]
    return x


# ------------------------------------------------------------------------------------------------- schedules
def test_unipc_default_schedule_matches_spec():
    sch = make_scheduler("unipc", 40, 12.0, "cpu")
    assert sch.timesteps.dtype == torch.int64 and sch.timesteps.tolist() == UNIPC_T
    assert sch.sigmas.dtype == torch.float32 and sch.sigmas.device.type == "cpu" and len(sch.sigmas) == 41
    torch.testing.assert_close(sch.sigmas, torch.tensor(UNIPC_SIGMAS), atol=1e-7, rtol=0)
    assert sch.sigmas[-1].item() == 0.0
    assert sch.sigma_max == 0.9990000128746033 and sch.sigma_min == 0.0
    assert sum(t >= 875 for t in UNIPC_T) == 26          # high-noise expert steps at the default boundary


def test_dpm_default_schedule_matches_spec():
    sig = get_sampling_sigmas(40, 12.0)
    assert sig.dtype == np.float64 and sig.shape == (40,) and sig[0] == 1.0
    sch = make_scheduler("dpm++", 40, 12.0, "cpu")
    assert isinstance(sch, FlowDPMSolverMultistepScheduler)
    assert sch.timesteps.dtype == torch.int64 and sch.timesteps.tolist() == DPM_T
    assert sch.sigmas.dtype == torch.float32 and len(sch.sigmas) == 41
    assert sch.sigmas[0].item() == 1.0 and sch.sigmas[-1].item() == 0.0
    torch.testing.assert_close(sch.sigmas[:-1], torch.from_numpy(sig).float(), atol=0, rtol=0)


def test_make_scheduler_matches_official_calls_and_rejects_unknown():
    a = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    a.set_timesteps(17, device="cpu", shift=7.0)
    b = make_scheduler("unipc", 17, 7.0, "cpu")
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert b.timesteps.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown solver"):
        make_scheduler("heun", 10, 5.0, "cpu")


def test_unsupported_options_raise():
    with pytest.raises(ValueError):
        FlowUniPCMultistepScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError):
        FlowUniPCMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError):
        FlowUniPCMultistepScheduler(predict_x0=False)
    with pytest.raises(ValueError):
        FlowDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError):
        FlowDPMSolverMultistepScheduler(final_sigmas_type="sigma_min")


# ------------------------------------------------------------------------------------------ step bookkeeping
@pytest.mark.parametrize("name", SOLVERS)
def test_step_count_indices_and_contract(name):
    sch = make_scheduler(name, 12, 5.0, "cpu")
    assert sch.num_inference_steps == 12 and sch.step_index is None
    x = torch.randn(1, 2, 3, 4)
    for k, t in enumerate(sch.timesteps):
        out = sch.step(torch.randn_like(x), t, x)            # default return_dict=False -> tuple
        assert isinstance(out, tuple) and len(out) == 1
        x = out[0]
        assert x.dtype == torch.float32 and x.shape == (1, 2, 3, 4)
        assert sch.step_index == k + 1
    with pytest.raises(ValueError, match="set_timesteps"):   # schedule exhausted
        sch.step(x, sch.timesteps[-1], x)
    sch = make_scheduler(name, 12, 5.0, "cpu")
    out = sch.step(x, int(sch.timesteps[0]), x, return_dict=True, generator=torch.Generator())
    assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape


@pytest.mark.parametrize("name", SOLVERS)
def test_bad_timestep_and_missing_schedule_raise(name):
    sch = make_scheduler(name, 10, 5.0, "cpu")
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="not in the schedule"):
        sch.step(x, torch.tensor(12345), x)
    cls = FlowUniPCMultistepScheduler if name == "unipc" else FlowDPMSolverMultistepScheduler
    with pytest.raises(ValueError, match="set_timesteps"):
        cls().step(x, 999, x)


@pytest.mark.parametrize("name", SOLVERS)
def test_first_call_locates_timestep(name):
    sch = make_scheduler(name, 10, 5.0, "cpu")
    x = torch.randn(1, 3)
    sch.step(x, sch.timesteps[3], x)                          # start mid-schedule
    assert sch.step_index == 4
    # duplicated timestep -> the second match (official rule)
    cls = FlowUniPCMultistepScheduler if name == "unipc" else FlowDPMSolverMultistepScheduler
    dup = cls()
    dup.set_timesteps(sigmas=[0.9995, 0.9991, 0.5])
    assert dup.timesteps.tolist() == [999, 999, 500]
    assert dup.index_for_timestep(torch.tensor(999)) == 1 and dup.index_for_timestep(500) == 2


@pytest.mark.parametrize("name", SOLVERS)
def test_second_set_timesteps_resets_state(name):
    torch.manual_seed(0)
    noise = torch.randn(1, 2, 5)
    vel = lambda x, s: torch.sin(3 * x) + s                  # any smooth deterministic "model"
    ref = sample_loop(make_scheduler(name, 8, 3.0, "cpu"), vel, noise.clone())
    sch = make_scheduler(name, 8, 3.0, "cpu")
    x = noise.clone()
    for t in sch.timesteps[:5]:                               # leave it half-way
        x = sch.step(vel(x, sch.sigmas[sch.step_index or 0]), t, x)[0]
    if name == "unipc":
        sch.set_timesteps(8, device="cpu", shift=3.0)
        assert sch.last_sample is None
    else:
        sch.set_timesteps(8, device="cpu", sigmas=get_sampling_sigmas(8, 3.0))
    assert sch.step_index is None and sch.lower_order_nums == 0 and sch.model_outputs == [None, None]
    assert torch.equal(sample_loop(sch, vel, noise.clone()), ref)


@pytest.mark.parametrize("name", SOLVERS)
def test_last_step_returns_x0_estimate(name):
    sch = make_scheduler(name, 6, 5.0, "cpu")
    torch.manual_seed(1)
    x = torch.randn(1, 8)
    for t in sch.timesteps[:-1]:
        x = sch.step(torch.randn_like(x), t, x)[0]
    v = torch.randn_like(x)
    m = x - sch.sigmas[5] * v
    assert torch.equal(sch.step(v, sch.timesteps[-1], x)[0], m)


def test_unipc_bf16_sample_is_kept_fp32():
    sch = make_scheduler("unipc", 4, 5.0, "cpu")
    x = torch.randn(1, 6).to(torch.bfloat16)
    assert sch.step(x.float(), sch.timesteps[0], x)[0].dtype == torch.float32


# ----------------------------------------------------------------------------- hand-checked first steps
def _lam(s):
    return math.log(1 - s) - math.log(s)


def _scalar_vel(x, s):
    """A nonlinear scalar "model" (float64 for floats, fp32 for tensors); strong enough x-dependence that
    computing x0 from the corrected sample, or solving rho in the predictor, moves the result by ~1e-3."""
    sin = torch.sin if torch.is_tensor(x) else math.sin
    return sin(3 * x) - 1.7 * x + 2.0 * s


def test_unipc_first_steps_by_hand():
    """Steps 0-2 from the spec formulas in float64 scalars: UniP-1; UniC-1 + UniP-2; UniC-2 (2x2 solve) + UniP-2."""
    sch = make_scheduler("unipc", 6, 2.0, "cpu")
    sg = [float(v) for v in sch.sigmas]
    al = [1 - v for v in sg]
    lm = [_lam(v) for v in sg[:-1]]
    vel = _scalar_vel
    x_in = [0.8]                                              # samples the model sees
    m = [x_in[0] - sg[0] * vel(x_in[0], sg[0])]
    # step 0: no corrector, order 1
    x_hat = [x_in[0]]
    phi = math.expm1(-(lm[1] - lm[0]))
    x_in.append(sg[1] / sg[0] * x_hat[0] - al[1] * phi * m[0])
    # step 1: corrector p = 1 (x0 estimate from the uncorrected sample), then predictor q = 2 with rho = 0.5
    m.append(x_in[1] - sg[1] * vel(x_in[1], sg[1]))
    phi = math.expm1(-(lm[1] - lm[0]))
    x_hat.append(sg[1] / sg[0] * x_hat[0] - al[1] * phi * m[0] - al[1] * phi * 0.5 * (m[1] - m[0]))
    h = lm[2] - lm[1]
    phi = math.expm1(-h)
    r = (lm[0] - lm[1]) / h
    x_in.append(sg[2] / sg[1] * x_hat[1] - al[2] * phi * m[1] - al[2] * phi * 0.5 * (m[0] - m[1]) / r)
    # step 2: corrector p = 2 with the solved rho, then predictor q = 2
    m.append(x_in[2] - sg[2] * vel(x_in[2], sg[2]))
    h = lm[2] - lm[1]
    hh = -h
    phi = math.expm1(hh)
    r = (lm[0] - lm[1]) / h
    g1 = (phi / hh - 1) / phi
    g2 = 2 * ((phi / hh - 1) / hh - 0.5) / phi
    rho0, rho1 = (g1 - g2) / (1 - r), (g2 - r * g1) / (1 - r)    # [[1,1],[r,1]] rho = [g1,g2]
    x_hat.append(sg[2] / sg[1] * x_hat[1] - al[2] * phi * m[1]
                 - al[2] * phi * (rho0 * (m[0] - m[1]) / r + rho1 * (m[2] - m[1])))
    h = lm[3] - lm[2]
    phi = math.expm1(-h)
    r = (lm[1] - lm[2]) / h
    x_in.append(sg[3] / sg[2] * x_hat[2] - al[3] * phi * m[2] - al[3] * phi * 0.5 * (m[1] - m[2]) / r)

    x = torch.tensor([x_in[0]], dtype=torch.float32)
    for k in range(3):
        x = sch.step(vel(x, sch.sigmas[k]), sch.timesteps[k], x)[0]
        assert sch.this_order == (1 if k == 0 else 2)
        assert x.item() == pytest.approx(x_in[k + 1], rel=1e-5, abs=1e-6), k
        assert sch.last_sample.item() == pytest.approx(x_hat[k], rel=1e-5, abs=1e-6), k


def test_dpm_first_steps_by_hand():
    """DPM++(2M) steps 0-2: first order at step 0 (σ_0 = 1), midpoint 2nd order afterwards."""
    sch = FlowDPMSolverMultistepScheduler()
    sch.set_timesteps(sigmas=[0.95, 0.8, 0.6, 0.3])        # σ_0 < 1 so that step 1 has a non-zero D1
    sg = [float(v) for v in sch.sigmas]
    al = [1 - v for v in sg]
    lm = [_lam(v) for v in sg[:-1]]
    vel = _scalar_vel
    xs, ms = [0.8], []
    for i in range(3):
        ms.append(xs[i] - sg[i] * vel(xs[i], sg[i]))
        h = lm[i + 1] - lm[i]
        e = al[i + 1] * (math.exp(-h) - 1)
        x = sg[i + 1] / sg[i] * xs[i] - e * ms[i]
        if i > 0:
            r0 = (lm[i] - lm[i - 1]) / h
            x -= 0.5 * e * (ms[i] - ms[i - 1]) / r0
        xs.append(x)
    x = torch.tensor([xs[0]], dtype=torch.float32)
    for k in range(3):
        x = sch.step(vel(x, sch.sigmas[k]), sch.timesteps[k], x)[0]
        assert x.item() == pytest.approx(xs[k + 1], rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------ exact flows, convergence
@pytest.mark.parametrize("name", SOLVERS)
def test_point_mass_flow_is_integrated_exactly(name):
    """Data = one point x0: v(x, σ) = (x − x0)/σ has a constant x0 estimate, for which both exponential
    integrators are exact; every sample must stay on x_σ = (1−σ)·x0 + σ·n and the end must be x0, at any N."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 8, 8, generator=g)
    noise = torch.randn(1, 4, 3, 8, 8, generator=g)
    for n in (5, 10, 20):
        sch = make_scheduler(name, n, 5.0, "cpu")
        x = noise.clone()
        sig0 = sch.sigmas[0]
        n_eff = (x - (1 - sig0) * x0) / sig0                  # the noise on the path through the start sample
        for i, t in enumerate(sch.timesteps):
            x = sch.step((x - x0) / sch.sigmas[i], t, x)[0]
            s = sch.sigmas[i + 1]
            torch.testing.assert_close(x, (1 - s) * x0 + s * n_eff, atol=2e-5, rtol=2e-5)
        assert (x - x0).abs().max().item() < 2e-6


def _gaussian_problem():
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 2, 8, 8)
    mean = (0.5 * torch.randn(shape, generator=g)).double()
    std = (0.2 + 0.8 * torch.rand(shape, generator=g)).double()
    noise = torch.randn(shape, generator=g)

    def velocity(x, sigma):
        """Exact flow of x0 ~ N(mean, std²): v = (x − E[x0 | x_σ = x])/σ."""
        s, a = sigma.double(), 1 - sigma.double()
        post = mean + a * std ** 2 * (x.double() - a * mean) / (a * a * std ** 2 + s * s)
        return ((x.double() - post) / s).float()

    def exact_end(sigma0):
        """The ODE map is affine: x_σ = (1−σ)·mean + sqrt((1−σ)²std² + σ²)·z with z fixed along the path."""
        s = sigma0.double()
        z = (noise.double() - (1 - s) * mean) / torch.sqrt((1 - s) ** 2 * std ** 2 + s ** 2)
        return mean + std * z

    return noise, velocity, exact_end


@pytest.mark.parametrize("shift", [1.0, 5.0])
@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_data_converges(name, shift):
    noise, velocity, exact_end = _gaussian_problem()
    errs = []
    for n in (5, 10, 20, 40):
        sch = make_scheduler(name, n, shift, "cpu")
        x = sample_loop(sch, velocity, noise.clone())
        errs.append((x.double() - exact_end(sch.sigmas[0])).abs().max().item())
    # (rates are pre-asymptotic here: dpm++ 20 -> 40 steps only gains ~0.7x at shift 1, then ~2.6x/doubling)
    assert all(b < 0.85 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 10, errs
    assert errs[-1] < (2e-2 if shift == 1.0 else 0.15), errs


def test_unipc_beats_first_order_on_gaussian_data():
    """The corrector/2nd-order terms matter: UniPC-2 is far more accurate than its order-1 core (DDIM-like
    ``x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h}−1)·m_i``) on the same schedule."""
    noise, velocity, exact_end = _gaussian_problem()
    sch = make_scheduler("unipc", 20, 1.0, "cpu")
    exact = exact_end(sch.sigmas[0])
    err2 = (sample_loop(sch, velocity, noise.clone()).double() - exact).abs().max().item()
    sg = sch.sigmas.double()
    x = noise.double()
    for i in range(20):
        m = x - sg[i] * velocity(x.float(), sch.sigmas[i]).double()
        h = _lam(sg[i + 1].item()) - _lam(sg[i].item()) if i < 19 else math.inf
        x = sg[i + 1] / sg[i] * x - (1 - sg[i + 1]) * math.expm1(-h) * m
    err1 = (x - exact).abs().max().item()
    assert err2 < err1 / 3, (err2, err1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SOLVERS)
def test_cuda_matches_cpu(name):
    """Timesteps live on the device, sigmas/coefficients stay on the CPU; results agree with the CPU run."""
    noise, velocity, _ = _gaussian_problem()
    cpu = make_scheduler(name, 12, 5.0, "cpu")
    gpu = make_scheduler(name, 12, 5.0, "cuda")
    assert gpu.timesteps.device.type == "cuda" and gpu.sigmas.device.type == "cpu"
    ref = sample_loop(cpu, velocity, noise.clone())
    vel_gpu = lambda x, s: velocity(x.cpu(), s).cuda()
    out = sample_loop(gpu, vel_gpu, noise.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
