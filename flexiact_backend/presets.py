"""Extraction step presets: the one table the CLI, the service and (through GET /v1/health) the add-on use.

"standard" is where the authors judged their actions (3,000-4,000 steps, checkpoints every 500). "quick" is an
honest draft at a third of that: two checkpoints in, enough to see whether the reference, its trim and the
caption carry the motion before paying for the standard run; it is not a finished action.
"""

from __future__ import annotations

PRESETS: dict[str, int] = {"quick": 1000, "standard": 3000}
