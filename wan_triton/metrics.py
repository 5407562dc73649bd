"""Error and spread measures shared by wan-benchmark and the scripts in bench/."""
from __future__ import annotations

import math
import statistics


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (b is the reference); 0 when both are zero, inf when
    only b is."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def band(values, robust: bool = False) -> tuple[float, float]:
    """The run-to-run band of a list of times: (min, max), or the interquartile range (Q1, Q3)
    when `robust` (per-step times, where one cold first step or one expert swap would dominate
    a min-max range). One value gives (v, v)."""
    values = sorted(values)
    if len(values) < 2 or not robust:
        return values[0], values[-1]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def psnr_uint8(a, b) -> float:
    """PSNR in dB between two uint8 frame stacks (all frames, all channels); inf when identical."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
