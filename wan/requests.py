"""Checks on a generation request (size, frame count, solver, steps), made before anything runs.

Kept apart from the pipeline so the CLIs can validate a request before any model is built.
"""
from __future__ import annotations

from .configs import T2VConfig, parse_size

SOLVERS = ("unipc", "dpm++")


class InputError(ValueError):
    """Bad user input (size, frame count, solver, ...): reported as one line by the CLI."""


def check_request(config: T2VConfig, size, frame_num: int, solver: str = "unipc",
                  sampling_steps: int | None = None) -> tuple[int, int]:
    """Validate a request against `config`; returns (width, height).

    size: 'W*H' or (width, height); both multiples of 16 and one of `config.sizes`.
    frame_num: 4n+1 (the VAE's temporal stride is 4, plus the first frame).
    sampling_steps: None (the config's) or >= 1.
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
        raise InputError(f"unknown solver {solver!r}; choose 'unipc' or 'dpm++'")
    if sampling_steps is not None and sampling_steps < 1:
        raise InputError(f"sampling_steps must be >= 1, got {sampling_steps}")
    return w, h
