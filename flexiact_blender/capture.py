"""Render the target frame and the scene's own animation, restoring every render setting touched."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import bpy

from .framing import capture_settings

WORKBENCH = "BLENDER_WORKBENCH"
#: The custom property every imported strip and plane carries (importers store the job id under it).
IMPORTED_TAG = "flexiact_job"


class CaptureError(Exception):
    """Why a render could not be made, in words a user can act on."""


def _get(path: str, root: Any) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(path: str, root: Any, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get(head, root) if head else root, last, value)


@contextlib.contextmanager
def render_settings(scene: bpy.types.Scene, changes: dict[str, Any]) -> Iterator[None]:
    """Apply `changes` (dotted paths under scene.render) and put every old value back afterwards.

    Restored in the same order as applied: 5.0's media type must be back before its file format.
    """
    render = scene.render
    saved = [(path, _get(path, render)) for path in changes]  # all first: 5.0's media type changes the format
    try:
        for path, value in changes.items():
            _set(path, render, value)
        yield
    finally:
        for path, value in saved:
            _set(path, render, value)


def _has_media_type() -> bool:
    return "media_type" in bpy.types.ImageFormatSettings.bl_rna.properties


def _video_format() -> dict[str, Any]:
    """Render settings for an H.264 mp4; 5.0 also needs the media type switched to video first."""
    changes: dict[str, Any] = {}
    if _has_media_type():
        changes["image_settings.media_type"] = "VIDEO"
    changes.update({"image_settings.file_format": "FFMPEG", "ffmpeg.format": "MPEG4", "ffmpeg.codec": "H264",
                    "ffmpeg.constant_rate_factor": "HIGH", "ffmpeg.audio_codec": "NONE",
                    # listed so they are restored: switching to video coerces them (RGBA → RGB)
                    "image_settings.color_mode": "RGB", "image_settings.color_depth": "8"})
    return changes


def _still_format() -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if _has_media_type():
        changes["image_settings.media_type"] = "IMAGE"
    changes.update({"image_settings.file_format": "PNG", "image_settings.color_mode": "RGB",
                    "image_settings.color_depth": "8"})
    return changes


@contextlib.contextmanager
def imported_planes_hidden(scene: bpy.types.Scene) -> Iterator[None]:
    """FlexiAct's own image planes stay out of a capture (they would block the set), then render as before."""
    planes = [o for o in scene.objects if IMPORTED_TAG in o.keys() and not o.hide_render]
    for obj in planes:
        obj.hide_render = True
    try:
        yield
    finally:
        for obj in planes:
            obj.hide_render = False


def capture_target(scene: bpy.types.Scene, width: int, height: int, engine: str, folder: str) -> str:
    """Render the model's frame of the shot (see framing.py) from the active camera at the model's size; return
    the PNG path."""
    if scene.camera is None:
        raise CaptureError("The scene has no active camera: add one (or pick an image as the target).")
    changes = capture_settings(scene, width, height)
    changes["film_transparent"] = False
    if engine == "WORKBENCH":
        changes["engine"] = WORKBENCH
    changes.update(_still_format())
    path = os.path.join(folder, f"target_{scene.name}_{scene.frame_current}_{time.strftime('%Y%m%d-%H%M%S')}.png")
    with render_settings(scene, changes), imported_planes_hidden(scene):
        bpy.ops.render.render(write_still=False, scene=scene.name)
        result = bpy.data.images.get("Render Result")
        if result is None:
            raise CaptureError("Blender produced no render result.")
        result.save_render(filepath=path, scene=scene)
    if not os.path.isfile(path):
        raise CaptureError(f"The render could not be written to {path}.")
    return path


def render_scene_clip(scene: bpy.types.Scene, width: int, height: int, folder: str) -> str:
    """Render frames start..end with Workbench into an mp4 at the scene's fps, framed as the capture; return its
    path."""
    if scene.camera is None:
        raise CaptureError("The scene has no active camera to render its animation from.")
    if scene.frame_end <= scene.frame_start:
        raise CaptureError("The scene's frame range is empty: set Start and End in the Output properties.")
    base = os.path.join(folder, f"reference_{scene.name}_{time.strftime('%Y%m%d-%H%M%S')}_")
    changes = capture_settings(scene, width, height)
    changes.update({"engine": WORKBENCH, "filepath": base, "use_file_extension": True,
                    "film_transparent": False})
    changes.update(_video_format())
    with render_settings(scene, changes), imported_planes_hidden(scene):
        bpy.ops.render.render(animation=True, scene=scene.name)
        path = scene.render.frame_path(frame=scene.frame_start)
    if not os.path.isfile(path):
        raise CaptureError(f"The scene's animation could not be written to {path}.")
    return path
