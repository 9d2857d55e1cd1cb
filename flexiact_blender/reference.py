"""Resolve the reference clip (file, Sequencer strip or the scene's own animation) into a file and a trim.

An image sequence (an image strip, a folder of numbered frames or one of its frames) is packed into a zip of
its frames, uploaded with the scene's frame rate; the backend reads the frames and checks the numbering.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass

import bpy

from .capture import render_scene_clip


class ReferenceError(Exception):
    """Why the reference clip cannot be used, in words a user can act on."""


@dataclass
class Reference:
    """A video file on disk and the part of it to learn the action from, in seconds."""

    path: str
    start_s: float
    end_s: float
    fps: float | None = None  # set for an image sequence (a zip of its frames): the rate it plays at


def scene_fps(scene: bpy.types.Scene) -> float:
    """The scene's real frame rate (23.976 is 24 / 1.001)."""
    return scene.render.fps / scene.render.fps_base


def strips_of(scene: bpy.types.Scene) -> bpy.types.bpy_prop_collection | None:
    """The top-level strips: `strips` in 5.0, `sequences` before."""
    editor = scene.sequence_editor
    if editor is None:
        return None
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def movie_info(path: str) -> tuple[float, float]:
    """(duration in seconds, fps) of a video, read by Blender itself; ReferenceError if it is not one."""
    if not os.path.isfile(path):
        raise ReferenceError(f"Reference video not found: {path}")
    try:
        clip = bpy.data.movieclips.load(path, check_existing=True)
    except RuntimeError as exc:
        raise ReferenceError(f"Blender cannot read {os.path.basename(path)} as a video: {exc}") from exc
    try:
        fps = float(clip.fps) or 0.0
        frames = clip.frame_duration
    finally:
        if clip.users == 0:
            bpy.data.movieclips.remove(clip)
    if fps <= 0 or frames <= 0:
        raise ReferenceError(f"{os.path.basename(path)} has no video frames.")
    return frames / fps, fps


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr")
_NUMBERED = re.compile(r"^(.*?)(\d+)(\.[A-Za-z]+)$")


def sequence_frames(path: str) -> list[str]:
    """The numbered frames (full paths, in order) of the sequence a folder or one of its frames names; [] if the
    path is a single file that is not a numbered frame."""
    folder, name = (path, None) if os.path.isdir(path) else os.path.split(path)
    if name is not None:
        m = _NUMBERED.match(name)
        if m is None or m[3].lower() not in FRAME_SUFFIXES:
            return []
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for entry in os.listdir(folder):
        m = _NUMBERED.match(entry)
        if m and m[3].lower() in FRAME_SUFFIXES and not entry.startswith("."):
            groups.setdefault((m[1], m[3]), []).append((int(m[2]), entry))
    if name is not None:
        m = _NUMBERED.match(name)
        group = groups.get((m[1], m[3]), []) if m else []
    elif len(groups) == 1:
        group = next(iter(groups.values()))
    elif not groups:
        raise ReferenceError(f"No numbered frames (like shot_0001.png) in {folder}.")
    else:
        raise ReferenceError(f"{folder} holds more than one image sequence: choose one of its frames instead.")
    return [os.path.join(folder, entry) for _n, entry in sorted(group)]


def pack_frames(frames: list[str], folder: str, name: str) -> str:
    """The frames in a zip (stored, not compressed: PNG and EXR already are) in `folder`; its path."""
    if len(frames) < 2:
        raise ReferenceError("An image sequence needs at least two frames.")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.zip")
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED) as z:
        for frame in frames:
            if not os.path.isfile(frame):
                raise ReferenceError(f"Frame {os.path.basename(frame)} of the sequence is missing: render it again.")
            z.write(frame, os.path.basename(frame))
    os.replace(path + ".tmp", path)
    return path


#: The backend's trim rules (flexiact_backend.media.check_trim), so a bad trim is refused here, before a render or
#: an upload, with the words the CLI and the API use.
MIN_SEGMENT_S = 0.5
END_TOLERANCE_S = 0.05


def check_trim(start: float, end: float | None, duration: float) -> tuple[float, float]:
    """The trim [start, end) of a clip of `duration` seconds (end None: the clip's end), checked as the backend
    checks it; an end within END_TOLERANCE_S past the clip's end is the end (players round durations)."""
    if start < 0:
        raise ReferenceError(f"Trim start {start:g} s is negative; use 0 or a later time.")
    if start >= duration:
        raise ReferenceError(f"Trim start {start:g} s is at or past the end of the clip ({duration:.3f} s long); "
                             "choose a start before the end.")
    end = duration if end is None else end
    if end <= start:
        raise ReferenceError(f"Trim end {end:g} s is not after the start {start:g} s; choose an end later than "
                             "the start.")
    if end > duration:
        if end - duration > END_TOLERANCE_S:
            raise ReferenceError(f"Trim end {end:g} s is past the end of the clip ({duration:.3f} s long); choose "
                                 "an earlier end or leave it empty for the clip end.")
        end = duration
    if end - start < MIN_SEGMENT_S:
        raise ReferenceError(f"The trimmed segment is {end - start:.3f} s long; it must be at least "
                             f"{MIN_SEGMENT_S} s. Widen the trim range.")
    return start, end


def trim_seconds(settings: "bpy.types.PropertyGroup", fps: float, duration_s: float) -> tuple[float, float]:
    """The settings' trim in seconds (frames count at the clip's own `fps`; 0 as end: the clip's end), checked."""
    scale = 1.0 / fps if settings.trim_unit == "FRAMES" else 1.0
    end = settings.clip_end * scale if settings.clip_end > 0 else None
    return check_trim(settings.clip_start * scale, end, duration_s)


def resolve(scene: bpy.types.Scene, width: int, height: int, folder: str) -> Reference:
    """The clip the settings point at; renders the scene's animation when that is the source."""
    settings = scene.flexiact
    if settings.reference_source == "SCENE":
        path = render_scene_clip(scene, width, height, folder)
        duration, fps = movie_info(path)
        return Reference(path, *trim_seconds(settings, fps, duration))
    if settings.reference_source == "STRIP":
        strips = strips_of(scene)
        strip = strips.get(settings.reference_strip) if strips is not None else None
        if strip is None or strip.type not in ("MOVIE", "IMAGE"):
            raise ReferenceError(f"No movie or image-sequence strip named {settings.reference_strip!r} in the "
                                 "Sequencer: pick one in the Reference panel.")
        if strip.type == "IMAGE":
            fps = scene_fps(scene)
            directory = bpy.path.abspath(strip.directory)
            frames = [os.path.join(directory, e.filename) for e in strip.elements]
            start = strip.frame_offset_start / fps
            end = min(len(frames) / fps, start + strip.frame_final_duration / fps)
            return Reference(pack_frames(frames, folder, f"strip-{strip.name}"), start, end, fps)
        path = bpy.path.abspath(strip.filepath)
        duration, fps = movie_info(path)
        start = strip.frame_offset_start / fps
        end = min(duration, start + strip.frame_final_duration / fps)
        return Reference(path, start, end)
    if not settings.reference_path:
        raise ReferenceError("Choose a reference video, image-sequence folder or numbered frame in the Reference "
                             "panel.")
    path = bpy.path.abspath(settings.reference_path)
    frames = sequence_frames(path) if os.path.exists(path) else []
    if frames:  # numbered frames play at the scene's rate
        fps = scene_fps(scene)
        return Reference(pack_frames(frames, folder, "sequence"), *trim_seconds(settings, fps, len(frames) / fps), fps)
    duration, fps = movie_info(path)
    return Reference(path, *trim_seconds(settings, fps, duration))
