"""Where a worker runs its jobs, as the worker pool sees it: the Executor protocol and what every executor shares.

Why its own module: the pool (worker.py) drives executors, and the Ray executor (cluster.py) reports through the
same names; both import them from here, so neither imports the other's module at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..atomic import write_atomically
from .runner import Hooks

CUDA_MESSAGE = ("The GPU reported an error ({error}); the job failed and its worker is restarting. Submit the job "
                "again; if it fails the same way, check the GPU with `nvidia-smi` and `flexiact-backend doctor`.")


WorkFiles = dict[str, bytes]


class WorkerLost(Exception):
    """The worker's process or machine went away (or stopped answering); its job goes back to the queue."""


class ClusterDown(WorkerLost):
    """Studio mode: the connection to the Ray cluster is down; the job waits in the queue, its attempts not
    counted (the job did nothing wrong), and resumes once the service has reconnected."""


@dataclass(frozen=True)
class RankPlace:
    """One rank's place in a job run by a gang of workers on one node: its rank, the gang's size, and the
    loopback port of the gang's rendezvous (the leader's, rank 0)."""

    rank: int
    world_size: int
    port: int


class Executor(Protocol):
    """Where a worker runs its jobs: in this process (worker.LocalExecutor) or in a Ray actor (cluster.RayExecutor).

    A job on several GPUs is run by a gang: the worker that claimed it leads, and `partners`, idle workers on the
    same node, lend it their devices for the job's length."""

    def load(self) -> dict | None:
        """Load the pipeline (once); returns {node, device, device_name, pid}, or None: not yet, ask again."""
        ...

    def alive(self) -> bool:
        """False once the worker is known to be gone; cheap, never blocks."""
        ...

    def lends_device(self) -> bool:
        """Whether this worker's device joins other workers' gangs (a GPU does; CPU ranks take no worker along)."""
        ...

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks, partners: Sequence[Executor] = ()) -> dict:
        """JobRunner.run wherever the worker lives; the output lands in `out` (take i of a generation in
        `take_path(out, i)`), work files (an extraction's previews too) in `work_dir`. `partners`: the gang's
        other workers, for a job on `params["gpus"]` GPUs."""
        ...


def work_dir(data_dir: Path, action_id: str) -> Path:
    """Where an action's extraction keeps its caches and checkpoints; a retry of the same action resumes here."""
    return Path(data_dir) / "work" / action_id


def read_work(work_dir: Path | None) -> WorkFiles:
    """The finished files of a work folder by relative path (temp files, which start with '.', left out)."""
    if work_dir is None or not work_dir.is_dir():
        return {}
    return {p.relative_to(work_dir).as_posix(): p.read_bytes() for p in sorted(work_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def write_work(work_dir: Path, files: WorkFiles) -> None:
    """Store files sent back by an actor under `work_dir`, each atomically; no path may leave the folder."""
    root = work_dir.resolve()
    for rel, data in files.items():
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root) or dest == root:
            raise ValueError(f"a work file outside the work folder: {rel!r}")
        write_atomically(dest, lambda tmp, data=data: Path(tmp).write_bytes(data))
