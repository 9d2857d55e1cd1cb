"""Studio mode (`serve --ray ADDRESS`): the service's workers as Ray actors, one per GPU of a Ray cluster.

Why Ray: a studio's GPUs sit on several machines. Ray places one actor per GPU (`num_gpus=1`), restarts an
actor whose process dies, and carries bytes through its object store, so the machines share no filesystem.
The service stays the one front door: its SQLite queue decides which job goes to which actor
(worker.WorkerPool); the inputs go out as bytes, and the output, the checkpoints and the latent cache come
back as bytes, stored here atomically. A job whose actor dies goes back to the queue and resumes elsewhere
from the last checkpoint that reached the service.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError

from ..atomic import write_atomically
from ..errors import Cancelled, FlexiActError, Paused
from ..tiny import ensure_tiny_model
from .config import ServiceConfig
from .runner import OOM_MESSAGE, Hooks, JobRunner, is_cuda_failure, take_path
from .executor import CUDA_MESSAGE, WorkerLost

log = logging.getLogger("flexiact.service")

#: How often the service asks a busy actor for progress and passes on cancel and pause (well under a step).
POLL_S = 0.2
#: An actor that answers nothing for this long is taken for lost: it is restarted, its job requeued.
LOST_AFTER_S = 20.0
#: How long one look at a starting (or restarting) actor waits before the worker thread looks around again.
LOAD_WAIT_S = 2.0
OUTPUT_SUFFIX = {"generate": ".mp4", "extract": ".safetensors"}

WorkFiles = dict[str, bytes]


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


class JobActor:
    """The body of one Ray actor: a JobRunner kept warm; inputs arrive and outputs leave as bytes.

    Threaded (max_concurrency > 1): `poll` answers while `run` computes, which is how progress, checkpoints,
    cancel and pause cross between the service and the job within a step.
    """

    def __init__(self, model_dir: str | None, checkpoint_every: int, refadapter: str | None,
                 memory_saving: bool) -> None:
        self.model_dir, self.checkpoint_every = model_dir, checkpoint_every
        self.refadapter, self.memory_saving = refadapter, memory_saving
        self.scratch = Path(tempfile.mkdtemp(prefix="flexiact-actor-"))
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
        if self.runner is None:
            model_dir = Path(self.model_dir) if self.model_dir else ensure_tiny_model(self.scratch)
            self.runner = JobRunner.load(model_dir, "cuda:0" if gpus else "cpu", checkpoint_every=self.checkpoint_every,
                                         refadapter=Path(self.refadapter) if self.refadapter else None,
                                         memory_saving=self.memory_saving)
        name = torch.cuda.get_device_name(0) if gpus else "cpu"
        return {"node": ray.util.get_node_ip_address(), "device": f"cuda:{gpus[0]}" if gpus else "cpu",
                "device_name": name, "pid": os.getpid()}

    def ping(self) -> bool:
        return True

    def run(self, kind: str, params: dict, inputs: dict[str, tuple[str, bytes] | None], work: WorkFiles) -> dict:
        """Run one job; returns {result, output} or {error}, plus the progress and work files not yet polled."""
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
        try:
            assert self.runner is not None, "run before load"
            result = self.runner.run(kind, params, paths, work_dir if kind == "extract" else None, out, hooks)
            takes = [take_path(out, i).read_bytes() for i in range(1, len(result.get("takes") or ()))]
            answer = {"result": result, "output": out.read_bytes(), "takes": takes}
        except Exception as exc:  # every failure is reported to the service, which decides what it means
            answer = {"error": _describe(exc)}
        try:
            with self._lock:
                return {**answer, **self._drain()}
        finally:
            with self._lock:
                self._work = None
            shutil.rmtree(job_dir, ignore_errors=True)

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


class RemoteJobError(FlexiActError):
    """A job that failed inside an actor, with the actor's code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RayExecutor:
    """The service's side of one actor: ships a job's files out, polls it, stores what comes back."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor
        self._loading: ray.ObjectRef | None = None
        self._ping: tuple[ray.ObjectRef, float] | None = None
        self._lost = False

    def load(self) -> dict | None:
        """The actor's {node, device, device_name, pid} once loaded; None while it starts or restarts."""
        if self._loading is None:
            self._loading = self.actor.load.remote()
        ready, _ = ray.wait([self._loading], timeout=LOAD_WAIT_S)
        if not ready:
            return None
        ref, self._loading = self._loading, None
        try:
            where = ray.get(ref)
        except RayActorError:  # died while loading: Ray restarts it, the next look loads again
            return None
        self._lost, self._ping = False, None
        return where

    def alive(self) -> bool:
        if self._lost:
            return False
        if self._ping is None:
            self._ping = (self.actor.ping.remote(), time.monotonic())
            return True
        ref, sent = self._ping
        if ray.wait([ref], timeout=0)[0]:
            self._ping = None
            try:
                return bool(ray.get(ref))
            except RayActorError:
                return False
        return time.monotonic() - sent < LOST_AFTER_S

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks) -> dict:
        sent = {name: (path.name, path.read_bytes()) if path else None for name, path in inputs.items()}
        call = self.actor.run.remote(kind, params, sent, read_work(work_dir))
        poll: ray.ObjectRef | None = None
        heard = time.monotonic()
        while not ray.wait([call], timeout=POLL_S)[0]:
            if poll is not None and ray.wait([poll], timeout=0)[0]:
                self._apply(self._get(poll), work_dir, hooks)
                poll, heard = None, time.monotonic()
            if poll is None:
                extract = kind == "extract"
                poll = self.actor.poll.remote(hooks.cancel(), extract and hooks.pause(), extract and hooks.finish())
            elif time.monotonic() - heard > LOST_AFTER_S:
                self._restart()
                raise WorkerLost(f"the actor did not answer for {LOST_AFTER_S:.0f} s")
        answer = self._get(call)
        self._apply(answer, work_dir, hooks)
        if "error" in answer:
            raise self._error(answer["error"])
        write_atomically(out, lambda tmp: Path(tmp).write_bytes(answer["output"]))
        for i, data in enumerate(answer.get("takes") or (), start=1):  # a generation's other takes
            write_atomically(take_path(out, i), lambda tmp, data=data: Path(tmp).write_bytes(data))
        return answer["result"]

    def _get(self, ref: ray.ObjectRef) -> dict:
        try:
            return ray.get(ref)
        except RayActorError as exc:
            self._lost = True
            raise WorkerLost(str(exc).strip().splitlines()[0]) from None

    def _apply(self, answer: dict, work_dir: Path | None, hooks: Hooks) -> None:
        """Work files first, then progress: progress never runs ahead of the checkpoints stored here."""
        if work_dir is not None and answer["work"]:
            write_work(work_dir, answer["work"])
        for event in answer["events"]:
            hooks.progress(**event)

    def _error(self, error: dict) -> Exception:
        code, message = error["code"], error["message"]
        if code == "paused":
            return Paused(message)
        if code == "cancelled":
            return Cancelled(message)
        if code == "cuda_error":  # the device's context is unusable: a fresh process, the job fails alone
            self._restart()
        return RemoteJobError(code, message)

    def _restart(self) -> None:
        self._lost = True
        ray.kill(self.actor, no_restart=False)


class RayCluster:
    """The connection to the cluster, and the actors it should have: one per GPU, or N CPU actors."""

    def __init__(self, config: ServiceConfig, model_dir: Path, *, refadapter: Path | None,
                 memory_saving: bool) -> None:
        on_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(address=config.ray_address, namespace="flexiact", logging_level=logging.WARNING)
        if threading.current_thread() is threading.main_thread():  # ray.init took SIGTERM for a bare exit:
            signal.signal(signal.SIGTERM, on_sigterm)  # give it back to uvicorn's graceful shutdown
        self.cpu_workers = config.ray_workers
        self.actor_class = ray.remote(JobActor)
        self.args = (None if config.tiny else str(model_dir), config.checkpoint_every,
                     str(refadapter) if refadapter else None, memory_saving)
        self._warned = False

    def new_executors(self, have: int) -> list[RayExecutor]:
        """Actors for the GPUs (or CPU workers) the cluster has beyond the `have` already started."""
        want = self.cpu_workers if self.cpu_workers is not None else int(ray.cluster_resources().get("GPU", 0))
        if want == 0 and not self._warned:
            log.warning("the Ray cluster has no GPUs yet; workers start when GPU nodes join (or pass "
                        "--ray-workers N for N CPU workers)")
            self._warned = True
        return [self._executor() for _ in range(max(0, want - have))]

    def _executor(self) -> RayExecutor:
        resources = {"num_cpus": 1} if self.cpu_workers is not None else {"num_gpus": 1}
        actor = self.actor_class.options(max_restarts=-1, max_task_retries=0, max_concurrency=4,
                                         scheduling_strategy="SPREAD", **resources).remote(*self.args)
        return RayExecutor(actor)

    def shutdown(self) -> None:
        ray.shutdown()
