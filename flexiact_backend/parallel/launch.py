"""Start one job's ranks on this machine (torchrun's job, done with `torch.multiprocessing`), bounded in time.

Each rank joins the process group on a fresh loopback port, runs `fn(*args)`, and sends its return value back
(tensors as numpy arrays). A rank that raises or dies ends the whole job: the others are stopped and the error is
raised here, so a lost rank fails the attempt instead of hanging it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as tmp
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException
from torch.utils._pytree import tree_map

from ..errors import FlexiActError
from .util import destroy_distributed, free_port, init_distributed


class RankFailed(FlexiActError):
    """A rank of a multi-rank job raised, died, or the job ran past its time."""

    code = "rank_failed"


class RankLost(RankFailed):
    """A rank died (killed, crashed, out of host memory) or the job hung past its time: the attempt is lost, not
    the request wrong, so a service retries it from its checkpoint."""


def available_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def max_service_ranks() -> int:
    """The most ranks the service runs one job on here: one per GPU, or without GPUs one CPU rank per core
    (over gloo; more would only share the cores). The CLI and tests may oversubscribe CPU ranks on purpose."""
    return available_gpus() or os.cpu_count() or 1


def _plain(value: Any) -> Any:
    """Tensors as numpy (a shared-memory tensor would not outlive the rank that sent it)."""
    return tree_map(lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, value)


def _rank_main(rank: int, devices: list[torch.device] | None, world_size: int, port: int, results: Any,
               fn: Callable[..., Any], args: tuple) -> None:
    device = init_distributed(rank, world_size, port=port, device=devices[rank] if devices else None)
    if device.type == "cpu":  # CPU ranks share the cores instead of each claiming all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        results.put((rank, _plain(fn(device, *args))))
    finally:
        destroy_distributed()


def run_ranks(fn: Callable[..., Any], ranks: int | list[torch.device], args: tuple = (), *,
              timeout_s: float | None = None) -> list[Any]:
    """Run `fn(device, *args)` on `ranks` ranks (a count: cuda:0.. when there are that many GPUs, else CPU ranks
    over gloo; a list: one rank per device named) and return every rank's result, in rank order. `fn` must be
    importable (a module-level function)."""
    devices = list(ranks) if isinstance(ranks, list) else None
    world_size = len(devices) if devices is not None else int(ranks)  # type: ignore[arg-type]
    if world_size < 1:
        raise ValueError(f"a job needs at least one rank, got {world_size}")
    gpus = available_gpus()
    if devices is None and gpus and world_size > gpus:
        raise RankFailed(f"{world_size} ranks asked for but this machine has {gpus} GPUs")
    results = multiprocessing.get_context("spawn").SimpleQueue()
    context = tmp.start_processes(_rank_main, args=(devices, world_size, free_port(), results, fn, args),
                                  nprocs=world_size, join=False, start_method="spawn")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    gathered: dict[int, Any] = {}
    try:
        while True:
            while not results.empty():  # drained while waiting: a rank blocked on a full pipe would never exit
                rank, value = results.get()
                gathered[rank] = value
            if context.join(timeout=0.5):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RankLost(f"the {world_size}-rank job ran past {timeout_s:g} s")
    except ProcessExitedException as e:
        raise RankLost(f"rank {e.error_index} of {world_size} was lost (exit code {e.exit_code}, "
                       f"signal {e.signal_name})") from e
    except ProcessException as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1]  # the error, without the rank's traceback
        raise RankFailed(f"rank {e.error_index} of {world_size} failed: {last}") from e
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(5)
    while len(gathered) < world_size:
        rank, value = results.get()
        gathered[rank] = value
    return [gathered[r] for r in range(world_size)]
