"""Where a worker runs its jobs, as the worker pool sees it: the Executor protocol and what every executor shares.

Why its own module: the pool (worker.py) drives executors, and the Ray executor (cluster.py) reports through the
same names; both import them from here, so neither imports the other's module at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .runner import Hooks

CUDA_MESSAGE = ("The GPU reported an error ({error}); the job failed and its worker is restarting. Submit the job "
                "again; if it fails the same way, check the GPU with `nvidia-smi` and `flexiact-backend doctor`.")


class WorkerLost(Exception):
    """The worker's process or machine went away (or stopped answering); its job goes back to the queue."""


class Executor(Protocol):
    """Where a worker runs its jobs: in this process (worker.LocalExecutor) or in a Ray actor (cluster.RayExecutor)."""

    def load(self) -> dict | None:
        """Load the pipeline (once); returns {node, device, device_name, pid}, or None: not yet, ask again."""
        ...

    def alive(self) -> bool:
        """False once the worker is known to be gone; cheap, never blocks."""
        ...

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks) -> dict:
        """JobRunner.run wherever the worker lives; the output lands in `out` (take i of a generation in
        `take_path(out, i)`), work files (an extraction's previews too) in `work_dir`."""
        ...


def work_dir(data_dir: Path, action_id: str) -> Path:
    """Where an action's extraction keeps its caches and checkpoints; a retry of the same action resumes here."""
    return Path(data_dir) / "work" / action_id
