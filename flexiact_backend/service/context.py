"""What every route needs (config, database, file store, worker pool) and the domain rules routes share.

Why here and not in the routes: the dedupe key of an extraction, the unit of `high_timesteps` and what a
delete cleans up are rules of the service, not of one HTTP handler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import FileResponse

from ..generation import refadapter_missing_message
from ..model_info import find_refadapter
from ..model.schedule import BadTransition, check_transition
from ..model_info import read_model_info
from ..tiny import ensure_tiny_model
from .admission import UploadSlots
from .auth import client_key
from .config import ServiceConfig
from .db import Database
from .api_errors import APIError, path_redactor
from .schemas import ActionCreate, GenerationCreate
from .retention import collect, tree_bytes
from .storage import FileStore
from .executor import work_dir
from .worker import WorkerPool


log = logging.getLogger("flexiact.service")
#: how often the running service collects garbage (it also does at start)
GC_INTERVAL_S = 3600.0
#: how long the data dir's measured size is reused by /v1/health
USAGE_CACHE_S = 30.0
#: the Retry-After of a 429 for a full queue
QUEUE_RETRY_S = 30


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.0f} MiB"


def _a(noun: str) -> str:
    """The noun with its article: 'a video', 'an image'."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def transition_fraction(high_timesteps: float) -> float:
    """`high_timesteps` is a fraction of 1000 (0.8) or a timestep (800); the generator wants the fraction."""
    return high_timesteps if high_timesteps <= 1 else high_timesteps / 1000


class Service:
    """Everything a request needs: config, database, file store and the worker pool."""

    def __init__(self, config: ServiceConfig, *, memory_saving: bool = False, refadapter: Path | None = None) -> None:
        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        model_dir = ensure_tiny_model(data_dir) if config.tiny else Path(config.model_dir)  # type: ignore[arg-type]
        self.redact = path_redactor([data_dir, model_dir, tempfile.gettempdir(), Path.home()])
        self.db = Database(data_dir / "state.sqlite3", redact=self.redact)
        self.db.recover(config.max_job_restarts)
        self.store = FileStore(data_dir)
        self.info = read_model_info(model_dir)
        self.refadapter = find_refadapter(model_dir, refadapter)
        self.pool = WorkerPool(config, self.db, self.store, model_dir, self.info,
                               memory_saving=memory_saving, refadapter=refadapter)
        self._stop_gc = threading.Event()
        self._gc_thread = threading.Thread(target=self._collect_garbage, name="flexiact-gc", daemon=True)
        self._usage: tuple[float, int] = (0.0, 0)
        limits = config.limits
        #: probing and decoding uploads: off the event loop, at most `media_workers` at once
        self.media_pool = ThreadPoolExecutor(max_workers=limits.media_workers, thread_name_prefix="flexiact-media")
        self.upload_slots = UploadSlots(limits.uploads_per_token, limits.uploads)
        self._queue_lock = threading.Lock()

    def start(self) -> None:
        self.pool.start()
        self._gc_thread.start()

    def stop(self) -> None:
        self._stop_gc.set()
        self.pool.stop()
        self._gc_thread.join(5.0)
        self.media_pool.shutdown(wait=False, cancel_futures=True)
        self.db.close()

    def _collect_garbage(self) -> None:
        """At start and every GC_INTERVAL_S: retention and garbage collection (see retention.py)."""
        while not self._stop_gc.is_set():
            try:
                self.db.ensure_reserve()
                report = collect(Path(self.config.data_dir), self.config.retention)
                if report.freed_bytes or report.jobs:
                    log.info("garbage collection freed %s (%d files, %d work dirs, %d old jobs)",
                             _mib(report.freed_bytes), len(report.files), len(report.dirs), len(report.jobs))
            except Exception:  # never stop the service for it; the next round tries again
                log.exception("garbage collection failed")
            self._stop_gc.wait(GC_INTERVAL_S)

    # ---- disk --------------------------------------------------------------------------------
    def require_free(self, incoming: int = 0) -> None:
        """A 507 unless the data disk keeps `min_free_bytes` after `incoming` more bytes; nothing is written."""
        free = shutil.disk_usage(self.config.data_dir).free
        floor = self.config.min_free_bytes
        if free < incoming + floor:
            raise APIError(507, "insufficient_storage", (
                f"the server's disk has {_mib(free)} free; this needs {_mib(incoming)} plus a reserve of "
                f"{_mib(floor)}. Free space on the server (or run `flexiact-backend gc`) and try again."))

    def disk_health(self) -> dict:
        usage = shutil.disk_usage(self.config.data_dir)
        at, used = self._usage
        if time.monotonic() - at > USAGE_CACHE_S:
            used = tree_bytes(Path(self.config.data_dir))
            self._usage = (time.monotonic(), used)
        return {"free_bytes": usage.free, "total_bytes": usage.total, "data_bytes": used,
                "min_free_bytes": self.config.min_free_bytes, "low": usage.free < self.config.min_free_bytes}

    # ---- lookups -----------------------------------------------------------------------------
    def stored_file(self, file_id: str) -> dict:
        """The upload's record; 404 also when its bytes are gone from disk (an upload of them restores it)."""
        rec = self.db.get_file(file_id)
        if rec is None:
            raise APIError(404, "not_found", f"no uploaded file {file_id}; upload it with POST /v1/files")
        if not self.store.path(rec["path"]).is_file():
            raise APIError(404, "not_found", f"the content of file {file_id} is no longer on the server; upload "
                           "it again with POST /v1/files")
        return rec

    def file_of_kind(self, file_id: str, kind: str) -> dict:
        rec = self.stored_file(file_id)
        if rec["kind"] != kind:
            raise APIError(422, "wrong_file_kind", f"file {file_id} is {_a(rec['kind'])}, not {_a(kind)}")
        return rec

    def job_or_404(self, job_id: str) -> dict:
        job = self.db.get_job(job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id}")
        return job

    def action_or_404(self, action_id: str) -> dict:
        action = self.db.get_action(action_id)
        if action is None:
            raise APIError(404, "not_found", f"no action {action_id}")
        return action

    def action_path(self, action: dict) -> Path:
        return self.store.path(self.store.relpath(action["file"], ".safetensors"))

    def video_response(self, file_id: str, what: str, filename: str) -> FileResponse:
        """A stored mp4 as a download; 410 when its record or bytes are gone."""
        rec = self.db.get_file(file_id)
        if rec is None:
            raise APIError(410, "gone", f"{what} was removed by retention; create it again")
        return FileResponse(self.present(self.store.path(rec["path"]), what), media_type="video/mp4",
                            filename=filename)

    def present(self, path: Path, what: str) -> Path:
        """`path` if its file is on disk, else a 410: the record is known but its bytes were removed."""
        if not path.is_file():
            raise APIError(410, "gone", f"{what} is no longer on the server (removed by retention or by hand); "
                           "create it again")
        return path

    # ---- domain rules ------------------------------------------------------------------------
    def require_gpus(self, gpus: int) -> None:
        """A 422 when no machine of this server runs one job on `gpus` GPUs; nothing is queued."""
        refusal = self.pool.gpus_refusal(gpus)
        if refusal is not None:
            raise APIError(422, "too_many_gpus", refusal)

    def extraction_key(self, body: ActionCreate | dict) -> str:
        """The same name, video, trim, steps, seed, windows per step and caption on the same model is the same
        action (a resent request, on any number of GPUs); under another name it is an action of its own. `body`
        may be a stored action."""
        d = body if isinstance(body, dict) else body.model_dump()
        fields = [self.info.id, d["video"], d["start_s"], d["end_s"], d["steps"], d["seed"], d["caption"], d["name"]]
        if (d.get("windows_per_step") or 1) != 1:  # one window, the only kind before: the keys stored stay valid
            fields.append(d["windows_per_step"])
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def rename_action(self, action_id: str, name: str) -> dict:
        """Rename an action; an extracted one is then found under its new name by a resent request."""
        action = self.action_or_404(action_id)
        key = self.extraction_key({**action, "name": name}) if action["source"] == "extract" else None
        renamed = self.db.rename_action(action_id, name, key)
        if renamed is None:  # deleted meanwhile
            raise APIError(404, "not_found", f"no action {action_id}")
        return renamed

    def _admit_job(self, owner: str) -> None:
        """A 429 with Retry-After when the queue holds its limit of jobs, of this token or in all."""
        cfg = self.config
        retry = {"Retry-After": str(QUEUE_RETRY_S)}
        if self.db.queued_count() >= cfg.limits.queued_jobs:
            raise APIError(429, "queue_full", f"the queue holds {cfg.limits.queued_jobs} jobs (the server's "
                           "limit); submit this one when some have started or been cancelled", headers=retry)
        if self.db.queued_count(owner) >= cfg.limits.queued_jobs_per_token:
            raise APIError(429, "queue_full", f"{cfg.limits.queued_jobs_per_token} of your jobs are waiting in the "
                           "queue (the limit per token); submit this one when some have started or been cancelled",
                           headers=retry)

    def queue_extraction(self, body: ActionCreate, owner: str) -> tuple[dict, dict]:
        """Queue an extraction (or return the existing action for the same request); returns (action, job)."""
        self.require_gpus(body.gpus)
        self.require_free()
        with self._queue_lock:  # the count and the insert together: the caps hold under concurrent requests
            self._admit_job(owner)
            action, job, _created = self.db.create_extraction(
                key=self.extraction_key(body), name=body.name, caption=body.caption, video=body.video,
                start_s=body.start_s, end_s=body.end_s, steps=body.steps, seed=body.seed, base_model=self.info.id,
                params=body.model_dump(), owner=owner)
        self.pool.wake()
        return action, job

    def queue_generation(self, body: GenerationCreate, owner: str) -> dict:
        """Queue a generation; refused (422) when its reweighting transition or RefAdapter weight cannot run."""
        self.require_gpus(body.gpus)
        params = body.model_dump()
        params["transition"] = transition_fraction(body.high_timesteps)
        try:
            check_transition(params["transition"])
        except BadTransition as e:
            raise APIError(422, e.code, str(e)) from None
        if body.lora_weight and self.refadapter is None and not self.info.tiny:
            raise APIError(422, "refadapter_missing", refadapter_missing_message(self.info.id, body.lora_weight))
        self.require_free()
        params["seeds"] = body.take_seeds()
        with self._queue_lock:
            self._admit_job(owner)
            job = self.db.create_generation(params, body.steps * body.takes, body.action, owner)  # every take's steps
        self.pool.wake()
        return job

    def delete_action(self, action_id: str) -> None:
        """Delete an action, its file unless another record names it, and its work dir unless a worker owns it."""
        action = self.db.delete_action(action_id)
        if action is None:
            raise APIError(404, "not_found", f"no action {action_id}")
        if action["file"] and not self.db.file_referenced(action["file"]):
            self.action_path(action).unlink(missing_ok=True)
        job = self.db.get_job(action["job"]) if action["job"] else None
        if job is None or job["status"] != "running":  # a running job's worker removes its work dir itself
            shutil.rmtree(work_dir(self.config.data_dir, action_id), ignore_errors=True)


def get_service(request: Request) -> Service:
    return request.app.state.service


def requester(request: Request) -> str:
    """Whom the request counts against for the per-token limits (see `auth.client_key`)."""
    return client_key(request.headers.get("authorization", ""), request.client.host if request.client else None)


Svc = Annotated[Service, Depends(get_service)]
Requester = Annotated[str, Depends(requester)]
