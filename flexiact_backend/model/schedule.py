"""Frequency-aware reweighting schedule (FlexiAct paper, arXiv 2505.03730: a bias on video-to-motion attention).

High-noise timesteps shape motion, so video queries get an additive bias `s` on the motion-token keys while
the timestep is high; it decays with a half cosine from 1000*h down to 700 and is off below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import FlexiActError

#: At and below this timestep no bias is applied at all.
BIAS_OFF_TIMESTEP = 700
#: The transition fractions h the formula defines: below 0.7 its "full bias above 1000h" and "none at or below
#: 700" rules contradict each other; above 1.0 no timestep is high.
MIN_TRANSITION, MAX_TRANSITION = BIAS_OFF_TIMESTEP / 1000, 1.0


class BadTransition(FlexiActError):
    """A transition fraction the reweighting formula does not define."""

    code = "bad_transition"


def check_transition(transition: float) -> float:
    """`transition` (h) if the schedule is defined for it, else BadTransition saying which values are."""
    if not MIN_TRANSITION <= transition <= MAX_TRANSITION:
        raise BadTransition(
            f"transition (high_timesteps) {transition:g} is outside {MIN_TRANSITION:g}-{MAX_TRANSITION:g}: the bias "
            f"decays from timestep 1000*h to {BIAS_OFF_TIMESTEP} and is off below, so h under {MIN_TRANSITION:g} "
            f"would put full bias below {BIAS_OFF_TIMESTEP}, where FlexiAct applies none. Give a value from "
            f"{MIN_TRANSITION:g} to {MAX_TRANSITION:g} (default 0.8), or switch reweighting off.")
    return transition


def reweight_at(t: float, first_below: float, scale: float, transition: float) -> float | None:
    """Bias in force at scheduled timestep `t`; `first_below` is t*, the first scheduled timestep below 1000*h."""
    if t <= BIAS_OFF_TIMESTEP:
        return None
    if t > first_below:
        return scale
    start = 1000.0 * transition
    return 0.5 * math.cos(math.pi * (t - start) / (BIAS_OFF_TIMESTEP - start)) + 0.5


def reweight_schedule(timesteps: Sequence[float], scale: float | None = 1.0, transition: float = 0.8) -> list[float | None]:
    """The bias for each of the scheduled `timesteps` (descending), or None where no bias applies.

    `scale=None` switches reweighting off for the whole generation; `transition` is checked either way.
    """
    check_transition(transition)
    if scale is None:
        return [None] * len(timesteps)
    threshold = 1000.0 * transition
    below = [float(t) for t in timesteps if float(t) < threshold]
    first_below = below[0] if below else -math.inf
    return [reweight_at(float(t), first_below, float(scale), transition) for t in timesteps]
