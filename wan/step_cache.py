"""Step caching for the two-expert pipeline (opt-in, lossy): a denoising step that changes little
adds again the residual its DiT blocks added at the last computed step, instead of running them.

    h_stop = h_start + (h'_stop - h'_start)     over the block range [start, stop) (default: all
                                                blocks); h' of the last computed step of the same
                                                expert and the same CFG branch

The embeddings and the head still run at every step, with the step's own input and timestep;
only the blocks of the range are skipped (at 720p they are ~99 % of a forward). The model is
not forked: `WanModel.forward` hands its block loop to the run (`WanModel.step_cache`), and
the denoising loop (wan.denoise) tells the run each step. When to reuse, `CachePolicy`:

  easy   calibration-free (EasyCache-like). k = |v_c - v_c'| / |x_c - x_c'|, the rate of velocity
         change per latent change between the last two computed steps c', c of this expert
         (x the latent, v the CFG-combined velocity). Each later step adds its predicted
         relative change k |x_n - x_{n-1}| / |v_{n-1}| to an accumulator; the step is reused
         while the accumulator stays under `threshold`, else computed (accumulator back to 0).
  mag    magnitude ratios (MagCache-like): gamma_n, the ratio of the residual's mean norm at
         step n to step n-1, measured once from the model (wan.mag_ratios). Since the last
         computed step: g = prod gamma, err += |1 - g| (per branch); reused while the larger
         err stays under `threshold`.
  cfg_interval  the CFG-branch cache, alone or with either: the unconditional branch runs every
         `cfg_interval`-th step; in between, uncond = cond + (uncond - cond) of its last run.

Whatever the criterion: the first `warmup` share of the steps, the first step of each expert
(a residual or a CFG difference is never used across the expert switch) and the last step
are computed, and at most `max_skips` steps in a row are reused. Under torchrun every rank
takes the same decisions: `easy` reads the latents and velocities, which are the same on every
rank, and rank 0's decision is broadcast anyway; `mag` and `cfg_interval` read the step index
only. The CFG-branch cache needs both branches in one process (not with cfg_parallel).

What a run did lands in `Timings.cache` (`CacheStats`) and one log line. Memory: one residual
per CFG branch of the active expert, as large as the hidden states (fp32 [tokens, dim]:
1.55 GB per branch at 1280x720x81 for A14B, divided by the Ulysses degree).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch

from .mag_ratios import CacheError, Calibration, MagRatios, find_ratios, fingerprint, load_ratios, ratios_dir
from .naming import Arg

__all__ = ["CRITERIA", "CRITERION_DEFAULTS", "CacheError", "CachePolicy", "CacheStats", "CacheRun",
           "enable_step_cache", "disable_step_cache", "check_parallel", "cfg_cache_conflicts", "no_ratios_args",
           "NO_RATIOS_REASON", "CFG_PARALLEL_REASON", "start_run", "calibrate"]

log = logging.getLogger("wan.step_cache")

CRITERIA = ("none", "easy", "mag")


@dataclass(frozen=True)
class CriterionDefaults:
    threshold: float
    max_skips: int


# Conservative points of the quality sweep on the trained demo model (40 steps, 8 prompts; bench/RESULTS.md
# section 15, docs/caching.md): both >= 30 dB on every video. easy 0.05: 1.52x fewer block calls at 48.9 dB
# (worst 43.2); mag 0.025: 2.0x at 38.3 dB (worst 34.2). mag 0.1 (the value before the sweep) fell to 28.1 dB;
# higher mag thresholds only hit the 3-in-a-row cap, so they are no guide for A14B.
CRITERION_DEFAULTS = {"easy": CriterionDefaults(threshold=0.05, max_skips=3),
                      "mag": CriterionDefaults(threshold=0.025, max_skips=3)}


@dataclass(frozen=True)
class CachePolicy:
    """When a step reuses its stored residual. Its arguments' API words (optimize(), the messages)
    are cache=<criterion>, cache_threshold, cache_cfg, cache_ratios."""
    criterion: str = "none"         # 'none', 'easy', 'mag'
    threshold: float | None = None  # None: the criterion's default (CRITERION_DEFAULTS)
    cfg_interval: int = 0           # CFG-branch cache: uncond runs every n-th step (0 or 1: every step)
    blocks: tuple | None = None     # the block range (start, stop) whose residual is reused; None: all
    warmup: float = 0.1             # the share of the steps at the start that are always computed
    max_skips: int | None = None    # steps reused in a row at most; None: the criterion's default
    ratios_file: str | None = None  # mag: a ratio file or folder; None: <ckpt_dir>/mag_ratios
    record: bool = False            # measure the magnitude ratios of every step (calibrate), skip nothing

    @property
    def active(self) -> bool:
        return self.criterion != "none" or self.cfg_interval >= 2 or self.record

    @property
    def lossy(self) -> bool:
        return self.criterion != "none" or self.cfg_interval >= 2

    @property
    def limit(self) -> float:
        return CRITERION_DEFAULTS[self.criterion].threshold if self.threshold is None else self.threshold

    @property
    def skips(self) -> int:
        return CRITERION_DEFAULTS[self.criterion].max_skips if self.max_skips is None else self.max_skips

    def block_range(self, num_layers: int) -> tuple[int, int]:
        return (0, num_layers) if self.blocks is None else tuple(self.blocks)

    def check(self, num_layers: int | None = None) -> "CachePolicy":
        """Returns self; CacheError (one line) for a setting that cannot work."""
        if self.criterion not in CRITERIA:
            raise CacheError("{a} is not a step cache; choose from {choices}", a=Arg("cache", self.criterion),
                             choices=", ".join(CRITERIA))
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise CacheError("{a} must be a finite number >= 0, got {value}", a=Arg("cache_threshold"),
                             value=self.threshold)
        if not isinstance(self.cfg_interval, int) or self.cfg_interval < 0:
            raise CacheError("{a} must be a whole number >= 0 (0: off), got {value}", a=Arg("cache_cfg"),
                             value=self.cfg_interval)
        if not 0 <= self.warmup <= 1:
            raise CacheError(f"the step cache's warmup is a share of the steps, 0..1, got {self.warmup}")
        if self.max_skips is not None and self.max_skips < 1:
            raise CacheError(f"the step cache's max_skips must be >= 1, got {self.max_skips}")
        if self.blocks is not None and num_layers is not None:
            a, b = self.blocks
            if not 0 <= a < b <= num_layers:
                raise CacheError(f"the step cache's block range {tuple(self.blocks)} is not within the model's "
                                 f"{num_layers} blocks (start < stop)")
        return self

    def summary(self) -> str:
        """'easy (threshold 0.05, <= 3 in a row) + CFG-branch cache (uncond every 2nd step)'."""
        parts = []
        if self.criterion != "none":
            rng = "" if self.blocks is None else f", blocks {self.blocks[0]}-{self.blocks[1] - 1}"
            parts.append(f"{self.criterion} (threshold {self.limit:g}, <= {self.skips} in a row{rng})")
        if self.cfg_interval >= 2:
            parts.append(f"CFG-branch cache (uncond every {_nth(self.cfg_interval)} step)")
        return " + ".join(parts) or ("recording magnitude ratios" if self.record else "off")


def _nth(n: int) -> str:
    return f"{n}{'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


@dataclass
class CacheStats:
    """What a cached generation did. A forward is one expert call for one CFG branch (a batch-2
    call counts two); a block run is one block for one branch."""
    policy: str = ""
    forwards: int = 0          # forwards that ran their block range
    reused: int = 0            # forwards that added the stored residual instead
    uncond_reused: int = 0     # unconditional forwards not made at all (CFG-branch cache)
    blocks_run: int = 0        # block runs
    blocks_total: int = 0      # block runs without the cache
    steps: list = field(default_factory=list)  # per step: 'run', 'reuse', plus '+cfg' when uncond came from cache
    ratios: dict | None = None  # record: branch -> the magnitude ratio of every step

    @property
    def saved(self) -> float:
        """Block runs without the cache / with it (1.0: nothing saved)."""
        return self.blocks_total / self.blocks_run if self.blocks_run else 1.0

    def line(self) -> str:
        made = self.forwards + self.reused
        cfg = f", {self.uncond_reused} unconditional forwards not made" if self.uncond_reused else ""
        return (f"step cache {self.policy}: {self.reused} of {made} forwards reused their residual{cfg}; "
                f"{self.blocks_run} of {self.blocks_total} block runs ({self.saved:.2f}x fewer)")


class _Easy:
    """The calibration-free criterion (module docstring), for one expert."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.k = None          # velocity change per latent change, between the last two computed steps
        self.acc = 0.0         # predicted relative change since the last computed step
        self.prev = None       # (latent, velocity) of the previous step
        self.computed = None   # (latent, velocity) of the last computed step

    def wants_reuse(self, step, latent) -> bool:
        if self.k is None or self.prev is None:
            return False
        x, v = self.prev
        self.acc += self.k * _norm(latent - x) / max(_norm(v), 1e-12)
        return self.acc < self.threshold

    def observe(self, latent, v, computed: bool) -> None:
        if computed:
            if self.computed is not None:
                dx = _norm(latent - self.computed[0])
                self.k = _norm(v - self.computed[1]) / dx if dx > 0 else None
            self.computed, self.acc = (latent, v), 0.0
        self.prev = (latent, v)


class _Mag:
    """The magnitude-ratio criterion (module docstring), for one expert."""

    def __init__(self, threshold: float, ratios: MagRatios):
        self.threshold, self.ratios = threshold, ratios.ratios
        self.gain = {b: 1.0 for b in self.ratios}
        self.err = {b: 0.0 for b in self.ratios}

    def wants_reuse(self, step, latent) -> bool:
        for b, r in self.ratios.items():
            self.gain[b] *= r[step.index]
            self.err[b] += abs(1.0 - self.gain[b])
        return max(self.err.values()) < self.threshold

    def observe(self, latent, v, computed: bool) -> None:
        if computed:
            self.gain = {b: 1.0 for b in self.ratios}
            self.err = {b: 0.0 for b in self.ratios}


def _norm(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x.float()).item()


class CacheRun:
    """One generation under a policy: the denoising loop calls `begin` / `end` around each step's
    velocity, `WanT2V._guided` labels each forward with its branches (`branches`) and asks for the
    unconditional velocity (`reuse_uncond`, `uncond_of`, `saw_branches`), and each expert's
    forward hands its blocks to `run_blocks`."""

    def __init__(self, policy: CachePolicy, num_layers: int, count: int, parallel=None,
                 ratios: MagRatios | None = None, models=()):
        self.policy, self.parallel, self.ratios, self.models = policy, parallel, ratios, tuple(models)
        for m in self.models:  # their forwards hand their blocks to run_blocks until finish()
            m.step_cache = self
        self.num_layers = num_layers
        self.start, self.stop = policy.block_range(num_layers)
        self.warmup = max(1, math.ceil(policy.warmup * count))
        self.stats = CacheStats(policy=policy.summary(),
                                ratios={"cond": [1.0] * count, "uncond": [1.0] * count} if policy.record else None)
        self.reuse_blocks = self.reuse_uncond = False
        self._step = None
        self._branches: tuple = ()
        self._criterion = None
        self._residual: dict = {}    # branch -> the residual its last computed forward added
        self._magnitude: dict = {}   # record: branch -> mean residual norm of its previous forward
        self._delta = None           # uncond - cond velocity of the last step that ran both
        self._uncond_at = -1
        self._in_row = 0

    # ---------------------------------------------------------------- the loop's calls
    def begin(self, step, latent: torch.Tensor) -> None:
        """Decide `step`: reuse the residuals (`reuse_blocks`), derive uncond (`reuse_uncond`)."""
        p = self.policy
        if step.expert_start:  # nothing crosses the expert switch
            self._residual, self._delta, self._uncond_at, self._in_row = {}, None, -1, 0
            self._criterion = (_Easy(p.limit) if p.criterion == "easy"
                               else _Mag(p.limit, self.ratios) if p.criterion == "mag" else None)
        forced = step.index < self.warmup or step.expert_start or step.last
        reuse = False
        if self._criterion is not None and not forced:
            reuse = self._criterion.wants_reuse(step, latent) and self._in_row < p.skips
            if p.criterion == "easy":  # read from values: rank 0's verdict holds everywhere
                reuse = self._agree(reuse)
        self.reuse_blocks = reuse
        self._in_row = self._in_row + 1 if reuse else 0
        self.reuse_uncond = (p.cfg_interval >= 2 and not forced and self._delta is not None
                             and step.index - self._uncond_at < p.cfg_interval)
        self._step = step

    def end(self, step, latent: torch.Tensor, v: torch.Tensor) -> None:
        if self._criterion is not None:
            self._criterion.observe(latent, v, computed=not self.reuse_blocks)
        self.stats.steps.append(("reuse" if self.reuse_blocks else "run") + ("+cfg" if self.reuse_uncond else ""))

    def finish(self) -> CacheStats:
        """Detach from the experts, drop what was stored; the counts (logged when lossy)."""
        for m in self.models:
            m.step_cache = None
        self._residual, self._delta, self._criterion = {}, None, None
        if self.policy.lossy:
            log.info("%s", self.stats.line())
        return self.stats

    # ---------------------------------------------------------------- CFG
    @contextlib.contextmanager
    def branches(self, names: tuple):
        """The CFG branch of each sample of the forwards inside ('cond' / 'uncond')."""
        self._branches = tuple(names)
        try:
            yield
        finally:
            self._branches = ()

    def uncond_of(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional velocity from the conditional one and the stored difference."""
        self.stats.uncond_reused += 1
        self.stats.blocks_total += self.num_layers
        return cond + self._delta

    def saw_branches(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Both branches' velocities of this step: keep their difference when both ran."""
        if self.policy.cfg_interval >= 2 and not self.reuse_uncond:
            self._delta = uncond - cond
            self._uncond_at = self._step.index

    # ---------------------------------------------------------------- the blocks
    def run_blocks(self, blocks, h: torch.Tensor, call) -> torch.Tensor:
        """`h` through `blocks` (call(block, h) runs one), the range [start, stop) replaced by the
        stored residual of each sample's branch on a reused step."""
        names = self._branches or ("cond",) * h.shape[0]
        n = len(names)
        s = self.stats
        s.blocks_total += self.num_layers * n
        for blk in blocks[:self.start]:
            h = call(blk, h)
        stored = [self._residual.get(b) for b in names]
        if self.reuse_blocks and all(r is not None for r in stored):
            h = h + (stored[0].unsqueeze(0) if n == 1 else torch.stack(stored))
            s.reused += n
        else:
            h_in = h
            for blk in blocks[self.start:self.stop]:
                h = call(blk, h)
            res = h - h_in
            for i, b in enumerate(names):
                self._residual[b] = res[i]
            if self.policy.record:
                self._record(names, res)
            s.forwards += n
            s.blocks_run += (self.stop - self.start) * n
        for blk in blocks[self.stop:]:
            h = call(blk, h)
        s.blocks_run += (self.num_layers - (self.stop - self.start)) * n
        return h

    def _record(self, names, res: torch.Tensor) -> None:
        for i, b in enumerate(names):
            m = res[i].float().norm(dim=-1).mean().item()
            prev = self._magnitude.get(b)
            if prev:
                self.stats.ratios[b][self._step.index] = m / prev
            self._magnitude[b] = m

    def _agree(self, flag: bool) -> bool:
        par = self.parallel
        if par is None or par.world == 1:
            return flag
        return bool(par.broadcast_int(int(flag)))


# -------------------------------------------------------------------- switching it on

# the rules below are also rows of the acceleration layer's plan table (wan_triton.plan.RULES),
# which reads their conditions and words from here
NO_RATIOS_REASON = ("{a} needs the magnitude ratios of this model, and {b} have no checkpoint folder to find them "
                    "beside: give {ratios} (docs/caching.md)")
CFG_PARALLEL_REASON = ("{a} derives the unconditional branch from the conditional one in one process, and {b} "
                       "computes both at once on two halves of the GPUs (nothing to save): drop one of them")


def no_ratios_args() -> dict:
    """NO_RATIOS_REASON's fields."""
    return dict(a=Arg("cache", "mag"), b="random weights", ratios=Arg("cache_ratios", "<file>", literal=True))


def cfg_cache_conflicts(policy: CachePolicy | None, cfg_parallel: bool) -> bool:
    """The CFG-branch cache derives one branch from the other in one process; under cfg_parallel
    the two halves of the ranks compute them at the same time (nothing to save)."""
    return policy is not None and cfg_parallel and policy.cfg_interval >= 2


def _ratios_source(pipe, policy: CachePolicy):
    if policy.ratios_file is not None:
        return policy.ratios_file
    if getattr(pipe, "ckpt_dir", None) is None:
        raise CacheError(NO_RATIOS_REASON, **no_ratios_args())
    return ratios_dir(pipe.ckpt_dir)


def check_parallel(policy: CachePolicy, cfg_parallel: bool) -> None:
    """CacheError when `cfg_cache_conflicts`."""
    if cfg_cache_conflicts(policy, cfg_parallel):
        raise CacheError(CFG_PARALLEL_REASON, a=Arg("cache_cfg", policy.cfg_interval), b=Arg("cfg_parallel", True))


def _experts_layers(pipe) -> int:
    return pipe.high_noise_model.config.num_layers


def enable_step_cache(pipe, policy: CachePolicy):
    """Switch the step cache on a `WanT2V` (`pipe.step_cache`); returns a function that puts the
    previous policy back. Checks the policy, and for `mag` reads the ratios (`ratios_file`, else
    <ckpt_dir>/mag_ratios) and checks they were measured on this model (CacheError, one line);
    the schedule is matched when a generation starts."""
    policy.check(_experts_layers(pipe))
    check_parallel(policy, getattr(pipe, "parallel", None) is not None and pipe.parallel.cfg_parallel)
    if policy.criterion == "mag":
        fp = fingerprint(pipe)
        for r in load_ratios(_ratios_source(pipe, policy)):
            r.check(fp, policy.block_range(_experts_layers(pipe)))
    prev = pipe.step_cache
    pipe.step_cache = policy if policy.active else None
    if policy.active:
        log.info("step cache: %s%s", policy.summary(), " (lossy)" if policy.lossy else "")

    def undo():
        pipe.step_cache = prev
    return undo


def disable_step_cache(pipe) -> None:
    pipe.step_cache = None


def start_run(pipe, steps, *, solver: str, shift: float) -> CacheRun | None:
    """The run of one generation under `pipe.step_cache` (None when there is none), attached to
    both experts until `finish()`. `mag`: the ratios of this model and schedule (CacheError)."""
    policy = pipe.step_cache
    if policy is None or not policy.active:
        return None
    layers = _experts_layers(pipe)
    check_parallel(policy, pipe.parallel is not None and pipe.parallel.cfg_parallel)
    ratios = None
    if policy.criterion == "mag":
        ratios = find_ratios(load_ratios(_ratios_source(pipe, policy)), solver, len(steps), shift)
        ratios.check(fingerprint(pipe), policy.block_range(layers))
    return CacheRun(policy, layers, len(steps), pipe.parallel, ratios,
                    models=(pipe.high_noise_model, pipe.low_noise_model))


def calibrate(pipe, prompts, *, steps: int, shift: float, solver: str = "unipc", size=(832, 480),
              frame_num: int = 81, guide_scale=None, seeds=(0,), blocks=None, progress: bool = True,
              offload_model: bool | None = None) -> MagRatios:
    """Measure the model's magnitude ratios for one schedule: an exact generation (nothing
    reused) per prompt and seed, the ratios averaged over them. Returns them (`save()` them
    beside the checkpoint: wan.mag_ratios.ratios_dir). offload_model: as generate()'s (None
    follows the pipeline's offload mode)."""
    layers = _experts_layers(pipe)
    policy = CachePolicy(blocks=blocks, record=True).check(layers)
    prev, pipe.step_cache = pipe.step_cache, policy
    sums, n = None, 0
    try:
        for prompt in prompts:
            for seed in seeds:
                pipe.generate(prompt, size=size, frame_num=frame_num, shift=shift, sample_solver=solver,
                              sampling_steps=steps, guide_scale=guide_scale, seed=seed, progress=progress,
                              offload_model=offload_model, return_latents=True)
                got = pipe.last_timings.cache.ratios
                sums = got if sums is None else {b: [a + x for a, x in zip(sums[b], got[b])] for b in sums}
                n += 1
    finally:
        pipe.step_cache = prev
    w, h = map(int, size.split("*")) if isinstance(size, str) else size
    g = pipe.config.sample_guide_scale if guide_scale is None else guide_scale
    return MagRatios(model=pipe.config.name, fingerprint=fingerprint(pipe), solver=solver, steps=steps,
                     shift=float(shift), blocks=policy.block_range(layers),
                     ratios={b: tuple(x / n for x in v) for b, v in sums.items()},
                     calibration=Calibration(prompts=tuple(prompts), seeds=tuple(seeds), size=f"{w}*{h}",
                                             frame_num=frame_num,
                                             guide_scale=tuple(g) if isinstance(g, (tuple, list)) else (g,)))
