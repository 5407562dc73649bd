"""Flow-matching ODE samplers of the official Wan 2.2 T2V pipeline, without diffusers (docs/schedulers.md).

Noise model (rectified flow): ``x_σ = α·x0 + σ·ε`` with ``α = 1 − σ``; the network predicts the velocity
``v ≈ ε − x0`` ("flow_prediction"), so the data estimate is ``m = x − σ·v``.  Both solvers are exponential
integrators in the half-log-SNR ``λ = ln α − ln σ``: for a constant data estimate the exact step from σ_s to σ_t is

    x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·m,        h = λ_t − λ_s,

which the multistep methods correct with finite differences of earlier ``m`` values.

* :class:`FlowUniPCMultistepScheduler` -- UniPC-2 (bh2, predict-x0, UniC corrector from the 2nd step on,
  ``lower_order_final``), the default ``sample_solver='unipc'``.
* :class:`FlowDPMSolverMultistepScheduler` -- DPM-Solver++(2M), midpoint (``--sample_solver dpm++``).
* :func:`get_sampling_sigmas`, :func:`make_scheduler` -- the schedule helpers used by ``WanT2V.generate``.

Numerics follow the official code: schedules are built in float64 numpy, timesteps are truncated to int64, the
sigma table is fp32 on the CPU, every coefficient is a 0-dim fp32 CPU tensor combined in the official grouping
``(scalar·scalar)·tensor``, and samples are fp32.  Only the configuration the official pipeline uses (plus a few
trivial switches) is supported; anything else raises ``ValueError``.
"""
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SchedulerOutput", "FlowUniPCMultistepScheduler", "FlowDPMSolverMultistepScheduler",
           "get_sampling_sigmas", "make_scheduler"]


@dataclass
class SchedulerOutput:
    """Result of ``step(..., return_dict=True)``."""
    prev_sample: torch.Tensor


def get_sampling_sigmas(sampling_steps, shift):
    """dpm++ schedule of the official pipeline (float64 numpy, ``sampling_steps`` values, first exactly 1.0):
    ``s = linspace(1, 0, steps+1)[:steps]``, ``s ← shift·s / (1 + (shift−1)·s)``."""
    s = np.linspace(1, 0, sampling_steps + 1)[:sampling_steps]
    return shift * s / (1 + (shift - 1) * s)


class _FlowMultistep:
    """Schedule, step-index bookkeeping and the λ helper shared by both solvers.

    Training sigmas: ``σ = 1 − reverse(linspace(1, 1/T, T))`` (float64 → fp32, then the constructor ``shift``),
    so ``σ_max = fp32(0.999)`` and ``σ_min = 0``.  ``set_timesteps`` spaces ``num_inference_steps`` values
    linearly in [σ_max, σ_min) (or takes ``sigmas``), applies ``shift`` (default: the constructor's), sets
    ``timesteps = int64(σ·T)`` (truncation) on ``device`` and ``sigmas = fp32([σ..., 0])`` on the CPU.
    """

    def __init__(self, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, solver_order=2,
                 prediction_type="flow_prediction", thresholding=False, final_sigmas_type="zero"):
        _require(not use_dynamic_shifting, "use_dynamic_shifting=True (mu-based shifting) is not supported")
        _require(solver_order == 2, f"solver_order={solver_order} is not supported (only 2)")
        _require(prediction_type == "flow_prediction", f"prediction_type={prediction_type!r} is not supported")
        _require(not thresholding, "thresholding is not supported")
        _require(final_sigmas_type == "zero", f"final_sigmas_type={final_sigmas_type!r} is not supported")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = shift
        self.solver_order = solver_order
        n = self.num_train_timesteps
        sig = torch.from_numpy(1.0 - np.linspace(1, 1 / n, n)[::-1].copy()).to(torch.float32)
        sig = shift * sig / (1 + (shift - 1) * sig)
        self.sigma_max, self.sigma_min = sig[0].item(), sig[-1].item()
        self.sigmas, self.timesteps = sig, sig * n     # training schedule until set_timesteps is called
        self.num_inference_steps = None
        self._reset()

    def _reset(self):
        self.model_outputs = [None] * self.solver_order   # data estimates m, oldest first
        self.lower_order_nums = 0
        self._step_index = None

    @property
    def step_index(self):
        """Index of the next step (None before the first ``step`` after ``set_timesteps``)."""
        return self._step_index

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, shift=None):
        """Build the inference schedule (see the class docstring) and reset the solver state."""
        _require(mu is None, "mu is only used with dynamic shifting, which is not supported")
        if sigmas is None:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            s = np.linspace(self.sigma_max, self.sigma_min, int(num_inference_steps) + 1).copy()[:-1]
        else:
            s = np.asarray(sigmas.detach().cpu() if torch.is_tensor(sigmas) else sigmas)
            if s.dtype.kind != "f":
                s = s.astype(np.float64)
            _require(s.ndim == 1 and s.size >= 1, "sigmas must be a non-empty 1-D sequence")
        shift = self.shift if shift is None else shift
        s = shift * s / (1 + (shift - 1) * s)
        self.timesteps = torch.from_numpy(s * self.num_train_timesteps).to(device=device, dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([s, [0]]).astype(np.float32))
        self.num_inference_steps = len(s)
        self._reset()

    def index_for_timestep(self, timestep):
        """Position of ``timestep`` in ``timesteps`` (the second match when it occurs more than once)."""
        t = torch.as_tensor(timestep)
        if t.numel() != 1:
            raise ValueError(f"step expects one timestep, got shape {tuple(t.shape)}")
        idx = (self.timesteps == t.reshape(()).to(self.timesteps.device)).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {t.item()} is not in the schedule {self.timesteps.tolist()}")
        return idx[1 if len(idx) > 1 else 0].item()

    def _begin(self, timestep):
        """Common head of ``step``: check the state and return the current step index."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before step(...)")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps are done; call set_timesteps(...) again")
        return self._step_index

    def _push(self, m):
        self.model_outputs = self.model_outputs[1:] + [m]

    def _als(self, i):
        """(α_i, σ_i, λ_i) as 0-dim fp32 CPU tensors; λ = ln α − ln σ (+inf at σ = 0, −inf at σ = 1)."""
        s = self.sigmas[i]
        a = 1 - s
        return a, s, torch.log(a) - torch.log(s)

    @staticmethod
    def _out(x, return_dict):
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)


def _require(ok, msg):
    if not ok:
        raise ValueError(msg)


class FlowUniPCMultistepScheduler(_FlowMultistep):
    r"""UniPC-2 for flow matching (bh2, predict-x0), as ``FlowUniPCMultistepScheduler`` of the official code.

    Step i (N steps, σ_N = 0, model saw ``x_i`` and returned ``v_i``):

    1. ``m_i = x_i − σ_i·v_i`` (from the *uncorrected* x_i).
    2. UniC-p corrector (i > 0, unless i−1 in ``disable_corrector``), p = predictor order of step i−1,
       ``x̂_{i−1}`` = corrected sample stored at step i−1, ``h = λ_i − λ_{i−1}``, ``hh = −h``,
       ``φ = expm1(hh)``, ``B = φ`` (bh2; bh1: ``B = hh``)::

           base = (σ_i/σ_{i−1})·x̂_{i−1} − (α_i·φ)·m_{i−1}
           p=1: x̂_i = base − (α_i·B)·(0.5·(m_i − m_{i−1}))
           p=2: r = (λ_{i−2} − λ_{i−1})/h, D = (m_{i−2} − m_{i−1})/r,
                g1 = (φ/hh − 1)/B, g2 = 2·((φ/hh − 1)/hh − 1/2)/B, [[1,1],[r,1]]·ρ = [g1,g2]
                x̂_i = base − (α_i·B)·(ρ0·D + ρ1·(m_i − m_{i−1}))

       (i = 0: ``x̂_0 = x_0``.)
    3. order ``q = min(2, N − i, 1 + #previous steps)`` (``lower_order_final``).
    4. UniP-q predictor, ``h = λ_{i+1} − λ_i``::

           base = (σ_{i+1}/σ_i)·x̂_i − (α_{i+1}·φ)·m_i
           q=1: x_{i+1} = base
           q=2: r = (λ_{i−1} − λ_i)/h, D = (m_{i−1} − m_i)/r, x_{i+1} = base − (α_{i+1}·B)·(0.5·D)

       At the last step σ_N = 0 gives ``x_N = m_{N−1}`` exactly.
    """

    def __init__(self, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, solver_order=2,
                 prediction_type="flow_prediction", predict_x0=True, solver_type="bh2", lower_order_final=True,
                 disable_corrector=(), solver_p=None, thresholding=False, final_sigmas_type="zero", **unused):
        _require(predict_x0, "predict_x0=False is not supported")
        _require(solver_type in ("bh1", "bh2"), f"solver_type={solver_type!r} is not supported (bh1, bh2)")
        _require(solver_p is None, "solver_p is not supported")
        _require(not unused, f"unsupported options: {sorted(unused)}")
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = list(disable_corrector)
        super().__init__(num_train_timesteps, shift, use_dynamic_shifting, solver_order, prediction_type,
                         thresholding, final_sigmas_type)

    def _reset(self):
        super()._reset()
        self.last_sample = None
        self.this_order = None

    def _coeffs(self, t, s):
        """α_t, σ_t, σ_s, h = λ_t − λ_s, hh = −h, φ = expm1(hh), B for the interval s → t."""
        a_t, s_t, l_t = self._als(t)
        _, s_s, l_s = self._als(s)
        h = l_t - l_s
        hh = -h
        phi = torch.expm1(hh)
        return a_t, s_t, s_s, l_s, h, hh, phi, (phi if self.solver_type == "bh2" else hh)

    def _corrector(self, m, order):
        """UniC-p: corrected version of the current sample from ``last_sample`` and the data estimates."""
        i = self._step_index
        m_prev, x = self.model_outputs[-1], self.last_sample
        a_t, s_t, s_s, l_s, h, hh, phi, B = self._coeffs(i, i - 1)
        base = (s_t / s_s) * x - (a_t * phi) * m_prev
        d_t = m - m_prev
        if order == 1:
            return (base - (a_t * B) * (0.5 * d_t)).to(x.dtype)
        r = (self._als(i - 2)[2] - l_s) / h
        d = (self.model_outputs[-2] - m_prev) / r
        hpk = phi / hh - 1
        b = torch.stack([hpk * 1 / B, (hpk / hh - 0.5) * 2 / B]).to(x.device)
        rks = torch.stack([r, torch.ones_like(r)]).to(x.device)
        rho = torch.linalg.solve(torch.stack([torch.ones_like(rks), rks]), b).to(x.dtype)
        return (base - (a_t * B) * (rho[0] * d + rho[1] * d_t)).to(x.dtype)

    def _predictor(self, x, order):
        """UniP-q: the sample at the next sigma from the corrected sample and the data estimates."""
        i = self._step_index
        m = self.model_outputs[-1]
        a_t, s_t, s_s, l_s, h, hh, phi, B = self._coeffs(i + 1, i)
        out = (s_t / s_s) * x - (a_t * phi) * m
        if order == 2:
            r = (self._als(i - 1)[2] - l_s) / h
            out = out - (a_t * B) * (0.5 * ((self.model_outputs[-2] - m) / r))
        return out.to(x.dtype)

    def step(self, model_output, timestep, sample, return_dict=False, generator=None):
        """Advance ``sample`` (seen by the model at ``timestep``) by one step; ``generator`` is unused.

        The step index is located from ``timestep`` on the first call only and then increments.  Returns
        ``(prev_sample,)`` or, with ``return_dict=True``, a :class:`SchedulerOutput`.  ``sample`` is upcast
        to fp32 (the official pipeline passes fp32 latents, for which this is a no-op).
        """
        i = self._begin(timestep)
        sample = sample.to(torch.float32)
        m = sample - self.sigmas[i] * model_output
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            sample = self._corrector(m, self.this_order)
        self._push(m)
        q = min(self.solver_order, self.num_inference_steps - i) if self.lower_order_final else self.solver_order
        self.this_order = min(q, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predictor(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self._step_index += 1
        return self._out(prev, return_dict)


class FlowDPMSolverMultistepScheduler(_FlowMultistep):
    r"""DPM-Solver++(2M), midpoint, for flow matching, as ``FlowDPMSolverMultistepScheduler`` of the official code.

    Step i: ``m_i = x_i − σ_i·v_i``; with ``h = λ_{i+1} − λ_i`` and ``E = α_{i+1}·(e^{−h} − 1)``::

        first step and last step (final σ = 0):  x_{i+1} = (σ_{i+1}/σ_i)·x_i − E·m_i
        otherwise: r0 = (λ_i − λ_{i−1})/h, D1 = (1/r0)·(m_i − m_{i−1}),
                   x_{i+1} = (σ_{i+1}/σ_i)·x_i − E·m_i − (0.5·E)·D1

    With the official dpm++ schedule σ_0 = 1 (λ_0 = −∞), so the first step is ``x_1 = σ_1·x_0 + α_1·m_0`` and
    the second step's ``D1`` is exactly 0 (r0 = ∞): the second-order correction starts at step 2.
    """

    def __init__(self, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, solver_order=2,
                 prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_type="midpoint",
                 lower_order_final=True, euler_at_final=False, thresholding=False, final_sigmas_type="zero",
                 **unused):
        _require(algorithm_type == "dpmsolver++", f"algorithm_type={algorithm_type!r} is not supported")
        _require(solver_type == "midpoint", f"solver_type={solver_type!r} is not supported (midpoint)")
        _require(not unused, f"unsupported options: {sorted(unused)}")
        # with order 2 and a zero final sigma, lower_order_final/euler_at_final change nothing
        self.lower_order_final, self.euler_at_final = lower_order_final, euler_at_final
        super().__init__(num_train_timesteps, shift, use_dynamic_shifting, solver_order, prediction_type,
                         thresholding, final_sigmas_type)

    def step(self, model_output, timestep, sample, return_dict=False, generator=None):
        """Advance ``sample`` by one step (same contract as the UniPC ``step``; ``generator`` is unused)."""
        i = self._begin(timestep)
        m = sample - self.sigmas[i] * model_output
        self._push(m)
        x = sample.to(torch.float32)
        a_t, s_t, l_t = self._als(i + 1)
        _, s_s, l_s = self._als(i)
        h = l_t - l_s
        e = a_t * (torch.exp(-h) - 1.0)
        prev = (s_t / s_s) * x - e * m
        if self.lower_order_nums >= 1 and i != self.num_inference_steps - 1:
            r0 = (l_s - self._als(i - 1)[2]) / h
            prev = prev - 0.5 * e * ((1.0 / r0) * (m - self.model_outputs[-2]))
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self._step_index += 1
        return self._out(prev.to(torch.float32), return_dict)


def make_scheduler(name, steps, shift, device=None, num_train_timesteps=1000):
    """Scheduler exactly as ``WanT2V.generate`` builds it (constructor shift 1, the run's shift applied in
    ``set_timesteps``): ``"unipc"`` → ``set_timesteps(steps, device, shift=shift)``; ``"dpm++"`` →
    ``set_timesteps(steps, device, sigmas=get_sampling_sigmas(steps, shift))``."""
    if name == "unipc":
        sch = FlowUniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, shift=1,
                                          use_dynamic_shifting=False)
        sch.set_timesteps(steps, device=device, shift=shift)
    elif name == "dpm++":
        sch = FlowDPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, shift=1,
                                              use_dynamic_shifting=False)
        sch.set_timesteps(steps, device=device, sigmas=get_sampling_sigmas(steps, shift))
    else:
        raise ValueError(f"unknown solver {name!r}; expected 'unipc' or 'dpm++'")
    return sch
