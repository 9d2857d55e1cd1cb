"""One job on several ranks of this machine (local mode, `gpus: N`): the job's JobRunner on every rank.

Why its own module: the ranks are processes (`parallel.launch.run_ranks`), so the job's hooks, which read and
write the service's database, cannot go with them. The leader sends its progress through a queue and every rank
reads the stop wishes (cancel, pause, finish) from events that a thread here keeps in step with the hooks. A rank
that dies loses the attempt (WorkerLost): the job goes back to the queue and resumes from its checkpoint.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import FlexiActError
from ..parallel.extraction import extraction_ranks_for
from ..parallel.launch import RankFailed, RankLost, run_ranks
from ..parallel.sequence_parallel import parallel_generation
from ..parallel.util import leader_flag
from .executor import WorkerLost
from .runner import Hooks, JobRunner

#: How often the stop wishes are read from the hooks and the leader's progress passed on (seconds).
RELAY_S = 0.1


@dataclass(frozen=True)
class RankJob:
    """What every rank needs to run the job (sent to the rank processes, so plain values only)."""

    kind: str
    params: dict
    inputs: dict[str, Path | None]
    work_dir: Path | None
    out: Path


@dataclass(frozen=True)
class RankChannel:
    """The service's side of the hooks, as the ranks see it: a progress queue and three stop wishes."""

    progress: Any  # multiprocessing Queue of the leader's progress keywords
    errors: Any  # multiprocessing Queue of the errors the ranks raised that the service knows how to report
    cancel: Any  # multiprocessing Events
    pause: Any
    finish: Any

    @classmethod
    def create(cls) -> RankChannel:
        ctx = multiprocessing.get_context("spawn")
        return cls(ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event())

    def first_error(self) -> BaseException | None:
        """The first reportable error a rank sent before it ended (it is in the pipe once the rank has exited)."""
        try:
            return self.errors.get(timeout=1.0)
        except queue.Empty:
            return None

    def hooks(self) -> Hooks:
        return Hooks(progress=lambda **kw: self.progress.put(kw), cancel=self.cancel.is_set,
                     pause=self.pause.is_set, finish=self.finish.is_set)

    def relay(self, hooks: Hooks) -> None:
        """Pass the leader's progress on and bring the stop wishes up to date (cancel and finish stay set)."""
        while True:
            try:
                hooks.progress(**self.progress.get_nowait())
            except queue.Empty:
                break
        for event, wish, sticky in ((self.cancel, hooks.cancel, True), (self.finish, hooks.finish, True),
                                    (self.pause, hooks.pause, False)):
            if wish():
                event.set()
            elif not sticky:
                event.clear()


def run_share(runner: JobRunner, job: RankJob, hooks: Hooks) -> dict:
    """This rank's share of `job` on the initialised process group: the leader (rank 0) reports and writes the
    output and returns the result; the others return what their runner returns (nothing written).

    Every rank acts on the leader's stop wishes at the same step, so `hooks` need to be right on the leader only."""
    leader = dist.get_rank() == 0
    gpus = dist.get_world_size()
    if not leader:
        hooks = Hooks(progress=lambda **kw: None, cancel=hooks.cancel, pause=hooks.pause, finish=hooks.finish)
    if job.kind == "generate":
        asked = hooks.cancel  # each rank checks at the same step; all of them act on the leader's answer
        hooks = Hooks(progress=hooks.progress, cancel=lambda: leader_flag(asked()), pause=hooks.pause)
        with parallel_generation(runner.generator.pipe, gpus, job.params["guidance_scale"]):
            return runner.generate(job.params, job.inputs["image"], job.inputs.get("action"),  # type: ignore[arg-type]
                                   job.out, hooks, leader=leader)
    assert job.work_dir is not None, "an extraction needs a work folder"
    return runner.extract(job.params, job.inputs["video"], job.work_dir, job.out, hooks,  # type: ignore[arg-type]
                          preview_image=job.inputs.get("preview_image"),
                          ranks=extraction_ranks_for(gpus, job.params.get("parallel", "sequence")))


def job_on_rank(device: torch.device, job: RankJob, model_dir: Path, options: dict, channel: RankChannel) -> dict:
    """One rank of the job: load the model on this rank's device, run its share; the leader returns the result.

    A FlexiActError (a pause or cancel too) or a GPU out of memory is sent to the service, which raises it as a
    one-GPU job would; the rank raises it too, so that the launcher stops the other ranks at once."""
    runner = JobRunner.load(model_dir, str(device), **options)
    try:
        return run_share(runner, job, channel.hooks())
    except (FlexiActError, torch.cuda.OutOfMemoryError) as exc:
        channel.errors.put(exc)
        raise


def run_job_on_ranks(job: RankJob, devices: list[torch.device] | int, model_dir: Path, options: dict,
                     hooks: Hooks) -> dict:
    """Run `job` on these devices of this machine (an int: that many CPU ranks), each rank loading the model from
    `model_dir` with `options`; its result is the leader's, as a one-rank run returns it."""
    channel = RankChannel.create()
    done = threading.Event()

    def relay() -> None:
        while not done.wait(RELAY_S):
            channel.relay(hooks)

    relay_thread = threading.Thread(target=relay, name="flexiact-rank-relay", daemon=True)
    relay_thread.start()
    try:
        result = run_ranks(job_on_rank, devices, (job, model_dir, options, channel))[0]
    except RankLost as exc:
        raise WorkerLost(str(exc)) from exc
    except RankFailed as exc:
        raise (channel.first_error() or exc) from exc
    finally:
        done.set()
        relay_thread.join()
    channel.relay(hooks)  # the leader's last reports
    return result
