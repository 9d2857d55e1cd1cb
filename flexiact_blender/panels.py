"""Sidebar panels (3D View and Sequencer › Sidebar › FlexiAct); drawing never does I/O."""

from __future__ import annotations

from typing import Any

import bpy

from .client import is_loopback
from .connection import CONNECTION
from .preferences import NO_CLI, get_prefs, start_command
from .properties import ACTIVE_STATUSES
from .reference import scene_fps, strips_of

MAX_JOBS_SHOWN = 6


def draw_backend(layout: Any, context: bpy.types.Context) -> None:
    """Connection state from the backend's last answer (the heartbeat asks every few seconds), with its age."""
    prefs = get_prefs(context)
    settings = context.scene.flexiact
    row = layout.row()
    state = CONNECTION.state
    if state == "CONNECTED":
        row.label(text=CONNECTION.summary, icon="LINKED")
    elif state == "DEGRADED":  # it answers and takes jobs; they wait in its queue until the pool is back
        row.alert = True
        row.label(text=CONNECTION.summary, icon="ERROR")
        layout.label(text="New jobs wait in the queue until the studio pool is back")
    elif state == "TOKEN":
        row.alert = True
        row.label(text=CONNECTION.summary, icon="LOCKED")
    elif state == "DOWN":
        row.alert = True
        age = CONNECTION.age()
        row.label(text="Backend not answering" + (f" · last answer {age}" if age else ""), icon="UNLINKED")
        layout.label(text=CONNECTION.error)
    else:
        row.label(text=f"{prefs.backend_url} · checking…", icon="URL")
    row.operator("flexiact.test_connection", text="", icon="FILE_REFRESH")
    if CONNECTION.is_tiny():
        layout.label(text="Tiny test model: its clips are noise by design (it checks the whole loop quickly)",
                     icon="INFO")
    if state == "DOWN" and CONNECTION.answered_at is None:
        draw_first_run(layout.box(), prefs)
    if not is_loopback(prefs.backend_url) and not bpy.app.online_access:
        layout.label(text="Remote backend needs Online Access", icon="ERROR")
    if settings.last_error:
        box = layout.box()
        box.label(text=settings.last_error, icon="ERROR")


def draw_first_run(layout: Any, prefs: Any) -> None:
    """No backend answers: how to start one (copy the command into a terminal, or start it from here)."""
    command = start_command()
    if not command:
        layout.label(text=NO_CLI, icon="ERROR")
        return
    layout.label(text="Start a backend (or copy the command into a terminal):", icon="INFO")
    layout.label(text=command)
    row = layout.row()
    row.operator("flexiact.copy_command", icon="COPYDOWN")
    row.operator("flexiact.backend_start", icon="PLAY")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def estimate(steps: int, kind: str) -> str:
    """The time a job of `steps` steps should take, from the backend's measured time per step of its step loop
    (training, denoising), known from its health as soon as it has finished one job of this kind."""
    per_step = CONNECTION.seconds_per_step(kind)
    if per_step is None:
        return "Time: known once the backend has finished one job of this kind"
    return f"About {_duration(steps * per_step)} ({per_step:.2f} s per step, measured on the backend)"


def draw_target(layout: Any, context: bpy.types.Context) -> None:
    settings = context.scene.flexiact
    layout.prop(settings, "target_source", expand=True)
    if settings.target_source == "CAPTURE":
        row = layout.row(align=True)
        row.prop(settings, "capture_engine", text="")
        row.operator("flexiact.capture_target", icon="RENDER_STILL")
    if settings.target_source == "FILE":
        layout.prop(settings, "target_path")
        return
    layout.template_ID(settings, "target_image", open="image.open")
    image = settings.target_image
    if image is not None:
        image.preview_ensure()
        layout.template_icon(icon_value=image.preview.icon_id, scale=6.0)
        layout.label(text=f"{image.size[0]} × {image.size[1]} px")


def draw_tempo(layout: Any, seconds: float) -> None:
    """Say how the backend will learn a reference of `seconds`: at its own speed, or from model-length windows."""
    clip = CONNECTION.clip_seconds()
    if clip <= 0 or seconds <= 0:
        return
    if seconds < clip:
        layout.label(text=f"Learned at real speed: results last {seconds:.2f} s", icon="TIME")
    else:
        layout.label(text=f"Learned from windows of {clip:.1f} s: results last {clip:.1f} s", icon="TIME")


def draw_reference(layout: Any, context: bpy.types.Context) -> None:
    scene = context.scene
    settings = scene.flexiact
    fps = scene_fps(scene)
    layout.prop(settings, "reference_source", expand=True)
    if settings.reference_source == "SCENE":
        frames = scene.frame_end - scene.frame_start + 1
        layout.label(text=f"Frames {scene.frame_start}–{scene.frame_end}: {frames / fps:.2f} s, "
                          "rendered with Workbench", icon="SCENE_DATA")
        draw_tempo(layout, frames / fps)
        _draw_trim(layout, settings)
        return
    if settings.reference_source == "STRIP":
        strips = strips_of(scene)
        if strips is None or len(strips) == 0:
            layout.label(text="The Sequencer is empty: add a movie or image-sequence strip", icon="INFO")
            return
        editor = scene.sequence_editor
        layout.prop_search(settings, "reference_strip", editor,
                           "strips" if hasattr(editor, "strips") else "sequences", icon="SEQUENCE")
        strip = strips.get(settings.reference_strip)
        if strip is not None:
            layout.label(text=f"Trimmed: {strip.frame_final_duration} frames, "
                              f"{strip.frame_final_duration / fps:.2f} s")
            draw_tempo(layout, strip.frame_final_duration / fps)
        return
    layout.prop(settings, "reference_path")
    _draw_trim(layout, settings)


def _draw_trim(layout: Any, settings: Any) -> None:
    """Start/End in the clip's own frames or seconds (the panel reads no file: the unit says which)."""
    layout.prop(settings, "trim_unit", expand=True)
    row = layout.row(align=True)
    row.prop(settings, "clip_start")
    row.prop(settings, "clip_end")
    unit = "frames of the clip" if settings.trim_unit == "FRAMES" else "s"
    if settings.clip_end == 0:
        layout.label(text=f"Trim: from {settings.clip_start:g} {unit} to the end of the clip")
    elif settings.clip_end > settings.clip_start:
        layout.label(text=f"Trim: {settings.clip_end - settings.clip_start:g} {unit}")
        if settings.trim_unit == "SECONDS":
            draw_tempo(layout, settings.clip_end - settings.clip_start)
    else:  # what Extract Action will say: the panel never promises a trim it refuses
        row = layout.row()
        row.alert = True
        row.label(text="End is not after Start: set End later (or 0 for the clip's end)", icon="ERROR")


def draw_action(layout: Any, context: bpy.types.Context) -> None:
    settings = context.scene.flexiact
    layout.prop(settings, "caption")
    row = layout.row(align=True)
    row.prop(settings, "extract_preset", expand=True)
    layout.prop(settings, "extract_steps")
    layout.label(text=estimate(settings.extract_steps, "extract"), icon="TIME")
    layout.prop(settings, "extract_seed")
    layout.prop(settings, "preview_every")
    layout.operator("flexiact.extract_action", icon="ARMATURE_DATA")
    row = layout.row()
    row.label(text="Action library")
    row.operator("flexiact.refresh_actions", text="", icon="FILE_REFRESH")
    row = layout.row()
    row.template_list("FLEXIACT_UL_actions", "", settings, "actions", settings, "action_index", rows=3)
    col = row.column(align=True)
    col.operator("flexiact.rename_action", text="", icon="GREASEPENCIL")
    col.operator("flexiact.delete_action", text="", icon="TRASH")
    layout.label(text=f"Generate with: {action_label(settings)}", icon="ARMATURE_DATA")
    row = layout.row(align=True)
    row.prop(settings, "action_file", text="")
    row.operator("flexiact.import_action_file", text="", icon="IMPORT")


def action_label(settings: Any) -> str:
    """The chosen action as the library names it (its caption, else a short id when it is not listed)."""
    if not settings.action_id:
        return "no action: extract one or pick one in the library"
    item = next((a for a in settings.actions if a.action_id == settings.action_id), None)
    if item is None:
        return f"action {settings.action_id[:8]} (Refresh to see its name)"
    return item.name or item.caption or f"action {settings.action_id[:8]}"


def draw_generate(layout: Any, context: bpy.types.Context) -> None:
    settings = context.scene.flexiact
    layout.prop(settings, "prompt")
    row = layout.row(align=True)
    row.prop(settings, "seed")
    row.operator("flexiact.randomize_seed", text="", icon="FILE_REFRESH")
    layout.prop(settings, "takes")
    layout.label(text=estimate(settings.steps, "generate"), icon="TIME")
    layout.prop(settings, "import_mode", expand=True)
    if settings.import_mode in {"PLANE", "BOTH"}:
        layout.prop(settings, "plane_fill_camera")
    layout.operator("flexiact.generate", icon="RENDER_ANIMATION")
    layout.operator("flexiact.use_settings", icon="PASTEDOWN")


def draw_advanced(layout: Any, context: bpy.types.Context) -> None:
    """The model's own knobs, collapsed by default: the defaults are the authors'."""
    settings = context.scene.flexiact
    col = layout.column(align=True)
    for name in ("steps", "guidance", "lora_weight"):
        col.prop(settings, name)
    col.prop(settings, "reweighting")
    sub = col.column(align=True)
    sub.active = settings.reweighting
    for name in ("reweight_scale", "transition"):
        sub.prop(settings, name)
    layout.prop(settings, "step_cache")
    layout.prop(settings, "gpus")


def _eta(seconds: float) -> str:
    if seconds < 0:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f" · ETA {minutes}:{secs:02d}"


def _status(record: Any) -> str:
    """'Queued · #2 in queue · …' or 'Running on worker-1 · training · ETA 1:15': where the job stands."""
    text = record.status.title()
    if record.status == "QUEUED" and record.queue_position > 0:
        text += f" · #{record.queue_position} in queue"
    elif record.status == "RUNNING" and record.worker:
        text += f" on {record.worker}"
    phase = "finishing" if record.finish_requested else record.phase
    return f"{text} · {phase}{_eta(record.eta_s)}"


def draw_jobs(layout: Any, context: bpy.types.Context) -> None:
    records = list(context.scene.flexiact.jobs)[-MAX_JOBS_SHOWN:]
    if not records:
        layout.label(text="No jobs yet")
        return
    layout.operator("flexiact.clear_finished_jobs", icon="BRUSH_DATA")
    for record in reversed(records):
        box = layout.box()
        row = box.row()
        row.label(text=record.label or record.kind.title(),
                  icon="ARMATURE_DATA" if record.kind == "EXTRACT" else "RENDER_ANIMATION")
        if record.status in ACTIVE_STATUSES and record.job_id:
            row.operator("flexiact.cancel_job", text="", icon="X").key = record.key
        elif record.status not in ACTIVE_STATUSES:
            if record.video_path:
                row.operator("flexiact.show_result", text="", icon="FILEBROWSER").key = record.key
            row.operator("flexiact.delete_job", text="", icon="TRASH").key = record.key
        if record.status in ACTIVE_STATUSES:
            box.progress(factor=record.progress, type="BAR", text=_status(record))
            if record.note:  # accepted, but it cannot start soon: the backend says why
                box.label(text=record.note, icon="TIME")
            if record.error:  # a poll that failed: the job goes on on the backend, the panel says why it waits
                box.label(text=record.error, icon="ERROR")
            if record.kind == "EXTRACT" and record.job_id:
                _draw_preview(box, record)
        elif record.status == "FAILED":
            box.label(text=record.error or "Failed", icon="ERROR")
            box.operator("flexiact.copy_report", icon="COPYDOWN").key = record.key
        else:
            done = record.status.title()
            if record.imported:
                done += f" · imported {record.strip_name or record.plane_name}"
            box.label(text=done, icon="CHECKMARK" if record.status == "SUCCEEDED" else "CANCEL")
            if record.error:
                box.label(text=record.error, icon="ERROR")
            if record.kind == "GENERATE" and record.video_path:
                box.operator("flexiact.import_result", icon="IMPORT").key = record.key
            if record.kind == "GENERATE" and record.imported and len(record.takes) > 1:
                _draw_takes(box, record)
            if record.kind == "EXTRACT" and record.preview_path:
                _draw_preview(box, record)


def _draw_preview(box: Any, record: Any) -> None:
    """The latest training preview of an extraction, with Import Preview and (while it runs) Finish Now."""
    row = box.row(align=True)
    if record.preview_path:
        row.label(text=f"Preview · step {record.preview_step} · {record.preview_frames} frames", icon="SEQUENCE")
        row.operator("flexiact.import_preview", text="", icon="IMPORT").key = record.key
    else:
        row.label(text="No preview yet", icon="SEQUENCE")
    if record.status in ACTIVE_STATUSES and not record.finish_requested:
        box.operator("flexiact.finish_job", icon="CHECKMARK").key = record.key


def _draw_takes(box: Any, record: Any) -> None:
    """Previous / next take, and which one is chosen."""
    take = record.takes[record.take_index]
    row = box.row(align=True)
    op = row.operator("flexiact.switch_take", text="", icon="TRIA_LEFT")
    op.key, op.offset = record.key, -1
    row.label(text=f"Take {record.take_index + 1}/{len(record.takes)} · seed {take.seed}")
    op = row.operator("flexiact.switch_take", text="", icon="TRIA_RIGHT")
    op.key, op.offset = record.key, 1


class FLEXIACT_UL_actions(bpy.types.UIList):
    """The backend's action library: name (else caption), status; cancelled extractions are not listed."""

    def draw_item(self, context: bpy.types.Context, layout: Any, data: Any, item: Any, icon: int,
                  active_data: Any, active_propname: str, index: int = 0) -> None:
        row = layout.row()
        row.label(text=item.name or item.caption or "Unnamed action", icon="ARMATURE_DATA")
        if item.status != "ready":
            row.label(text=item.status)


#: (section, label, draw, parent section, collapsed): the first section is every other one's parent unless named.
SECTIONS = (("backend", "FlexiAct", draw_backend, "", False), ("target", "Target Frame", draw_target, "", False),
            ("reference", "Reference Clip", draw_reference, "", False), ("action", "Action", draw_action, "", False),
            ("generate", "Generate", draw_generate, "", False),
            ("advanced", "Advanced", draw_advanced, "generate", True), ("jobs", "Jobs", draw_jobs, "", False))
SPACES = (("VIEW_3D", "view3d"), ("SEQUENCE_EDITOR", "sequencer"))


def _panel(space: str, prefix: str, section: str, label: str, draw_fn: Any, parent: str, closed: bool) -> type:
    """One sidebar panel class; the same panels are made for each editor."""

    def draw(self: bpy.types.Panel, context: bpy.types.Context) -> None:
        draw_fn(self.layout, context)

    attrs: dict[str, Any] = {"bl_idname": f"FLEXIACT_PT_{prefix}_{section}", "bl_label": label,
                             "bl_space_type": space, "bl_region_type": "UI", "bl_category": "FlexiAct",
                             "draw": draw, "poll": classmethod(lambda cls, context: context.scene is not None)}
    if parent:
        attrs["bl_parent_id"] = parent
    if closed:
        attrs["bl_options"] = {"DEFAULT_CLOSED"}
    return type(f"FLEXIACT_PT_{prefix}_{section}", (bpy.types.Panel,), attrs)


def _panels() -> list[type]:
    panels = []
    for space, prefix in SPACES:
        root = f"FLEXIACT_PT_{prefix}_{SECTIONS[0][0]}"
        for section, label, draw_fn, parent, closed in SECTIONS:
            parent_id = f"FLEXIACT_PT_{prefix}_{parent}" if parent else (root if section != SECTIONS[0][0] else "")
            panels.append(_panel(space, prefix, section, label, draw_fn, parent_id, closed))
    return panels


CLASSES = (FLEXIACT_UL_actions, *_panels())
