"""The body of one Ray actor (studio mode): a JobRunner kept warm; inputs arrive and outputs leave as bytes.

Why bytes: the service machine and the GPU machines share no filesystem. This module runs in the actors and in
the Ray driver process that creates them (ray_driver.py), never in the service process itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import traceback
from pathlib import Path

import ray
import torch

from ..errors import FlexiActError
from ..parallel.util import destroy_distributed, free_port, init_distributed
from ..tiny import ensure_tiny_model
from .executor import CUDA_MESSAGE, RankPlace, WorkFiles, write_work
from .ranks import RankJob, run_share
from .runner import OOM_MESSAGE, Hooks, JobRunner, is_cuda_failure, take_path

log = logging.getLogger("flexiact.service")

OUTPUT_SUFFIX = {"generate": ".mp4", "extract": ".safetensors"}
#: Every actor sees all the GPUs of its node, not only its own (Ray's default would hide the others): the ranks of a
#: gang then reach each other over NVLink/PCIe peer-to-peer, where NCCL would otherwise copy through host memory.
ACTOR_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
#: An actor's scratch folder, `flexiact-actor-PID-*` in the machine's temp dir: named after its process, so the
#: next actor on the machine can tell (and remove) the folder of one that was killed before it could clean up.
SCRATCH_PREFIX = "flexiact-actor-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cuda_index(gpu_id: str | int, visible: str | None) -> int:
    """Torch's index of the GPU Ray gave this actor: its place among the devices the process sees (the node's
    CUDA_VISIBLE_DEVICES, when it was started with one), else Ray's id itself."""
    if visible:
        return [v.strip() for v in visible.split(",")].index(str(gpu_id))
    return int(gpu_id)


def remove_dead_scratch(temp_dir: Path) -> None:
    """Remove the scratch folders of this machine's actors whose process is gone (killed: no cleanup ran)."""
    for path in temp_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid = path.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


class JobActor:
    """The body of one Ray actor: a JobRunner kept warm; inputs arrive and outputs leave as bytes.

    Threaded (max_concurrency > 1): `poll` answers while `run` computes, which is how progress, checkpoints,
    cancel and pause cross between the service and the job within a step.
    """

    def __init__(self, model_dir: str | None, checkpoint_every: int, refadapter: str | None,
                 memory_saving: bool) -> None:
        self.model_dir, self.checkpoint_every = model_dir, checkpoint_every
        self.refadapter, self.memory_saving = refadapter, memory_saving
        remove_dead_scratch(Path(tempfile.gettempdir()))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)  # an actor that ends takes it along
        self.runner: JobRunner | None = None
        self.device = "cpu"
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._work: Path | None = None
        self._sent: dict[str, tuple[int, int]] = {}
        self._cancel = self._pause = self._finish = False

    def load(self) -> dict:
        """Load the pipeline on this actor's GPU (or the CPU); the tiny model is built locally, no files shared."""
        gpus = ray.get_gpu_ids()
        if gpus:
            index = cuda_index(gpus[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
            torch.cuda.set_device(index)  # "cuda" alone means this actor's GPU, not the node's first
            self.device = f"cuda:{index}"
        if self.runner is None:
            model_dir = Path(self.model_dir) if self.model_dir else ensure_tiny_model(self.scratch)
            self.runner = JobRunner.load(model_dir, self.device, checkpoint_every=self.checkpoint_every,
                                         refadapter=Path(self.refadapter) if self.refadapter else None,
                                         memory_saving=self.memory_saving)
        name = torch.cuda.get_device_name(self.device) if gpus else "cpu"
        return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": self.device, "device_name": name, "pid": os.getpid()}

    def ping(self) -> bool:
        return True

    def rendezvous_port(self) -> int:
        """A free loopback port for the process group of a gang this actor leads (its ranks share its node)."""
        return free_port()

    def run(self, kind: str, params: dict, inputs: dict[str, tuple[str, bytes] | None], work: WorkFiles,
            place: RankPlace | None = None) -> dict:
        """Run one job, or with `place` this actor's rank of a gang's job; returns {result, output} (a rank other
        than the leader: {result} alone) or {error}, plus the progress and work files not yet polled."""
        job_dir = self.scratch / "job"
        shutil.rmtree(job_dir, ignore_errors=True)
        paths: dict[str, Path | None] = {}
        for name, item in inputs.items():
            paths[name] = None
            if item is not None:
                paths[name] = job_dir / "in" / name / Path(item[0]).name
                paths[name].parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                paths[name].write_bytes(item[1])  # type: ignore[union-attr]
        work_dir = job_dir / "work"
        work_dir.mkdir(parents=True)
        write_work(work_dir, work)
        with self._lock:
            self._events, self._cancel, self._pause, self._finish = [], False, False, False
            self._work = work_dir
            self._sent = {rel: _signature(work_dir / rel) for rel in work}
        out = job_dir / f"output{OUTPUT_SUFFIX[kind]}"
        hooks = Hooks(progress=self._progress, cancel=lambda: self._cancel, pause=lambda: self._pause,
                      finish=lambda: self._finish)
        job_work = work_dir if kind == "extract" else None
        follower = place is not None and place.rank > 0  # the leader alone writes the output and the work files
        try:
            assert self.runner is not None, "run before load"
            if place is None:
                result = self.runner.run(kind, params, paths, job_work, out, hooks)
            else:
                result = self._run_rank(RankJob(kind, params, paths, job_work, out), hooks, place)
            answer = {"result": result}
            if not follower:
                takes = [take_path(out, i).read_bytes() for i in range(1, len(result.get("takes") or ()))]
                answer.update(output=out.read_bytes(), takes=takes)
        except Exception as exc:  # every failure is reported to the service, which decides what it means
            answer = {"error": _describe(exc)}
        try:
            with self._lock:
                return {**answer, **({"events": [], "work": {}} if follower else self._drain())}
        finally:
            with self._lock:
                self._work = None
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run_rank(self, job: RankJob, hooks: Hooks, place: RankPlace) -> dict:
        """This actor's rank of a gang's job: join the gang's process group (on loopback: one node), run the
        share, leave the group (the next gang forms its own)."""
        assert self.runner is not None, "run before load"
        init_distributed(place.rank, place.world_size, port=place.port, device=torch.device(self.device))
        try:
            return run_share(self.runner, job, hooks)
        finally:
            destroy_distributed()

    def poll(self, cancel: bool, pause: bool, finish: bool = False) -> dict:
        """Take the service's cancel, pause and finish wishes; give back progress events and new work files."""
        with self._lock:
            self._cancel = self._cancel or cancel
            self._pause = pause
            self._finish = self._finish or finish
            return self._drain()

    def _progress(self, **event: object) -> None:
        with self._lock:  # keep one event per phase run: the newest step of a phase replaces the older
            if self._events and self._events[-1]["phase"] == event["phase"]:
                self._events[-1] = event
            else:
                self._events.append(event)

    def _drain(self) -> dict:
        events, self._events = self._events, []
        changed: WorkFiles = {}
        if self._work is not None:
            for path in sorted(self._work.rglob("*")):
                if not path.is_file() or path.name.startswith("."):
                    continue
                rel, sig = path.relative_to(self._work).as_posix(), _signature(path)
                if self._sent.get(rel) != sig:
                    changed[rel], self._sent[rel] = path.read_bytes(), sig
        return {"events": events, "work": changed}


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _describe(exc: Exception) -> dict:
    """An actor-side failure as {code, message} for the service."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"code": "out_of_memory", "message": OOM_MESSAGE}
    if isinstance(exc, FlexiActError):
        return {"code": exc.code, "message": str(exc)}
    log.error("job failed in the actor:\n%s", traceback.format_exc())
    if is_cuda_failure(exc):
        return {"code": "cuda_error", "message": CUDA_MESSAGE.format(error=exc)}
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


