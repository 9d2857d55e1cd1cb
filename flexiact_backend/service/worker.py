"""The job workers: each claims jobs from the SQLite queue and runs them on its own warm generator.

One machine: one thread per compute device, each running its jobs in this process (LocalExecutor). Studio
(`serve --ray`): the same threads, each driving one Ray actor somewhere in the cluster (cluster.RayExecutor).
Either way the scheduling is decided here: generations go ahead of extractions; a running extraction is asked
to pause at its next checkpoint when a generation waits that no idle workers can start, and is re-queued; it
resumes from that checkpoint. A job on N GPUs runs on a gang: its worker and N-1 idle workers of the same node,
reserved when it is claimed; the node's workers are held for it as they come free, so smaller jobs do not keep
overtaking it. A worker that dies mid-job puts the job back in the queue (WorkerLost).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import media
from ..errors import Cancelled, FlexiActError, Paused
from ..model_info import ModelInfo
from ..parallel.launch import max_service_ranks
from .cluster import RayCluster
from .config import ServiceConfig
from .db import Database, GpuRoom
from .executor import CUDA_MESSAGE, ClusterDown, Executor, WorkerLost, work_dir
from .ranks import RankJob, run_job_on_ranks
from .runner import (OOM_MESSAGE, PREVIEWS_DIR, Hooks, JobRunner, is_cuda_failure, resolve_devices,
                     take_path)
from .storage import FileStore

log = logging.getLogger("flexiact.service")

DISK_FULL_MESSAGE = ("The server's disk filled up while this job wrote its files; nothing partial was kept. If the "
                     "server's disk is full, free space on it (or run `flexiact-backend gc`), then submit the job "
                     "again.")
#: The database is written at most this often per job (and always on a phase change or the last step).
PROGRESS_INTERVAL_S = 0.2
#: How often studio mode looks for GPUs that joined the cluster.
GROW_EVERY_S = 2.0
#: How often a running extraction's work folder is looked at for new previews.
PREVIEW_SCAN_S = 1.0

WorkerState = Literal["loading", "idle", "busy", "dead"]


class StepClock:
    """Seconds per step inside a job's step loop only (training, denoising): the time between two reports of the
    loop, summed over its stretches (previews interrupt training), so loading and encoding never count."""

    PHASES = frozenset({"training", "denoising"})

    def __init__(self) -> None:
        self._last: tuple[str, int, float] | None = None
        self._seconds = 0.0
        self._steps = 0

    def observe(self, phase: str, step: int | None, now: float) -> None:
        if phase not in self.PHASES or step is None:
            self._last = None
            return
        last, self._last = self._last, (phase, step, now)
        if last is not None and last[0] == phase and step > last[1]:
            self._seconds += now - last[2]
            self._steps += step - last[1]

    def seconds_per_step(self) -> float | None:
        return self._seconds / self._steps if self._steps else None


class LocalExecutor:
    """A JobRunner in this process, on one local device."""

    def __init__(self, device: str, model_dir: Path, *, checkpoint_every: int, refadapter: Path | None,
                 memory_saving: bool, compile: bool = False) -> None:
        self.device, self.model_dir = device, model_dir
        self.options = {"checkpoint_every": checkpoint_every, "refadapter": refadapter,
                        "memory_saving": memory_saving, "compile": compile}
        self.runner: JobRunner | None = None

    def load(self) -> dict:
        if self.runner is None:  # loaded once: a job's lost rank (WorkerLost) leaves this process's model intact
            self.runner = JobRunner.load(self.model_dir, self.device, **self.options)
        device = torch.device(self.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else self.device
        return {"node": socket.gethostname(), "device": self.device, "device_name": name, "pid": os.getpid()}

    def alive(self) -> bool:
        return True

    def lends_device(self) -> bool:
        return torch.device(self.device).type != "cpu"

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks, partners: Sequence[Executor] = ()) -> dict:
        assert self.runner is not None, "run before load"
        gpus = params.get("gpus", 1)
        if gpus > 1:  # its own ranks, each loading the model for this job; this worker's model waits warm
            ranks: list[torch.device] | int = gpus
            if self.lends_device():  # the gang's devices, this worker's first
                ranks = [torch.device(e.device) for e in (self, *partners)]  # type: ignore[attr-defined]
            return run_job_on_ranks(RankJob(kind, params, inputs, work_dir, out), ranks, self.model_dir,
                                    self.options, hooks)
        return self.runner.run(kind, params, inputs, work_dir, out, hooks)


@dataclass
class Worker:
    """One worker as the service sees it; `health()` is its entry in /v1/health's `workers`."""

    id: str
    executor: Executor
    node: str | None = None
    place: str | None = None  # the node, as Ray (or this machine) names it: a job's gang shares one
    device: str | None = None
    device_name: str | None = None
    pid: int | None = None
    state: WorkerState = "loading"
    job: str | None = None

    def health(self) -> dict:
        return {"id": self.id, "node": self.node, "device": self.device, "pid": self.pid, "state": self.state,
                "job": self.job}


#: Free bytes below which a failed job is put down to the full disk, though its error did not say so.
DISK_FULL_FREE_BYTES = 1024**2


def _disk_full(exc: BaseException, data_dir: Path) -> bool:
    """A full disk, as the OS or SQLite reports it anywhere in the error's chain, or as the disk itself shows.

    Why the last: an encoder writing into a full disk (ffmpeg behind a pipe) fails with no error number.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.OperationalError) and "full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(data_dir).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False


def _ids(worker: Worker, partners: list[Worker]) -> list[str]:
    """The workers a job ran on, its leader first (a job's `result.workers`)."""
    return [worker.id, *(p.id for p in partners)]


class WorkerPool:
    """Owns the workers, their threads, and what the HTTP side needs to know about them."""

    def __init__(self, config: ServiceConfig, db: Database, store: FileStore, model_dir: Path, info: ModelInfo,
                 *, memory_saving: bool = False, refadapter: Path | None = None) -> None:
        self.config, self.db, self.store = config, db, store
        self.model_dir, self.info = model_dir, info
        self.memory_saving, self.refadapter = memory_saving, refadapter
        self.workers: list[Worker] = []
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cluster: RayCluster | None = None

    def start(self) -> None:
        if self.config.ray_address:
            self._cluster = RayCluster(self.config, self.model_dir, refadapter=self.refadapter,
                                       memory_saving=self.memory_saving)
            self._cluster.start()
            self._spawn(self._grow, "flexiact-ray-nodes")
            return
        for device in resolve_devices(self.config.devices):
            self.add_worker(LocalExecutor(device, self.model_dir, checkpoint_every=self.config.checkpoint_every,
                                          refadapter=self.refadapter, memory_saving=self.memory_saving,
                                          compile=self.config.compile))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        if self._cluster is not None:
            self._cluster.shutdown()

    def add_worker(self, executor: Executor) -> Worker:
        worker = Worker(f"worker-{len(self.workers)}", executor)
        self.workers.append(worker)
        self._spawn(lambda: self._run(worker), f"flexiact-{worker.id}")
        return worker

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _grow(self) -> None:
        """Studio mode: give every GPU that joins the cluster an actor, without restarting the service."""
        while not self._stop.is_set():
            try:
                for executor in self._cluster.new_executors(len(self.workers)):  # type: ignore[union-attr]
                    self.add_worker(executor)
            except WorkerLost:  # the cluster is unreachable: its supervisor says so and reconnects
                pass
            except Exception:  # the cluster may be briefly unreachable; the next look may succeed
                log.exception("looking for new Ray nodes failed")
            self._stop.wait(GROW_EVERY_S)

    def wake(self) -> None:
        """Tell idle workers that a job was queued."""
        with self._wake:
            self._wake.notify_all()

    def should_pause_extraction(self, worker: Worker, gang: int) -> bool:
        """True when a generation waits that no node's idle workers can start now, and the extraction running on
        `worker` (with `gang` workers in all) frees enough of its node for it: it yields at this checkpoint."""
        gpus = self.db.queued_generation_gpus()
        if gpus is None:
            return False
        need = gpus if worker.executor.lends_device() else 1
        idle = Counter(w.place for w in self.workers if w.state == "idle")
        if any(count >= need for count in idle.values()):
            return False
        return idle[worker.place] + gang >= need

    def cluster_health(self) -> dict | None:
        """Studio mode: the Ray cluster's connection as /v1/health's `cluster`; None on one machine."""
        return self._cluster.health() if self._cluster is not None else None

    def gpus_refusal(self, gpus: int) -> str | None:
        """Why a job on `gpus` GPUs cannot run here (the limit and what to do), else None. A job's GPUs share
        one node: the Ray pool's limit is its largest node (unknown while the cluster is unreachable: the job
        waits); one machine's is its GPU workers, or without GPUs one CPU rank per core."""
        if gpus == 1:
            return None
        if self._cluster is not None:
            limit, unit = self._cluster.largest_node()
            if limit is None or gpus <= limit:
                return None
            return (f"gpus: {gpus}: a job's GPUs must all be on one node, and the largest node of the Ray cluster "
                    f"has {limit} {unit}; ask for at most {limit}, or add a node with {gpus} GPUs to the cluster.")
        gpu_workers = [d for d in resolve_devices(self.config.devices) if torch.device(d).type == "cuda"]
        limit = len(gpu_workers) or max_service_ranks()
        if gpus <= limit:
            return None
        has = f"{limit} GPUs" if gpu_workers else f"no GPU, so it runs at most {limit} CPU ranks (one per core)"
        return (f"gpus: {gpus}: this server's machine has {has}; ask for at most {limit}, or submit the job to a "
                f"server on a machine with {gpus} GPUs.")

    def queue_note(self) -> str | None:
        """What a client queueing a job should know now (the cluster is unreachable), else None."""
        return self._cluster.note() if self._cluster is not None else None

    def workers_health(self) -> list[dict]:
        return [w.health() for w in self.workers]

    def device_health(self) -> dict:
        """The first loaded worker's device (the one-machine answer; `workers` lists them all)."""
        worker = next((w for w in self.workers if w.device), None)
        if worker is None:
            return {"type": "none", "name": "no worker loaded yet"}
        return {"type": torch.device(worker.device).type, "name": worker.device_name or worker.device}

    # ---- the worker thread -------------------------------------------------------------------
    def _run(self, worker: Worker) -> None:
        while not self._stop.is_set():
            if worker.state in ("loading", "dead"):
                if not self._load(worker):
                    return
                continue
            if not worker.executor.alive():
                log.warning("%s on %s is gone; waiting for it to come back", worker.id, worker.node)
                worker.state = "dead"
                continue
            try:
                claimed = self._next_job(worker)
                if claimed is not None:
                    self._run_job(worker, *claimed)
            except Exception:  # the database could not be written (e.g. a full disk): the worker lives on
                log.exception("%s could not record a job's state; trying again in a second", worker.id)
                self._stop.wait(1.0)

    def _load(self, worker: Worker) -> bool:
        """Load (or reload after a loss) the worker's pipeline; False when it failed for good."""
        try:
            where = worker.executor.load()
        except Exception as exc:  # the server keeps answering and says why in /v1/health
            log.exception("loading the model on %s failed", worker.id)
            self.load_error = f"loading the model on {worker.device or worker.id} failed: {type(exc).__name__}: {exc}"
            worker.state = "dead"
            return False
        if where is None:  # still starting, or restarting after a loss: look again
            return True
        worker.node, worker.device, worker.pid = where["node"], where["device"], where["pid"]
        worker.place = where.get("node_id", where["node"])
        worker.job = None  # a partner lost with its gang's job is free of it
        worker.device_name = where["device_name"]
        worker.state = "idle"
        self.loaded.set()
        log.info("%s ready on %s (%s, pid %s)", worker.id, worker.node, worker.device, worker.pid)
        return True

    def _next_job(self, worker: Worker) -> tuple[dict, list[Worker]] | None:
        """The next job that fits `worker` and the idle workers of its node, and the partners it takes along
        (a job on N GPUs takes N-1 of them, reserved here, under the same lock as every claim)."""
        with self._wake:
            job, idle = None, []
            if worker.state == "idle":  # not while lent to another worker's job
                room = None
                if worker.executor.lends_device():
                    node = [w for w in self.workers if w.place == worker.place and w.state in ("idle", "busy")]
                    idle = [w for w in node if w is not worker and w.state == "idle"]
                    room = GpuRoom(node=len(node), idle=len(idle) + 1)
                job = self.db.claim_next(worker.id, room)
            if job is None:
                self._wake.wait(timeout=1.0)
                return None
            worker.state, worker.job = "busy", job["id"]
            partners = idle[: job["params"].get("gpus", 1) - 1]
            for partner in partners:
                partner.state, partner.job = "busy", job["id"]
            return job, partners

    def _run_job(self, worker: Worker, job: dict, partners: list[Worker]) -> None:
        job_id = job["id"]
        try:
            if job["kind"] == "generate":
                self._generate(worker, job, partners)
            else:
                self._extract(worker, job, partners)
        except WorkerLost as exc:
            worker.state = "dead"
            if isinstance(exc, ClusterDown) or (self._cluster is not None and self._cluster.head_lost()):
                log.warning("%s lost the Ray cluster while running job %s (%s); the job waits in the queue",
                            worker.id, job_id, exc)
                self.db.requeue(job_id, "requeued")  # not the job's fault: its attempts are not counted
            else:
                log.warning("%s lost while running job %s (%s); the job goes back to the queue", worker.id, job_id,
                            exc)
                self.db.requeue_lost(job_id, self.config.max_job_restarts)
            self.wake()
        except Paused:
            self.db.requeue(job_id, "paused")
            self.wake()
        except Cancelled:
            self.db.fail_job(job_id, "cancelled", "cancelled", "cancelled by request")
        except torch.cuda.OutOfMemoryError:
            self.db.fail_job(job_id, "failed", "out_of_memory", OOM_MESSAGE)
            torch.cuda.empty_cache()
        except FlexiActError as exc:
            self.db.fail_job(job_id, "failed", exc.code, str(exc))
        except Exception as exc:  # a bug or an environment problem: the job fails, the worker lives on
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            if _disk_full(exc, self.config.data_dir):
                self.db.fail_job(job_id, "failed", "insufficient_storage", DISK_FULL_MESSAGE)
            elif is_cuda_failure(exc):
                self.db.fail_job(job_id, "failed", "cuda_error", CUDA_MESSAGE.format(error=exc))
            else:
                self.db.fail_job(job_id, "failed", "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            for member in (worker, *partners):
                if member.job == job_id:  # a partner lost meanwhile may be back, busy with a job of its own
                    member.job = None
                    if member.state == "busy":
                        member.state = "idle"
            self.wake()  # the partners are free again
            if job["kind"] == "extract" and job["action"] and self.db.get_action(job["action"]) is None:
                shutil.rmtree(work_dir(self.config.data_dir, job["action"]), ignore_errors=True)

    def _hooks(self, job_id: str, pause: Callable[[], bool], previews: Path | None = None) -> Hooks:
        """A throttled progress writer (phase changes and the final step always recorded), cancel, pause and
        finish; an extraction's new previews in `previews` are stored as they appear."""
        state = {"t": 0.0, "phase": None, "scanned": 0.0}
        clock = StepClock()

        def report(*, phase: str, progress: float, step: int | None, total: int, eta_s: float | None) -> None:
            now = time.monotonic()
            clock.observe(phase, step, now)
            if previews is not None and now - state["scanned"] >= PREVIEW_SCAN_S:
                state["scanned"] = now
                self._collect_previews(job_id, previews)
            if phase == state["phase"] and now - state["t"] < PROGRESS_INTERVAL_S and (step or 0) < total:
                return
            state["t"], state["phase"] = now, phase
            self.db.update_progress(job_id, phase=phase, progress=progress, step=step, eta_s=eta_s,
                                    step_s=clock.seconds_per_step())

        return Hooks(progress=report, cancel=lambda: self.db.cancel_requested(job_id), pause=pause,
                     finish=lambda: self.db.finish_requested(job_id))

    def _store_video(self, path: Path, filename: str) -> tuple[str, dict]:
        """Move a finished mp4 into the file store; returns its id and its measured meta."""
        info = media.probe_video(path)
        sha, rel, size = self.store.adopt(path)
        meta = {"width": info.width, "height": info.height, "fps": info.fps, "duration_s": info.duration_s,
                "frames": info.frames}
        self.db.add_file(sha, "video", size, rel, filename, meta)
        return sha, meta

    def _collect_previews(self, job_id: str, folder: Path) -> None:
        """Store the previews an extraction wrote to `folder` (finished files only: they appear by rename)."""
        for path in sorted(folder.glob("step_*.mp4")):
            step = int(path.stem.removeprefix("step_"))
            sha, _meta = self._store_video(path, f"{job_id}-step{step}.mp4")
            self.db.add_preview(job_id, step, sha)

    def _generate(self, worker: Worker, job: dict, partners: list[Worker]) -> None:
        job_id, p = job["id"], job["params"]
        image_file = self.db.get_file(p["image"])
        if image_file is None:
            raise FlexiActError(f"the image {p['image']} is no longer on the server; upload it again")
        action_path = None
        if p.get("action"):
            action = self.db.get_action(p["action"])
            if action is None or action["status"] != "ready":
                raise FlexiActError(f"the action {p['action']} was deleted or is not ready; choose another")
            action_path = self.store.path(self.store.relpath(action["file"], ".safetensors"))
        out = self.store.tmp_path(".mp4")
        seeds = p.get("seeds") or [p["seed"]]
        try:
            extra = worker.executor.run("generate", p, {"image": self.store.path(image_file["path"]),
                                                        "action": action_path},
                                        None, out, self._hooks(job_id, pause=lambda: False),
                                        [w.executor for w in partners])
            takes = []
            for i, take in enumerate(extra.pop("takes", None) or [{"seed": seeds[0]}]):
                sha, meta = self._store_video(take_path(out, i), f"{job_id}-take{i}.mp4")
                takes.append({**take, "video": sha, "url": f"/v1/jobs/{job_id}/video?take={i}", **meta})
        finally:
            for i in range(len(seeds)):
                take_path(out, i).unlink(missing_ok=True)
        first = {k: v for k, v in takes[0].items() if k not in ("seconds", "batch")}
        self.db.finish_job(job_id, {  # the first take's fields at the top, as before takes existed
            **first, "url": f"/v1/jobs/{job_id}/video", **extra, "takes": takes, "workers": _ids(worker, partners)})

    def _extract(self, worker: Worker, job: dict, partners: list[Worker]) -> None:
        job_id, p = job["id"], job["params"]
        video_file = self.db.get_file(p["video"])
        if video_file is None:
            raise FlexiActError(f"the video {p['video']} is no longer on the server; upload it again")
        wd = work_dir(self.config.data_dir, job["action"])
        wd.mkdir(parents=True, exist_ok=True)
        inputs = {"video": self.store.path(video_file["path"]), "preview_image": None}
        if p.get("preview_image"):
            image_file = self.db.get_file(p["preview_image"])
            if image_file is None:
                raise FlexiActError(f"the preview image {p['preview_image']} is no longer on the server; upload it "
                                    "again or leave preview_image out")
            inputs["preview_image"] = self.store.path(image_file["path"])
        out = self.store.tmp_path(".safetensors")
        previews = wd / "train" / PREVIEWS_DIR
        try:
            done = worker.executor.run("extract", p, inputs, wd / "train", out,
                                       self._hooks(job_id, previews=previews,
                                                   pause=lambda: self.should_pause_extraction(worker, 1 + len(partners))),
                                       [w.executor for w in partners])
            sha, _rel, _size = self.store.adopt(out)
        finally:
            out.unlink(missing_ok=True)
            self._collect_previews(job_id, previews)  # the last ones, also of a paused or failed run
        meta = done["meta"]
        self.db.finish_job(job_id, {"action": job["action"], "file": sha, "final_loss": meta.get("final_loss"),
                                    "resumed_from": done["resumed_from"], "steps_trained": meta["steps_trained"],
                                    "workers": _ids(worker, partners)},
                           action_update={"file": sha, "meta": meta}, step=meta["steps_trained"])
        shutil.rmtree(wd, ignore_errors=True)
