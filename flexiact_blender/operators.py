"""Operators. In background mode each runs to completion (printing progress); otherwise HTTP is threaded."""

from __future__ import annotations

import json
import os
import random
from typing import Any, Callable

import bpy
from bpy.props import StringProperty

from . import jobs
from .capture import CaptureError, capture_target
from .client import BackendClient, BackendError
from .launcher import LAUNCHER
from .preferences import get_prefs, make_client, output_dir, stored_path, user_dir
from .properties import ACTIVE_STATUSES
from .reference import ReferenceError, resolve, scene_fps

HEALTH_TIMEOUT_S = 5.0
LAUNCH_TIMEOUT_S = 120.0


def _fail(op: bpy.types.Operator, context: bpy.types.Context, message: str) -> set[str]:
    """Report a problem in the status bar and keep it in the panel."""
    if context.scene is not None:
        context.scene.flexiact.last_error = message
    op.report({"ERROR"}, message)
    return {"CANCELLED"}


def _clear_error(context: bpy.types.Context) -> None:
    context.scene.flexiact.last_error = ""


def _health_line(health: dict[str, Any]) -> str:
    model = health.get("model", {})
    device = health.get("device", {})
    queue = health.get("queue", {})
    return (f"Connected · {model.get('id', '?')}{' (tiny)' if model.get('tiny') else ''} · "
            f"{device.get('type', '?')} · queue {queue.get('running', 0)} running, {queue.get('queued', 0)} queued")


def _set_health(context: bpy.types.Context, health: dict[str, Any] | None, error: BackendError | None) -> None:
    jobs.MANAGER.health = health
    jobs.MANAGER.health_error = error.message if error else ""
    get_prefs(context).connection_status = _health_line(health) if health else f"Failed: {error.message}"


def _with_health(context: bpy.types.Context, then: Callable[[dict[str, Any]], None],
                 failed: Callable[[str], None]) -> None:
    """Call `then(health)` with the backend's /v1/health (cached once known), or `failed(message)`."""
    if jobs.MANAGER.health is not None:
        then(jobs.MANAGER.health)
        return
    client = make_client(context, timeout=HEALTH_TIMEOUT_S)

    def done(health: dict[str, Any] | None, error: BackendError | None) -> None:
        _set_health(bpy.context, health, error)
        if error is not None:
            failed(error.message)
        else:
            then(health)

    jobs.MANAGER.call(client.health, done)


def _model_size(health: dict[str, Any]) -> tuple[int, int]:
    model = health.get("model", {})
    return int(model.get("width") or 720), int(model.get("height") or 480)


def _selected_record(context: bpy.types.Context, key: str) -> Any:
    settings = context.scene.flexiact
    if key:
        return next((r for r in settings.jobs if r.key == key), None)
    if 0 <= settings.job_index < len(settings.jobs):
        return settings.jobs[settings.job_index]
    return None


class _Submit:
    """Shared by extract and generate: create the record, submit in a thread, then follow the job."""

    def submit(self, context: bpy.types.Context, client: BackendClient, kind: str, label: str,
               params: dict[str, Any], send: Callable[[], dict[str, Any]]) -> set[str]:
        """Interactive: return at once (the panel follows the job). Background: wait, then report."""
        scene = context.scene
        record = jobs.new_record(scene, kind, label, params)
        scene_name, key = scene.name, record.key

        def done(answer: dict[str, Any] | None, error: BackendError | None) -> None:
            scene_now, rec = jobs.find_record(scene_name, key)
            if rec is None:
                return
            if error is not None:
                rec.status = "FAILED"
                rec.error = error.message
                scene_now.flexiact.last_error = error.message
                return
            action = answer.get("action") or {}
            if action.get("id"):
                rec.action_id = action["id"]
            job = answer.get("job")
            if job:
                jobs.apply_job(scene_now, rec, job)
            else:  # the same extraction was done before: the existing action is answered at once
                rec.status = "SUCCEEDED" if action.get("status") == "ready" else "FAILED"
                rec.progress = 1.0
                if rec.status == "SUCCEEDED":
                    scene_now.flexiact.action_id = rec.action_id
            try:
                jobs.follow(client, scene_now, rec)
            except BackendError as exc:
                rec.error = exc.message
                scene_now.flexiact.last_error = exc.message

        jobs.MANAGER.call(send, done)
        if not bpy.app.background:
            return {"FINISHED"}
        _scene, rec = jobs.find_record(scene_name, key)
        if rec.status != "SUCCEEDED":
            return _fail(self, context, f"{label} {rec.status.lower()}: {rec.error or 'no reason given'}")
        if rec.kind == "GENERATE" and not rec.imported:
            return _fail(self, context, rec.error or "The result could not be imported.")
        self.report({"INFO"}, f"{label}: done")
        return {"FINISHED"}


class FLEXIACT_OT_test_connection(bpy.types.Operator):
    """Ask the backend for its health and show the answer"""

    bl_idname = "flexiact.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            client = make_client(context, timeout=HEALTH_TIMEOUT_S)
        except BackendError as exc:
            _set_health(context, None, exc)
            return _fail(self, context, exc.message)
        jobs.MANAGER.health = None
        outcome: dict[str, str] = {}

        def done(health: dict[str, Any] | None, error: BackendError | None) -> None:
            _set_health(bpy.context, health, error)
            outcome["error"] = error.message if error else ""

        jobs.MANAGER.call(client.health, done)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        if jobs.MANAGER.health is not None:
            self.report({"INFO"}, _health_line(jobs.MANAGER.health))
        return {"FINISHED"}


class FLEXIACT_OT_backend_start(bpy.types.Operator):
    """Start the local backend from the command line in the preferences and wait until it answers"""

    bl_idname = "flexiact.backend_start"
    bl_label = "Start"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not LAUNCHER.running()

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = get_prefs(context)
        try:
            client = make_client(context, timeout=HEALTH_TIMEOUT_S)
            LAUNCHER.start(prefs.launcher_command, os.path.join(user_dir(), "backend.log"))
        except BackendError as exc:
            return _fail(self, context, exc.message)
        jobs.MANAGER.health = None
        jobs.MANAGER.call(lambda: LAUNCHER.wait_healthy(client, LAUNCH_TIMEOUT_S),
                          lambda health, error: _set_health(bpy.context, health, error))
        if bpy.app.background and jobs.MANAGER.health is None:
            return _fail(self, context, jobs.MANAGER.health_error)
        return {"FINISHED"}


class FLEXIACT_OT_backend_stop(bpy.types.Operator):
    """Stop the local backend started from Blender"""

    bl_idname = "flexiact.backend_stop"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return LAUNCHER.running()

    def execute(self, context: bpy.types.Context) -> set[str]:
        LAUNCHER.stop()
        jobs.MANAGER.health = None
        get_prefs(context).connection_status = "Local backend stopped"
        return {"FINISHED"}


class FLEXIACT_OT_capture_target(bpy.types.Operator):
    """Render the current frame from the active camera at the model's size, as the target frame"""

    bl_idname = "flexiact.capture_target"
    bl_label = "Capture Target"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if context.scene is None or context.scene.camera is None:
            cls.poll_message_set("The scene needs an active camera")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene_name = context.scene.name
        outcome: dict[str, str] = {}

        def render(health: dict[str, Any]) -> None:
            scene = bpy.data.scenes[scene_name]
            width, height = _model_size(health)
            try:
                path = capture_target(scene, width, height, scene.flexiact.capture_engine, output_dir())
            except CaptureError as exc:
                failed(str(exc))
                return
            image = bpy.data.images.load(path)
            image.name = "FlexiAct Target"
            image.filepath = stored_path(path)
            scene.flexiact.target_image = image
            scene.flexiact.target_source = "CAPTURE"
            scene.flexiact.last_error = ""
            outcome["path"] = path

        def failed(message: str) -> None:
            bpy.data.scenes[scene_name].flexiact.last_error = message
            outcome["error"] = message

        try:
            _with_health(context, render, failed)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        if "path" in outcome:
            self.report({"INFO"}, f"Captured {os.path.basename(outcome['path'])}")
        return {"FINISHED"}


class FLEXIACT_OT_extract_action(_Submit, bpy.types.Operator):
    """Learn the reference clip's motion as a reusable action on the backend (a long job)"""

    bl_idname = "flexiact.extract_action"
    bl_label = "Extract Action"

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.flexiact
        if not settings.caption.strip():
            return _fail(self, context, "Write a caption saying what the reference clip shows.")
        try:
            client = make_client(context)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        scene_name = context.scene.name
        outcome: dict[str, Any] = {}

        def start(health: dict[str, Any]) -> None:
            scene = bpy.data.scenes[scene_name]
            try:
                ref = resolve(scene, *_model_size(health), output_dir())
            except (ReferenceError, CaptureError) as exc:
                failed(str(exc))
                return
            s = scene.flexiact
            name = s.caption.strip()[:60]
            params = {"name": name, "caption": s.caption.strip(), "start_s": round(ref.start_s, 4),
                      "end_s": round(ref.end_s, 4), "steps": s.extract_steps, "seed": s.seed}

            def send() -> dict[str, Any]:
                file_id = client.upload(ref.path)["id"]
                return client.create_action(dict(params, video=file_id))

            _clear_error(bpy.context)
            outcome["result"] = self.submit(bpy.context, client, "EXTRACT", f"Extract '{name}'", params, send)

        def failed(message: str) -> None:
            bpy.data.scenes[scene_name].flexiact.last_error = message
            outcome["error"] = message

        _with_health(context, start, failed)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        return outcome.get("result", {"FINISHED"})


def _target_path(context: bpy.types.Context) -> str:
    """The target frame as a file on disk (an unsaved image datablock is written out first)."""
    settings = context.scene.flexiact
    if settings.target_source == "FILE":
        path = bpy.path.abspath(settings.target_path)
        if not settings.target_path or not os.path.isfile(path):
            raise ReferenceError(f"Target image not found: {settings.target_path or '(none chosen)'}")
        return path
    image = settings.target_image
    if image is None:
        raise ReferenceError("No target frame: capture one or pick an image in the Target panel.")
    path = bpy.path.abspath(image.filepath)
    if image.filepath and os.path.isfile(path) and not image.is_dirty:
        return path
    path = os.path.join(output_dir(), f"target_{bpy.path.clean_name(image.name)}.png")
    image.save_render(filepath=path, scene=context.scene)
    return path


class FLEXIACT_OT_generate(_Submit, bpy.types.Operator):
    """Generate a clip of the target frame performing the action, and import it when done"""

    bl_idname = "flexiact.generate"
    bl_label = "Generate"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if context.scene is None or not context.scene.flexiact.action_id:
            cls.poll_message_set("Extract or pick an action first")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = context.scene.flexiact
        if not s.prompt.strip():
            return _fail(self, context, "Write a prompt describing the generated clip.")
        try:
            image_path = _target_path(context)
            client = make_client(context)
        except (ReferenceError, BackendError) as exc:
            return _fail(self, context, getattr(exc, "message", str(exc)))
        params: dict[str, Any] = {
            "action": s.action_id, "prompt": s.prompt.strip(), "seed": s.seed, "steps": s.steps,
            "guidance_scale": s.guidance, "lora_weight": s.lora_weight, "reweight_scale": s.reweight_scale,
            "high_timesteps": s.transition, "fit": "crop", "fps": round(scene_fps(context.scene), 6)}
        stored = dict(params)
        if jobs.MANAGER.health is not None:
            stored["width"], stored["height"] = _model_size(jobs.MANAGER.health)

        def send() -> dict[str, Any]:
            file_id = client.upload(image_path)["id"]
            return client.create_generation(dict(params, image=file_id))

        _clear_error(context)
        return self.submit(context, client, "GENERATE", f"Generate '{params['prompt'][:40]}'", stored, send)


class FLEXIACT_OT_import_result(bpy.types.Operator):
    """Import a generated clip (the selected job's, or a file) as a strip and/or an image plane"""

    bl_idname = "flexiact.import_result"
    bl_label = "Import Result"

    filepath: StringProperty(subtype="FILE_PATH", description="A clip to import instead of a job's result")
    key: StringProperty(description="The job whose result to import (default: the selected one)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        if self.filepath:
            path = bpy.path.abspath(self.filepath)
            if not os.path.isfile(path):
                return _fail(self, context, f"Clip not found: {self.filepath}")
            record = jobs.new_record(scene, "GENERATE", f"Import {os.path.basename(path)}", {"source": path})
            record.status = "SUCCEEDED"
            record.progress = 1.0
            record.video_path = stored_path(path)
        else:
            record = _selected_record(context, self.key)
            if record is None or not record.video_path:
                return _fail(self, context, "No finished generation selected to import.")
            record.import_mode = scene.flexiact.import_mode
        jobs.import_record(scene, record)
        if not record.imported:
            return _fail(self, context, record.error)
        self.report({"INFO"}, f"Imported {record.strip_name or record.plane_name}")
        return {"FINISHED"}


class FLEXIACT_OT_cancel_job(bpy.types.Operator):
    """Cancel a queued or running job on the backend"""

    bl_idname = "flexiact.cancel_job"
    bl_label = "Cancel Job"

    key: StringProperty(description="The job to cancel (default: the selected one)")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if context.scene is None or not any(r.status in ACTIVE_STATUSES and r.job_id
                                            for r in context.scene.flexiact.jobs):
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _selected_record(context, self.key)
        if record is None or not record.job_id or record.status not in ACTIVE_STATUSES:
            return _fail(self, context, "Select a queued or running job to cancel.")
        try:
            client = make_client(context)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        scene_name, key, job_id = context.scene.name, record.key, record.job_id
        outcome: dict[str, str] = {}

        def done(job: dict[str, Any] | None, error: BackendError | None) -> None:
            scene, rec = jobs.find_record(scene_name, key)
            if rec is None:
                return
            if error is not None:
                scene.flexiact.last_error = outcome["error"] = error.message
            else:
                jobs.apply_job(scene, rec, job)

        jobs.MANAGER.call(lambda: client.cancel(job_id), done)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        return {"FINISHED"}


class FLEXIACT_OT_refresh_actions(bpy.types.Operator):
    """List the backend's action library"""

    bl_idname = "flexiact.refresh_actions"
    bl_label = "Refresh Actions"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            client = make_client(context)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        scene_name = context.scene.name
        outcome: dict[str, str] = {}

        def done(actions: list[dict[str, Any]] | None, error: BackendError | None) -> None:
            settings = bpy.data.scenes[scene_name].flexiact
            if error is not None:
                settings.last_error = outcome["error"] = error.message
                return
            settings.actions.clear()
            for action in actions:
                item = settings.actions.add()
                item.name = str(action.get("name", ""))
                item.action_id = str(action.get("id", ""))
                item.status = str(action.get("status", ""))
                item.progress = 1.0 if item.status == "ready" else 0.0

        jobs.MANAGER.call(client.list_actions, done)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        return {"FINISHED"}


class FLEXIACT_OT_import_action_file(bpy.types.Operator):
    """Upload a published action (.pt or safetensors) to the backend's library"""

    bl_idname = "flexiact.import_action_file"
    bl_label = "Import Action File"

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.flexiact
        path = bpy.path.abspath(settings.action_file)
        if not settings.action_file or not os.path.isfile(path):
            return _fail(self, context, f"Action file not found: {settings.action_file or '(none chosen)'}")
        try:
            client = make_client(context)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        scene_name = context.scene.name
        name = os.path.splitext(os.path.basename(path))[0]
        caption = settings.caption.strip() or name
        outcome: dict[str, str] = {}

        def send() -> dict[str, Any]:
            file_id = client.upload(path)["id"]
            return client.import_action({"name": name, "caption": caption, "file": file_id})

        def done(action: dict[str, Any] | None, error: BackendError | None) -> None:
            s = bpy.data.scenes[scene_name].flexiact
            if error is not None:
                s.last_error = outcome["error"] = error.message
            else:
                s.action_id = str(action.get("id", ""))

        jobs.MANAGER.call(send, done)
        if outcome.get("error"):
            return _fail(self, context, outcome["error"])
        return {"FINISHED"}


class FLEXIACT_OT_randomize_seed(bpy.types.Operator):
    """Pick a new random seed"""

    bl_idname = "flexiact.randomize_seed"
    bl_label = "Randomize Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        context.scene.flexiact.seed = random.randint(0, 2**31 - 1)
        return {"FINISHED"}


class FLEXIACT_OT_copy_report(bpy.types.Operator):
    """Copy the selected job's details to the clipboard, for a bug report"""

    bl_idname = "flexiact.copy_report"
    bl_label = "Copy Report"

    key: StringProperty()

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _selected_record(context, self.key)
        if record is None:
            return _fail(self, context, "Select a job first.")
        report = {"job": record.job_id, "kind": record.kind, "status": record.status, "phase": record.phase,
                  "error": record.error, "params": json.loads(record.params_json or "{}"),
                  "backend": get_prefs(context).backend_url, "blender": bpy.app.version_string}
        context.window_manager.clipboard = json.dumps(report, indent=2)
        self.report({"INFO"}, "Job report copied to the clipboard")
        return {"FINISHED"}


CLASSES = (FLEXIACT_OT_test_connection, FLEXIACT_OT_backend_start, FLEXIACT_OT_backend_stop,
           FLEXIACT_OT_capture_target, FLEXIACT_OT_extract_action, FLEXIACT_OT_generate,
           FLEXIACT_OT_import_result, FLEXIACT_OT_cancel_job, FLEXIACT_OT_refresh_actions,
           FLEXIACT_OT_import_action_file, FLEXIACT_OT_randomize_seed, FLEXIACT_OT_copy_report)
