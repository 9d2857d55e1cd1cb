"""Backend jobs, one way through: submit → poll → download → import.

HTTP runs off the main thread (see runner.py); bpy is touched only on the main thread. Job records live in
`scene.flexiact.jobs`, so a saved .blend resumes polling when it is opened again and imports each finished
result exactly once. With wait=True (background mode, where timers never fire) a job runs to its end before
`submit` returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from typing import Any, Callable

import bpy
from bpy.app.handlers import persistent

from . import runner
from .client import BackendClient, BackendError
from .connection import CONNECTION
from .importers import import_as_plane, import_preview, import_takes, set_plane_movie
from .preferences import make_client, output_dir, stored_path
from .properties import ACTIVE_STATUSES
from .reference import strips_of
from .results import relocate
from .requests import Request

POLL_S = 0.5
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclasses.dataclass(frozen=True)
class _Watch:
    client: BackendClient
    scene: str
    key: str
    job_id: str
    kind: str
    dest: str


class Poller:
    """Polls the watched jobs in one thread and posts each answer to the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, str], _Watch] = {}
        self._stop: threading.Event | None = None  # the running loop's; None when no loop runs

    def watch(self, watch: _Watch) -> None:
        with self._lock:
            self._watched[(watch.scene, watch.key)] = watch
            if self._stop is not None:
                return
            self._stop = stop = threading.Event()
        runner.spawn(lambda: self._loop(stop), "flexiact-poll")

    def watching(self, scene: str, key: str) -> bool:
        with self._lock:
            return (scene, key) in self._watched

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                watches = list(self._watched.values())
                if not watches:
                    self._stop = None
                    return
            for w in watches:
                if stop.is_set():
                    return
                try:
                    job, videos, preview = fetch(w.client, w.job_id, w.kind, w.dest)
                    CONNECTION.answered()
                except BackendError as exc:
                    if exc.status == 0:  # no answer at all: the panel says the backend is not answering
                        runner.post(lambda exc=exc: CONNECTION.update(None, exc))
                    gone = exc.status == 404
                    runner.post(lambda w=w, message=exc.message, gone=gone: _poll_failed(w, message, gone))
                    if gone:
                        self._unwatch(w)
                    continue
                runner.post(lambda w=w, job=job, videos=videos, preview=preview:
                            _poll_answered(w, job, videos, preview))
                if job.get("status") in TERMINAL:
                    self._unwatch(w)
            stop.wait(POLL_S)

    def watching_any(self) -> bool:
        with self._lock:
            return bool(self._watched)

    def redirect(self, folder: str) -> None:
        """Download the watched jobs' clips into `folder` from now on (the file was saved elsewhere)."""
        with self._lock:
            for key, w in self._watched.items():
                self._watched[key] = dataclasses.replace(w, dest=os.path.join(folder, os.path.basename(w.dest)))

    def _unwatch(self, w: _Watch) -> None:
        with self._lock:
            self._watched.pop((w.scene, w.key), None)

    def stop(self) -> None:
        """Stop polling (unregister, file load): the records stay and polling resumes from them."""
        with self._lock:
            if self._stop is not None:
                self._stop.set()
            self._stop = None
            self._watched.clear()


POLLER = Poller()


def take_path(dest: str, take: int) -> str:
    """Where take `take` of a generation is downloaded (the first take at `dest` itself)."""
    stem, ext = os.path.splitext(dest)
    return dest if take == 0 else f"{stem}_take{take}{ext}"


def preview_path(dest: str, step: int) -> str:
    """Where an extraction's preview from training step `step` is downloaded."""
    stem, ext = os.path.splitext(dest)
    return f"{stem}_step{step}{ext}"


def fetch(client: BackendClient, job_id: str, kind: str,
          dest: str) -> tuple[dict[str, Any], list[str], dict[str, Any] | None]:
    """The job's state; for a finished generation every take's clip, for an extraction its latest preview,
    each downloaded next to `dest` once."""
    job = client.job(job_id)
    videos: list[str] = []
    preview = None
    if kind == "GENERATE" and job.get("status") == "succeeded" and dest:
        for i in range(len((job.get("result") or {}).get("takes") or [None])):
            path = take_path(dest, i)
            videos.append(path if os.path.isfile(path) else client.download_video(job_id, path, take=i))
    if kind == "EXTRACT" and dest and job.get("step"):
        try:
            latest = (client.previews(job_id) or [None])[-1]
            if latest is not None:
                path = preview_path(dest, int(latest["step"]))
                if not os.path.isfile(path):
                    client.download(latest["url"], path)
                preview = {"step": int(latest["step"]), "frames": int(latest.get("frames") or 0), "path": path}
        except BackendError:  # a preview is a look ahead, not the job: the job's own state decides its fate
            preview = None
    return job, videos, preview


# -- main thread -------------------------------------------------------------------------------------

def announce(message: str, problem: bool) -> None:
    """Say it where Blender users look (status bar, Info editor): for work that ends after its operator returned."""
    bpy.ops.flexiact.report(message=message, level="WARNING" if problem else "INFO")


def _announce_end(scene: bpy.types.Scene, record: Any) -> None:
    problem = outcome(scene.name, record.key)
    announce(problem or f"{record.label}: done", bool(problem))


def _poll_answered(w: _Watch, job: dict[str, Any], videos: list[str], preview: dict[str, Any] | None) -> None:
    scene, record = find_record(w.scene, w.key)
    if record is None:
        return
    apply_job(scene, record, job, videos, preview)
    if record.status not in ACTIVE_STATUSES:
        _announce_end(scene, record)


def _poll_failed(w: _Watch, message: str, gone: bool) -> None:
    scene, record = find_record(w.scene, w.key)
    if record is None:
        return
    record.error = message
    if gone:
        record.status = "FAILED"
        _announce_end(scene, record)


def find_record(scene_name: str, key: str) -> tuple[bpy.types.Scene | None, Any]:
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        return None, None
    return scene, next((r for r in scene.flexiact.jobs if r.key == key), None)


def new_record(scene: bpy.types.Scene, kind: str, label: str, params: dict[str, Any],
               model_size: tuple[int, int] = (0, 0)) -> Any:
    """A job record in SUBMITTING state, before the backend has answered."""
    record = scene.flexiact.jobs.add()
    record.key = uuid.uuid4().hex
    record.kind = kind
    record.status = "SUBMITTING"
    record.label = label
    record.params_json = json.dumps(params)
    record.model_width, record.model_height = model_size
    record.frame_start = scene.frame_current
    record.import_mode = scene.flexiact.import_mode
    scene.flexiact.job_index = len(scene.flexiact.jobs) - 1
    return record


def send(client: BackendClient, request: Request) -> dict[str, Any]:
    """Upload the request's file (skipped when the backend has it), then post the request (off the main thread)."""
    return client.post(request.route, request.with_file(client.upload(request.file_path, request.file_fps)["id"]))


def submit(scene: bpy.types.Scene, client: BackendClient, kind: str, request: Request,
           model_size: tuple[int, int], wait: bool) -> str:
    """Upload the request's file, post the request, then follow the job; returns the record's key.

    wait=False returns at once (the runner finishes the work); wait=True returns when the job has ended.
    """
    record = new_record(scene, kind, request.label, request.body, model_size)
    scene_name, key = scene.name, record.key

    def done(answer: dict[str, Any] | None, error: BackendError | None) -> None:
        scene_now, rec = find_record(scene_name, key)
        if rec is None:
            return
        if error is not None:
            rec.status, rec.error = "FAILED", error.message
            scene_now.flexiact.last_error = error.message
            if not wait:
                _announce_end(scene_now, rec)
            return
        action_id = (answer.get("action") or {}).get("id")
        if action_id:
            rec.action_id = action_id
        apply_job(scene_now, rec, answer["job"])
        if answer.get("note") and rec.status == "QUEUED":  # accepted, but it waits: say why, where users look
            rec.note = str(answer["note"])
            announce(f"{rec.label}: {rec.note}", True)
        if not wait and rec.status not in ACTIVE_STATUSES:  # done before (the same extraction): ends now
            _announce_end(scene_now, rec)
        try:
            follow(client, scene_now, rec, wait)
        except BackendError as exc:  # the job goes on on the backend; polling resumes when the file reopens
            rec.error = exc.message
            scene_now.flexiact.last_error = exc.message

    runner.call(lambda: send(client, request), done, wait)
    return key


def outcome(scene_name: str, key: str) -> str:
    """What went wrong with a job that has ended ("" when it succeeded and its result is in)."""
    _scene, record = find_record(scene_name, key)
    if record is None:
        return "The job's record is gone."
    if record.status != "SUCCEEDED":
        return f"{record.label} {record.status.lower()}: {record.error or 'no reason given'}"
    if record.kind == "GENERATE" and not record.imported:
        return record.error or "The result could not be imported."
    return ""


def result_path(record: Any) -> str:
    return os.path.join(output_dir(), f"flexiact_{record.key[:12]}.mp4")


def apply_job(scene: bpy.types.Scene, record: Any, job: dict[str, Any], videos: list[str] | tuple[str, ...] = (),
              preview: dict[str, Any] | None = None) -> None:
    """Copy the backend's job state into the record (its takes, its latest preview); import a finished
    generation that is not imported yet; list the library again when an extraction has made its action."""
    was = record.status
    record.job_id = str(job.get("id", record.job_id))
    record.status = str(job.get("status", "queued")).upper()
    record.phase = str(job.get("phase") or "")
    record.progress = float(job.get("progress") or 0.0)
    eta = job.get("eta_s")
    record.eta_s = float(eta) if eta is not None else -1.0
    record.queue_position = int(job.get("queue_position") or 0)
    record.worker = str(job.get("worker") or "")
    if record.status != "QUEUED":  # the note says why a queued job waits; once it runs or ends, it is past
        record.note = ""
    err = job.get("error")
    record.error = str(err.get("message", err)) if isinstance(err, dict) else (str(err) if err else "")
    if record.status == "FAILED":
        scene.flexiact.last_error = f"{record.label} failed: {record.error}"
    if record.kind == "EXTRACT" and record.status == "SUCCEEDED" and record.action_id:
        scene.flexiact.action_id = record.action_id
        if was != "SUCCEEDED":
            try:
                refresh_library(scene.name, make_client(), bpy.app.background)
            except BackendError as exc:  # the action is made; only its listing waits for the next Refresh
                record.error = exc.message
    if videos:
        record.video_path = stored_path(videos[0])
        if len(record.takes) != len(videos):
            seeds = [t.get("seed", 0) for t in (job.get("result") or {}).get("takes") or [{}]]
            record.takes.clear()
            for seed, path in zip(seeds, videos):
                take = record.takes.add()
                take.seed, take.video_path = int(seed), stored_path(path)
    if preview is not None and preview["step"] > record.preview_step:
        record.preview_step, record.preview_frames = preview["step"], preview["frames"]
        record.preview_path = stored_path(preview["path"])
    if record.kind == "GENERATE" and record.status == "SUCCEEDED" and record.video_path and not record.imported:
        import_record(scene, record)


def fill_library(settings: Any, actions: list[dict[str, Any]]) -> None:
    """Mirror the backend's action library in `settings.actions` (a cancelled extraction is no library entry)."""
    settings.actions.clear()
    for action in actions:
        if action.get("status") == "cancelled":
            continue
        item = settings.actions.add()
        item.name = str(action.get("name", ""))
        item.caption = str(action.get("caption", ""))
        item.action_id = str(action.get("id", ""))
        item.status = str(action.get("status", ""))
        item.progress = 1.0 if item.status == "ready" else 0.0


def refresh_library(scene_name: str, client: BackendClient, wait: bool,
                    refused: Callable[[BackendError], str] = lambda error: error.message) -> str | None:
    """List the backend's actions into the scene's library (now with wait=True, else when the answer comes);
    returns the problem ("" when listed) when it ran now."""

    def done(actions: list[dict[str, Any]] | None, error: BackendError | None) -> str:
        if error is not None:
            return refused(error)
        scene = bpy.data.scenes.get(scene_name)
        if scene is not None:
            fill_library(scene.flexiact, actions or [])
        return ""

    return runner.call(client.list_actions, done, wait)


def _takes(record: Any) -> list[tuple[str, dict[str, Any]]]:
    """(clip, settings) of each take, each with its own seed (one entry for a clip without takes)."""
    params = dict(json.loads(record.params_json or "{}"), job=record.job_id)
    params.pop("takes", None)
    if len(record.takes) < 2:
        return [(record.video_path, params)]
    return [(t.video_path, dict(params, seed=t.seed, take=i)) for i, t in enumerate(record.takes)]


def import_record(scene: bpy.types.Scene, record: Any) -> None:
    """Import a finished generation as the record asks (strip, plane or both), once; several takes become
    strips stacked at the same start, only the chosen one unmuted, and the plane plays the chosen one."""
    takes = _takes(record)
    chosen = min(record.take_index, len(takes) - 1)
    size = (record.model_width or 1, record.model_height or 1)
    try:
        if record.import_mode in {"STRIP", "BOTH"}:
            strips = import_takes(scene, takes, record.frame_start, chosen)
            for take, strip in zip(record.takes if len(takes) > 1 else (), strips):
                take.strip_name = strip.name
            record.strip_name = strips[chosen].name
        if record.import_mode in {"PLANE", "BOTH"}:
            path, params = takes[chosen]
            record.plane_name = import_as_plane(scene, path, record.frame_start, size,
                                                scene.flexiact.plane_fill_camera, params).name
    except (FileNotFoundError, RuntimeError) as exc:
        record.error = f"Import failed: {exc}"
        scene.flexiact.last_error = record.error
        return
    record.imported = True


def choose_take(scene: bpy.types.Scene, record: Any, index: int) -> None:
    """Make take `index` (wrapping around) the chosen one: its strip alone unmuted, the plane playing it."""
    takes = _takes(record)
    record.take_index = index % len(takes)
    strips = strips_of(scene)
    for i, take in enumerate(record.takes):
        strip = strips.get(take.strip_name) if strips is not None and take.strip_name else None
        if strip is not None:
            strip.mute = i != record.take_index
            if i == record.take_index:
                record.strip_name = strip.name
    plane = bpy.data.objects.get(record.plane_name) if record.plane_name else None
    if plane is not None:
        set_plane_movie(plane, *takes[record.take_index])


def import_preview_record(scene: bpy.types.Scene, record: Any) -> bpy.types.Sequence:
    """The extraction's latest preview as a strip at the playhead, on the preview channel."""
    caption = json.loads(record.params_json or "{}").get("caption", "")
    params = {"action": record.action_id, "prompt": caption, "preview_step": record.preview_step,
              "job": record.job_id}
    return import_preview(scene, bpy.path.abspath(record.preview_path), scene.frame_current, params)


def run_blocking(client: BackendClient, scene: bpy.types.Scene, record: Any) -> None:
    """Poll the job to its end on this thread, printing progress, importing the result."""
    last = ""
    dest = result_path(record)
    while record.status in ACTIVE_STATUSES:
        job, videos, preview = fetch(client, record.job_id, record.kind, dest)
        apply_job(scene, record, job, videos, preview)
        line = f"{record.status.lower()} {record.phase} {record.progress * 100:.0f}%"
        if line != last:
            print(f"FlexiAct {record.kind.lower()} {record.job_id[:8]}: {line}", flush=True)
            last = line
        if record.status in ACTIVE_STATUSES:
            time.sleep(POLL_S)


def follow(client: BackendClient, scene: bpy.types.Scene, record: Any, wait: bool) -> None:
    """Track a submitted job: to its end now (wait), else in the polling thread."""
    if record.status not in ACTIVE_STATUSES:
        return
    if wait:
        run_blocking(client, scene, record)
    else:
        POLLER.watch(_Watch(client, scene.name, record.key, record.job_id, record.kind, result_path(record)))


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
            POLLER.watch(_Watch(client_factory(), scene.name, record.key, record.job_id, record.kind,
                                result_path(record)))
            count += 1
    return count


def stop() -> None:
    """Forget the open file's work in flight (its records stay, so polling can resume)."""
    POLLER.stop()
    runner.clear()


@persistent
def on_load_post(*_args: Any) -> None:
    """After opening a .blend, resume polling its jobs (the polling of the previous file stops)."""
    stop()
    try:
        resume(make_client)
    except BackendError as exc:
        for scene in bpy.data.scenes:
            scene.flexiact.last_error = exc.message


@persistent
def on_save_pre(filepath: str = "", *_args: Any) -> None:
    """Before a save: results made while the file was unsaved move beside it, and the add-on's relative paths
    follow a Save As to another folder (Blender rebases only its own)."""
    if filepath:
        relocate(bpy.data.filepath, filepath)


@persistent
def on_save_post(*_args: Any) -> None:
    """After a save: clips of jobs still running download beside the .blend, not to the unsaved folder."""
    if POLLER.watching_any():  # output_dir() makes //flexiact/: only when something will be downloaded there
        POLLER.redirect(output_dir())


def register() -> None:
    bpy.app.handlers.load_post.append(on_load_post)
    bpy.app.handlers.save_pre.append(on_save_pre)
    bpy.app.handlers.save_post.append(on_save_post)


def unregister() -> None:
    if on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(on_load_post)
    if on_save_pre in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(on_save_pre)
    if on_save_post in bpy.app.handlers.save_post:
        bpy.app.handlers.save_post.remove(on_save_post)
    runner.remove_timer()
    stop()
