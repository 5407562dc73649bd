"""Checks on a generation request (size, frame count, solver, steps), made before anything runs.

Kept apart from the pipeline so the CLIs can validate a request before any model is built.
"""
from __future__ import annotations

import math

from .configs import T2VConfig, parse_size
from .naming import Arg, NamedError

SOLVERS = ("unipc", "dpm++", "euler")  # euler: the few-step distilled LoRAs (docs/lora.md)
SEED_MAX = 2 ** 63 - 1  # int64: what the random draw gives and what torchrun broadcasts; -1 draws one


class InputError(NamedError):
    """Bad user input (size, frame count, solver, ...): one line naming the argument (an `Arg`, said
    as its flag by the CLIs)."""


def check_finite(name: str, value) -> float:
    """`value` as a float; InputError unless it is a finite number (NaN and inf are refused)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError("{arg} must be a number, got {value!r}", arg=Arg(name), value=value) from None
    if not math.isfinite(x):
        raise InputError("{arg} must be a finite number, got {value}", arg=Arg(name), value=value)
    return x


def check_seed(seed: int | None) -> None:
    """None or -1 (draw one), else 0 .. SEED_MAX; InputError otherwise."""
    if seed is not None and seed != -1 and not 0 <= seed <= SEED_MAX:
        raise InputError("{arg} must be -1 (random) or 0..{max}, got {seed}", arg=Arg("seed"), max=SEED_MAX,
                         seed=seed)


def check_request(config: T2VConfig, size, frame_num: int, solver: str = "unipc",
                  sampling_steps: int | None = None, *, shift: float | None = None, guide_scale=None,
                  seed: int | None = None) -> tuple[int, int]:
    """Validate a request against `config`; returns (width, height).

    size: 'W*H' or (width, height); both multiples of 16 and one of `config.sizes`.
    frame_num: 4n+1 (the VAE's temporal stride is 4, plus the first frame).
    sampling_steps: None (the config's) or >= 1.
    shift: None (the config's) or a finite number > 0 (the flow shift divides by it).
    guide_scale: None, a number or (low-noise, high-noise), each finite (negative is allowed).
    seed: None or -1 (random), else 0 .. SEED_MAX.
    """
    try:
        w, h = parse_size(size) if isinstance(size, str) else size
    except ValueError as err:
        raise InputError(str(err)) from None
    sz = f"{w}*{h}"
    if w % 16 or h % 16:
        raise InputError(f"size {sz}: width and height must be multiples of 16")
    if sz not in config.sizes:
        raise InputError(f"size {sz} is not supported by {config.name}; choose from {', '.join(config.sizes)}")
    if frame_num < 1 or (frame_num - 1) % 4:
        raise InputError(f"frame_num must be 4n+1 (e.g. 5, 17, 81), got {frame_num}")
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose {', '.join(map(repr, SOLVERS))}")
    if sampling_steps is not None and sampling_steps < 1:
        raise InputError("{arg} must be >= 1, got {value}", arg=Arg("sampling_steps"), value=sampling_steps)
    if shift is not None and check_finite("shift", shift) <= 0:
        raise InputError("{arg} must be > 0, got {value}", arg=Arg("shift"), value=shift)
    if guide_scale is not None:
        for g in (guide_scale if isinstance(guide_scale, (tuple, list)) else (guide_scale,)):
            check_finite("guide_scale", g)
    check_seed(seed)
    return w, h
