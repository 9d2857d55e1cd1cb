"""Defaults and presets: the one table the CLI, the service and (through the API) the add-on use.

Generation defaults are FlexiAct's published ones: seed 42, 50 DPM steps, classifier-free guidance 6.0, RefAdapter
weight 0.7, reweighting bias 1.0 until 0.8 of the timesteps. Extraction presets:

"standard" is where the authors judged their actions (3,000-4,000 steps, checkpoints every 500). "quick" is an
honest draft at a third of that: two checkpoints in, enough to see whether the reference, its trim and the
caption carry the motion before paying for the standard run; it is not a finished action.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESETS: dict[str, int] = {"quick": 1000, "standard": 3000}
#: Seconds of one full-size extraction step on one H100 by `bench full --estimate` (FLOPs at 800 TFLOP/s).
ESTIMATED_STEP_S = 1.58
#: Jobs measured in this project took about this many times (time per step x steps): loading, caching the
#: latents, checkpoints, previews and less than full utilisation. Estimates multiply by it.
JOB_OVERHEAD = 2.6


def estimated_job_s(steps: int, step_s: float = ESTIMATED_STEP_S) -> float:
    """An estimate, not a measurement: time per step x steps x JOB_OVERHEAD."""
    return steps * step_s * JOB_OVERHEAD


@dataclass(frozen=True)
class GenerationDefaults:
    seed: int = 42
    steps: int = 50
    guidance_scale: float = 6.0
    lora_weight: float = 0.7
    reweight_scale: float = 1.0
    transition: float = 0.8


GENERATION_DEFAULTS = GenerationDefaults()
