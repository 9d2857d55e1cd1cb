"""Operators: they check their inputs and hand the work to jobs.submit (or the runner, for one call).

`wait` is True in background mode, where timers never fire: the work runs to its end before execute returns.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Callable

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import jobs, requests, runner
from .capture import CaptureError, capture_target
from .client import BackendError, port_taken, url_port
from .connection import CONNECTION, HEALTH_TIMEOUT_S, check, with_health
from .importers import already_imported, stored_params
from .launcher import LAUNCHER
from .preferences import NO_CLI, get_prefs, make_client, output_dir, start_command, stored_path, user_dir
from .properties import ACTIVE_STATUSES
from .reference import ReferenceError, resolve, scene_fps

LAUNCH_TIMEOUT_S = 120.0
#: How long Start waits for whatever holds the Backend URL's port to say it is a FlexiAct backend.
PORT_PROBE_S = 2.0


def _wait() -> bool:
    """Background mode has no event loop: work must finish before the operator returns."""
    return bpy.app.background


def _fail(op: bpy.types.Operator, context: bpy.types.Context, message: str) -> set[str]:
    """Report a problem in the status bar and keep it in the panel."""
    if context.scene is not None:
        context.scene.flexiact.last_error = message
    op.report({"ERROR"}, message)
    return {"CANCELLED"}


def _answer(op: bpy.types.Operator, context: bpy.types.Context, problem: str | None, success: str = "") -> set[str]:
    """The operator's return for work that ran now (a problem or a success) or goes on (None)."""
    if problem:
        return _fail(op, context, problem)
    if problem is not None and success:
        op.report({"INFO"}, success)
    return {"FINISHED"}


def _later(scene_name: str) -> Callable[[str], None]:
    """Where a problem found after the operator returned goes: the scene's panel."""

    def failed(message: str) -> None:
        scene = bpy.data.scenes.get(scene_name)
        if scene is not None:
            scene.flexiact.last_error = message
        jobs.announce(message, problem=True)

    return failed


def _refused(scene_name: str, error: BackendError) -> str:
    """A refusal that came back: to the panel when the operator has returned already; to the operator too."""
    if not _wait():
        _later(scene_name)(error.message)
    return error.message


def _connected(health: dict[str, Any] | None, error: BackendError | None) -> str:
    """Keep a health answer; return the problem ("" when connected)."""
    CONNECTION.update(health, error)
    return error.message if error is not None else ""


def _selected_record(context: bpy.types.Context, key: str) -> Any:
    settings = context.scene.flexiact
    if key:
        return next((r for r in settings.jobs if r.key == key), None)
    if 0 <= settings.job_index < len(settings.jobs):
        return settings.jobs[settings.job_index]
    return None


def _submit(context: bpy.types.Context, client: Any, kind: str, request: requests.Request) -> str | None:
    """Submit a job; when it ran to its end (background mode) say what went wrong ("": nothing), else None."""
    scene = context.scene
    scene.flexiact.last_error = ""
    key = jobs.submit(scene, client, kind, request, CONNECTION.model_size(), _wait())
    return jobs.outcome(scene.name, key) if _wait() else None


class FLEXIACT_OT_test_connection(bpy.types.Operator):
    """Ask the backend for its health and show the answer"""

    bl_idname = "flexiact.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            client = make_client(context, timeout=HEALTH_TIMEOUT_S)
        except BackendError as exc:
            CONNECTION.update(None, exc)
            return _fail(self, context, exc.message)
        CONNECTION.forget()
        problem = runner.call(lambda: check(client), _connected, _wait())
        return _answer(self, context, problem, CONNECTION.summary)


class FLEXIACT_OT_backend_start(bpy.types.Operator):
    """Start the local backend from the command line in the preferences and wait until it answers"""

    bl_idname = "flexiact.backend_start"
    bl_label = "Start"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not LAUNCHER.running()

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = get_prefs(context)
        command = start_command()
        if not command:
            return _fail(self, context, NO_CLI)
        try:
            client = make_client(context, timeout=HEALTH_TIMEOUT_S)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        if port_taken(prefs.backend_url):  # at once, not when the new process gives up
            try:
                CONNECTION.update(make_client(context, timeout=PORT_PROBE_S).health())
            except BackendError:
                return _fail(self, context, f"Port {url_port(prefs.backend_url)} is in use by another program: "
                                            "choose another port in the Backend URL (Start serves on its port).")
            self.report({"INFO"}, f"A backend already answers at {client.url}: {CONNECTION.summary}")
            return {"FINISHED"}
        try:
            LAUNCHER.start(command, os.path.join(user_dir(), "backend.log"))
        except BackendError as exc:
            return _fail(self, context, exc.message)
        CONNECTION.forget()
        problem = runner.call(lambda: LAUNCHER.wait_healthy(client, LAUNCH_TIMEOUT_S), _connected, _wait())
        return _answer(self, context, problem, CONNECTION.summary)


class FLEXIACT_OT_backend_stop(bpy.types.Operator):
    """Stop the local backend started from Blender"""

    bl_idname = "flexiact.backend_stop"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return LAUNCHER.running()

    def execute(self, context: bpy.types.Context) -> set[str]:
        LAUNCHER.stop()
        CONNECTION.forget()
        self.report({"INFO"}, "Local backend stopped")
        return {"FINISHED"}


class FLEXIACT_OT_capture_target(bpy.types.Operator):
    """Render the current frame from the active camera at the model's size, as the target frame"""

    bl_idname = "flexiact.capture_target"
    bl_label = "Capture Target"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if context.scene is None or context.scene.camera is None:
            cls.poll_message_set("The scene needs an active camera")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene_name = context.scene.name

        def render(_health: dict[str, Any]) -> str:
            scene = bpy.data.scenes[scene_name]
            try:
                path = capture_target(scene, *CONNECTION.model_size(), scene.flexiact.capture_engine, output_dir())
            except CaptureError as exc:
                return str(exc)
            image = bpy.data.images.load(path)
            image.name = "FlexiAct Target"
            image.filepath = stored_path(path)
            scene.flexiact.target_image = image
            scene.flexiact.target_source = "CAPTURE"
            scene.flexiact.last_error = ""
            return ""

        try:
            problem = with_health(make_client(context, timeout=HEALTH_TIMEOUT_S), render, _wait(), _later(scene_name))
        except BackendError as exc:
            return _fail(self, context, exc.message)
        return _answer(self, context, problem, "Captured the target frame")


class FLEXIACT_OT_extract_action(bpy.types.Operator):
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

        def start(_health: dict[str, Any]) -> str | None:
            scene = bpy.data.scenes[scene_name]
            try:
                ref = resolve(scene, *CONNECTION.model_size(), output_dir())
            except (ReferenceError, CaptureError) as exc:
                return str(exc)
            request = requests.extraction(scene.flexiact, ref.path, ref.start_s, ref.end_s, ref.fps)
            return _submit(bpy.context, client, "EXTRACT", request)

        problem = with_health(client, start, _wait(), _later(scene_name))
        return _answer(self, context, problem, "Extraction done")


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


class FLEXIACT_OT_generate(bpy.types.Operator):
    """Generate a clip of the target frame performing the action, and import it when done"""

    bl_idname = "flexiact.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

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
        request = requests.generation(s, image_path, scene_fps(context.scene))
        return _answer(self, context, _submit(context, client, "GENERATE", request), "Generation done")


class FLEXIACT_OT_import_result(bpy.types.Operator):
    """Import a generated clip (the selected job's, or a file) as a strip and/or an image plane"""

    bl_idname = "flexiact.import_result"
    bl_label = "Import Result"
    bl_options = {"REGISTER", "UNDO"}

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
        earlier = already_imported(scene, record.video_path)
        jobs.import_record(scene, record)
        if not record.imported:
            return _fail(self, context, record.error)
        name = record.strip_name or record.plane_name
        if earlier:
            self.report({"WARNING"}, f"Imported {name} again: the clip was already in the scene as '{earlier}'")
        else:
            self.report({"INFO"}, f"Imported {name}")
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

        def done(answer: dict[str, Any] | None, error: BackendError | None) -> str:
            scene, rec = jobs.find_record(scene_name, key)
            if error is not None:
                return _refused(scene_name, error)
            if rec is not None:
                jobs.apply_job(scene, rec, answer["job"])
            return ""

        return _answer(self, context, runner.call(lambda: client.cancel(job_id), done, _wait()))


def _running_extraction(context: bpy.types.Context, key: str) -> Any:
    record = _selected_record(context, key)
    return record if record is not None and record.kind == "EXTRACT" and record.job_id else None


class FLEXIACT_OT_finish_job(bpy.types.Operator):
    """Stop the extraction at its next step and keep the action as it is now (ready to generate with)"""

    bl_idname = "flexiact.finish_job"
    bl_label = "Finish Now"

    key: StringProperty(description="The extraction to finish (default: the selected job)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _running_extraction(context, self.key)
        if record is None or record.status not in ACTIVE_STATUSES:
            return _fail(self, context, "Select a running extraction to finish.")
        try:
            client = make_client(context)
        except BackendError as exc:
            return _fail(self, context, exc.message)
        scene_name, key, job_id = context.scene.name, record.key, record.job_id

        def done(answer: dict[str, Any] | None, error: BackendError | None) -> str:
            if error is not None:
                return _refused(scene_name, error)
            scene, rec = jobs.find_record(scene_name, key)
            if rec is not None:
                rec.finish_requested = True
                jobs.apply_job(scene, rec, answer["job"])
            return ""

        return _answer(self, context, runner.call(lambda: client.finish(job_id), done, _wait()),
                       "The extraction finishes at its next step")


class FLEXIACT_OT_import_preview(bpy.types.Operator):
    """Put the extraction's latest preview in the Sequencer at the playhead, on the preview channel"""

    bl_idname = "flexiact.import_preview"
    bl_label = "Import Preview"
    bl_options = {"REGISTER", "UNDO"}

    key: StringProperty(description="The extraction whose preview to import (default: the selected job)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _running_extraction(context, self.key)
        if record is None or not record.preview_path:
            return _fail(self, context, "No preview yet: the extraction renders one every Preview Every steps.")
        try:
            strip = jobs.import_preview_record(context.scene, record)
        except (FileNotFoundError, RuntimeError) as exc:
            return _fail(self, context, f"Import failed: {exc}")
        self.report({"INFO"}, f"Imported the preview from step {record.preview_step} as {strip.name}")
        return {"FINISHED"}


class FLEXIACT_OT_switch_take(bpy.types.Operator):
    """Choose another take of the generation: its strip is unmuted (the others muted) and the plane plays it"""

    bl_idname = "flexiact.switch_take"
    bl_label = "Switch Take"
    bl_options = {"REGISTER", "UNDO"}

    key: StringProperty(description="The generation (default: the selected job)")
    offset: IntProperty(default=1, description="How many takes to move by (-1: previous, 1: next)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _selected_record(context, self.key)
        if record is None or len(record.takes) < 2 or not record.imported:
            return _fail(self, context, "Select an imported generation with several takes.")
        try:
            jobs.choose_take(context.scene, record, record.take_index + self.offset)
        except (FileNotFoundError, RuntimeError) as exc:
            return _fail(self, context, f"Switching takes failed: {exc}")
        take = record.takes[record.take_index]
        self.report({"INFO"}, f"Take {record.take_index + 1} of {len(record.takes)} (seed {take.seed})")
        return {"FINISHED"}


def settings_source(context: bpy.types.Context) -> Any:
    """The imported strip or object whose settings Use These Settings reads: the Sequencer's active strip,
    else the active object, if it carries a FlexiAct generation's settings."""
    editor = context.scene.sequence_editor if context.scene else None
    for item in (editor.active_strip if editor else None, context.active_object):
        if item is not None and set(requests.GENERATION_SETTINGS) & set(stored_params(item)):
            return item
    return None


class FLEXIACT_OT_use_settings(bpy.types.Operator):
    """Fill the Generate panel from the selected FlexiAct strip or plane (prompt, seed, action, steps, guidance,
    weights), e.g. to re-run a good take at more steps"""

    bl_idname = "flexiact.use_settings"
    bl_label = "Use These Settings"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if settings_source(context) is None:
            cls.poll_message_set("Select a strip or plane that FlexiAct imported")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        source = settings_source(context)
        if source is None:
            return _fail(self, context, "Select a strip or plane that FlexiAct imported.")
        used = requests.apply_settings(context.scene.flexiact, stored_params(source))
        self.report({"INFO"}, f"Settings of {source.name}: {', '.join(used)}")
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

        def refused(error: BackendError) -> str:
            return _refused(scene_name, error)

        return _answer(self, context, jobs.refresh_library(scene_name, client, _wait(), refused))


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
        request = requests.action_import(path, name, settings.caption.strip() or name)

        def done(action: dict[str, Any] | None, error: BackendError | None) -> str:
            if error is not None:
                return _refused(scene_name, error)
            bpy.data.scenes[scene_name].flexiact.action_id = str(action.get("id", ""))
            return ""

        return _answer(self, context, runner.call(lambda: jobs.send(client, request), done, _wait()))


def _library_call(op: bpy.types.Operator, context: bpy.types.Context, call: Callable[[Any], Any],
                  then: Callable[[bpy.types.PropertyGroup], None]) -> set[str]:
    """One call on the action library, then `then(settings)` to mirror it in the listed library."""
    try:
        client = make_client(context)
    except BackendError as exc:
        return _fail(op, context, exc.message)
    scene_name = context.scene.name

    def done(_answer: Any, error: BackendError | None) -> str:
        if error is not None:
            return _refused(scene_name, error)
        then(bpy.data.scenes[scene_name].flexiact)
        return ""

    return _answer(op, context, runner.call(lambda: call(client), done, _wait()))


def _library_item(context: bpy.types.Context, action_id: str) -> Any:
    settings = context.scene.flexiact
    action_id = action_id or (settings.actions[settings.action_index].action_id
                              if 0 <= settings.action_index < len(settings.actions) else "")
    return next((a for a in settings.actions if a.action_id == action_id), None)


class FLEXIACT_OT_rename_action(bpy.types.Operator):
    """Give an action of the backend's library a new name"""

    bl_idname = "flexiact.rename_action"
    bl_label = "Rename Action"

    action_id: StringProperty(name="Action", description="The action to rename (default: the selected one)")
    name: StringProperty(name="Name", description="The action's new name")

    def invoke(self, context: bpy.types.Context, _event: bpy.types.Event) -> set[str]:
        item = _library_item(context, self.action_id)
        if item is None:
            return _fail(self, context, "Select an action of the library first.")
        self.action_id, self.name = item.action_id, item.name
        return context.window_manager.invoke_props_dialog(self)

    def execute(self, context: bpy.types.Context) -> set[str]:
        item = _library_item(context, self.action_id)
        name = self.name.strip()
        if item is None or not name:
            return _fail(self, context, "Select an action and give it a name.")
        action_id = item.action_id

        def renamed(settings: bpy.types.PropertyGroup) -> None:
            for entry in settings.actions:
                if entry.action_id == action_id:
                    entry.name = name

        return _library_call(self, context, lambda client: client.rename_action(action_id, name), renamed)


class FLEXIACT_OT_delete_action(bpy.types.Operator):
    """Delete an action from the backend's library (its file too; a running extraction of it is cancelled)"""

    bl_idname = "flexiact.delete_action"
    bl_label = "Delete Action"

    action_id: StringProperty(name="Action", description="The action to delete (default: the selected one)")

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context: bpy.types.Context) -> set[str]:
        item = _library_item(context, self.action_id)
        if item is None:
            return _fail(self, context, "Select an action of the library first.")
        action_id = item.action_id

        def deleted(settings: bpy.types.PropertyGroup) -> None:
            index = next((i for i, a in enumerate(settings.actions) if a.action_id == action_id), -1)
            if index >= 0:
                settings.actions.remove(index)
            if settings.action_id == action_id:
                settings.action_id = ""

        return _library_call(self, context, lambda client: client.delete_action(action_id), deleted)


class FLEXIACT_OT_clear_finished_jobs(bpy.types.Operator):
    """Remove the finished, failed and cancelled jobs from the list (their imported results stay)"""

    bl_idname = "flexiact.clear_finished_jobs"
    bl_label = "Clear Finished"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.flexiact
        ended = [i for i, r in enumerate(settings.jobs) if r.status not in ACTIVE_STATUSES]
        for index in reversed(ended):
            settings.jobs.remove(index)
        settings.job_index = min(settings.job_index, max(len(settings.jobs) - 1, 0))
        self.report({"INFO"}, f"Cleared {len(ended)} finished job(s)")
        return {"FINISHED"}


class FLEXIACT_OT_delete_job(bpy.types.Operator):
    """Remove one finished job from the list (its imported result and downloaded clip stay)"""

    bl_idname = "flexiact.delete_job"
    bl_label = "Remove Job"
    bl_options = {"REGISTER", "UNDO"}

    key: StringProperty(description="The job to remove (default: the selected one)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _selected_record(context, self.key)
        if record is None:
            return _fail(self, context, "Select a job first.")
        if record.status in ACTIVE_STATUSES:
            return _fail(self, context, "The job is still running: cancel it first.")
        settings = context.scene.flexiact
        settings.jobs.remove(next(i for i, r in enumerate(settings.jobs) if r.key == record.key))
        settings.job_index = min(settings.job_index, max(len(settings.jobs) - 1, 0))
        return {"FINISHED"}


class FLEXIACT_OT_show_result(bpy.types.Operator):
    """Open the folder holding the job's downloaded clip in the system's file browser"""

    bl_idname = "flexiact.show_result"
    bl_label = "Show in File Browser"

    key: StringProperty(description="The job whose clip to show (default: the selected one)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        record = _selected_record(context, self.key)
        path = bpy.path.abspath(record.video_path) if record is not None and record.video_path else ""
        if not path or not os.path.isfile(path):
            return _fail(self, context, f"No downloaded clip for this job{f' at {path}' if path else ''}.")
        return bpy.ops.wm.path_open(filepath=os.path.dirname(path))


class FLEXIACT_OT_copy_command(bpy.types.Operator):
    """Copy a command that starts the backend, to paste into a terminal"""

    bl_idname = "flexiact.copy_command"
    bl_label = "Copy Start Command"

    def execute(self, context: bpy.types.Context) -> set[str]:
        command = start_command()
        if not command:
            return _fail(self, context, NO_CLI)
        context.window_manager.clipboard = command
        self.report({"INFO"}, f"Copied: {command}")
        return {"FINISHED"}


class FLEXIACT_OT_report(bpy.types.Operator):
    """Show a message in the status bar and the Info editor (for work that ended after its operator returned)"""

    bl_idname = "flexiact.report"
    bl_label = "FlexiAct Report"
    bl_options = {"INTERNAL"}

    message: StringProperty(description="What to say")
    level: EnumProperty(description="How it is shown", items=[("INFO", "Info", "A finished job"),
                                                              ("WARNING", "Warning", "A failed job")])

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({self.level}, f"FlexiAct: {self.message}")
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

    key: StringProperty(description="The job to report (default: the selected one)")

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
           FLEXIACT_OT_import_action_file, FLEXIACT_OT_randomize_seed, FLEXIACT_OT_copy_report,
           FLEXIACT_OT_rename_action, FLEXIACT_OT_delete_action, FLEXIACT_OT_clear_finished_jobs,
           FLEXIACT_OT_delete_job, FLEXIACT_OT_show_result, FLEXIACT_OT_copy_command, FLEXIACT_OT_report,
           FLEXIACT_OT_finish_job, FLEXIACT_OT_import_preview, FLEXIACT_OT_switch_take, FLEXIACT_OT_use_settings)
