"""Frequency-aware reweighting schedule (FlexiAct paper, arXiv 2503.05639: a bias on video-to-motion attention).

High-noise timesteps shape motion, so video queries get an additive bias `s` on the motion-token keys while
the timestep is high; it decays with a half cosine from 1000*h down to 700 and is off below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Below this timestep no bias is applied at all.
BIAS_OFF_TIMESTEP = 700


def reweight_at(t: float, first_below: float, scale: float, transition: float) -> float | None:
    """Bias in force at scheduled timestep `t`; `first_below` is t*, the first scheduled timestep below 1000*h."""
    if t > first_below:
        return scale
    if t > BIAS_OFF_TIMESTEP:
        start = 1000.0 * transition
        return 0.5 * math.cos(math.pi * (t - start) / (BIAS_OFF_TIMESTEP - start)) + 0.5
    return None


def reweight_schedule(timesteps: Sequence[float], scale: float | None = 1.0, transition: float = 0.8) -> list[float | None]:
    """The bias for each of the scheduled `timesteps` (descending), or None where no bias applies.

    `scale=None` switches reweighting off for the whole generation.
    """
    if scale is None:
        return [None] * len(timesteps)
    if not 0.0 < transition <= 1.0:
        raise ValueError(f"transition must be in (0, 1], got {transition}")
    threshold = 1000.0 * transition
    below = [float(t) for t in timesteps if float(t) < threshold]
    first_below = below[0] if below else -math.inf
    return [reweight_at(float(t), first_below, float(scale), transition) for t in timesteps]
