"""Backend jobs: HTTP in worker threads, bpy only on the main thread (a timer, or inline in background mode).

Job records live in `scene.flexiact.jobs`, so a saved .blend resumes polling when it is opened again and
imports each finished result exactly once.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import bpy
from bpy.app.handlers import persistent

from .client import BackendClient, BackendError
from .importers import import_as_plane, import_as_strip
from .preferences import make_client, output_dir, stored_path
from .properties import ACTIVE_STATUSES

POLL_S = 0.5
TICK_S = 0.2
BUDGET_S = 0.05
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class _Watch:
    client: BackendClient
    scene: str
    key: str
    job_id: str
    kind: str
    dest: str


@dataclass
class _Item:
    """Something for the main thread: a job update, or the result of a background call."""

    scene: str = ""
    key: str = ""
    job: dict[str, Any] | None = None
    video: str = ""
    error: str = ""
    done: Callable[[Any, BackendError | None], None] | None = None
    result: Any = None
    exc: BackendError | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Manager:
    """Runs HTTP off the main thread and queues what comes back for `timer_tick`."""

    def __init__(self) -> None:
        self.items: queue.Queue[_Item] = queue.Queue()
        self.health: dict[str, Any] | None = None
        self.health_error = ""
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, str], _Watch] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._calls = 0

    def busy(self) -> bool:
        with self._lock:
            return bool(self._watched) or self._calls > 0 or not self.items.empty()

    def call(self, fn: Callable[[], Any], done: Callable[[Any, BackendError | None], None]) -> None:
        """Run `fn` in a thread and `done(result, error)` on the main thread; inline in background mode."""
        if bpy.app.background:
            try:
                result = fn()
            except BackendError as exc:
                done(None, exc)
            else:
                done(result, None)
            return

        def worker() -> None:
            try:
                item = _Item(done=done, result=fn())
            except BackendError as exc:
                item = _Item(done=done, exc=exc)
            except Exception as exc:  # a bug must still reach the panel, not die silently in a thread
                item = _Item(done=done, exc=BackendError(f"Unexpected error: {exc!r}", "internal"))
            with self._lock:
                self._calls -= 1
            self.items.put(item)

        with self._lock:
            self._calls += 1
        threading.Thread(target=worker, name="flexiact-call", daemon=True).start()
        ensure_timer()

    def watch(self, watch: _Watch) -> None:
        """Poll a job until it ends (and download a generated clip) in the polling thread."""
        with self._lock:
            self._watched[(watch.scene, watch.key)] = watch
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._poll_loop, name="flexiact-poll", daemon=True)
                self._thread.start()
        ensure_timer()

    def watching(self, scene: str, key: str) -> bool:
        with self._lock:
            return (scene, key) in self._watched

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                watches = list(self._watched.values())
                if not watches:
                    self._thread = None
                    return
            for w in watches:
                if self._stop.is_set():
                    return
                try:
                    job, video = fetch(w.client, w.job_id, w.kind, w.dest)
                except BackendError as exc:
                    gone = exc.status == 404
                    self.items.put(_Item(w.scene, w.key, error=exc.message, extra={"gone": gone}))
                    if gone:
                        self._unwatch(w)
                    continue
                self.items.put(_Item(w.scene, w.key, job=job, video=video))
                if job.get("status") in TERMINAL:
                    self._unwatch(w)
            self._stop.wait(POLL_S)

    def _unwatch(self, w: _Watch) -> None:
        with self._lock:
            self._watched.pop((w.scene, w.key), None)

    def stop(self) -> None:
        """Stop polling (unregister, file load): the records stay and polling resumes from them."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            self._watched.clear()
            self._thread = None
        while not self.items.empty():
            self.items.get_nowait()


MANAGER = Manager()


def fetch(client: BackendClient, job_id: str, kind: str, dest: str) -> tuple[dict[str, Any], str]:
    """The job's state; for a finished generation also its clip, downloaded to `dest` once."""
    job = client.job(job_id)
    video = ""
    if kind == "GENERATE" and job.get("status") == "succeeded" and dest:
        video = dest if os.path.isfile(dest) else client.download_video(job_id, dest)
    return job, video


# -- main thread -------------------------------------------------------------------------------------

def timer_tick() -> float | None:
    """Drain queued updates for at most BUDGET_S; keep ticking while anything is in flight."""
    deadline = time.perf_counter() + BUDGET_S
    while time.perf_counter() < deadline:
        try:
            item = MANAGER.items.get_nowait()
        except queue.Empty:
            break
        _handle(item)
    redraw()
    return TICK_S if MANAGER.busy() else None


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.register(timer_tick, first_interval=TICK_S)


def remove_timer() -> None:
    if bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.unregister(timer_tick)


def redraw() -> None:
    """Ask FlexiAct's sidebars to redraw, so progress moves without the mouse moving."""
    wm = bpy.context.window_manager
    for window in wm.windows if wm else ():
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "SEQUENCE_EDITOR", "PREFERENCES"}:
                area.tag_redraw()


def _handle(item: _Item) -> None:
    if item.done is not None:
        item.done(item.result, item.exc)
        return
    scene, record = find_record(item.scene, item.key)
    if record is None:
        return
    if item.error:
        record.error = item.error
        if item.extra.get("gone"):
            record.status = "FAILED"
        return
    if item.job is not None:
        apply_job(scene, record, item.job, item.video)


def find_record(scene_name: str, key: str) -> tuple[bpy.types.Scene | None, Any]:
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        return None, None
    return scene, next((r for r in scene.flexiact.jobs if r.key == key), None)


def new_record(scene: bpy.types.Scene, kind: str, label: str, params: dict[str, Any]) -> Any:
    """A job record in SUBMITTING state, before the backend has answered."""
    record = scene.flexiact.jobs.add()
    record.key = uuid.uuid4().hex
    record.kind = kind
    record.status = "SUBMITTING"
    record.label = label
    record.params_json = json.dumps(params)
    record.frame_start = scene.frame_current
    record.import_mode = scene.flexiact.import_mode
    scene.flexiact.job_index = len(scene.flexiact.jobs) - 1
    return record


def result_path(record: Any) -> str:
    return os.path.join(output_dir(), f"flexiact_{record.key[:12]}.mp4")


def apply_job(scene: bpy.types.Scene, record: Any, job: dict[str, Any], video: str = "") -> None:
    """Copy the backend's job state into the record; import a finished clip that is not imported yet."""
    record.job_id = str(job.get("id", record.job_id))
    record.status = str(job.get("status", "queued")).upper()
    record.phase = str(job.get("phase") or "")
    record.progress = float(job.get("progress") or 0.0)
    eta = job.get("eta_s")
    record.eta_s = float(eta) if eta is not None else -1.0
    err = job.get("error")
    record.error = str(err.get("message", err)) if isinstance(err, dict) else (str(err) if err else "")
    if record.status == "FAILED":
        scene.flexiact.last_error = f"{record.label} failed: {record.error}"
    if record.kind == "EXTRACT" and record.status == "SUCCEEDED" and record.action_id:
        scene.flexiact.action_id = record.action_id
    if video:
        record.video_path = stored_path(video)
    if record.kind == "GENERATE" and record.status == "SUCCEEDED" and record.video_path and not record.imported:
        import_record(scene, record)


def import_record(scene: bpy.types.Scene, record: Any) -> None:
    """Import a finished clip as the record asks (strip, plane or both), once."""
    params = json.loads(record.params_json or "{}")
    size = (int(params.pop("width", 0) or 1), int(params.pop("height", 0) or 1))
    params["job"] = record.job_id
    try:
        if record.import_mode in {"STRIP", "BOTH"}:
            record.strip_name = import_as_strip(scene, record.video_path, record.frame_start, params).name
        if record.import_mode in {"PLANE", "BOTH"}:
            record.plane_name = import_as_plane(scene, record.video_path, record.frame_start, size,
                                                scene.flexiact.plane_fill_camera, params).name
    except (FileNotFoundError, RuntimeError) as exc:
        record.error = f"Import failed: {exc}"
        scene.flexiact.last_error = record.error
        return
    record.imported = True


def run_blocking(client: BackendClient, scene: bpy.types.Scene, record: Any) -> None:
    """Background mode: poll the job to its end on this thread, printing progress, importing the result."""
    last = ""
    dest = result_path(record)
    while record.status in ACTIVE_STATUSES:
        job, video = fetch(client, record.job_id, record.kind, dest)
        apply_job(scene, record, job, video)
        line = f"{record.status.lower()} {record.phase} {record.progress * 100:.0f}%"
        if line != last:
            print(f"FlexiAct {record.kind.lower()} {record.job_id[:8]}: {line}", flush=True)
            last = line
        if record.status in ACTIVE_STATUSES:
            time.sleep(POLL_S)


def follow(client: BackendClient, scene: bpy.types.Scene, record: Any) -> None:
    """Track a submitted job: to completion now in background mode, else in the polling thread."""
    if record.status not in ACTIVE_STATUSES:
        return
    if bpy.app.background:
        run_blocking(client, scene, record)
    else:
        MANAGER.watch(_Watch(client, scene.name, record.key, record.job_id, record.kind, result_path(record)))


def resume(client_factory: Callable[[], BackendClient]) -> int:
    """Pick up every unfinished or not-yet-imported job of the open file; return how many."""
    count = 0
    for scene in bpy.data.scenes:
        for record in scene.flexiact.jobs:
            pending_import = record.kind == "GENERATE" and record.status == "SUCCEEDED" and not record.imported
            if not record.job_id or not (record.status in ACTIVE_STATUSES or pending_import):
                continue
            if pending_import:
                record.status = "RUNNING"
            MANAGER.watch(_Watch(client_factory(), scene.name, record.key, record.job_id, record.kind,
                                 result_path(record)))
            count += 1
    return count


@persistent
def on_load_post(*_args: Any) -> None:
    """After opening a .blend, resume polling its jobs (the polling of the previous file stops)."""
    MANAGER.stop()
    try:
        resume(make_client)
    except BackendError as exc:
        for scene in bpy.data.scenes:
            scene.flexiact.last_error = exc.message


def register() -> None:
    bpy.app.handlers.load_post.append(on_load_post)


def unregister() -> None:
    if on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(on_load_post)
    remove_timer()
    MANAGER.stop()
