"""Bring a generated clip into the project: a Sequencer movie strip and/or an image plane.

The shot's own render stays the camera's: importing the first strip into a scene that had none keeps the
Sequencer out of its F12 render (Post Processing › Sequencer off); the strip plays in the Sequencer's preview.
The plane is parented to the camera, filling its view at PLANE_DISTANCE, and is left out of FlexiAct's captures. Takes are stacked on free channels; training previews go to a named preview
channel. Each import keeps its settings as `flexiact_*` custom properties.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import bpy
from mathutils import Matrix

from .preferences import unsaved_dir
from .reference import strips_of

#: How far in front of the camera the plane sits (in the camera's local units).
PLANE_DISTANCE = 5.0
PARAM_PREFIX = "flexiact_"
#: The Sequencer channel training previews go to (named so, so the next preview finds it).
PREVIEW_CHANNEL = "FlexiAct Preview"


def _store_params(target: Any, params: dict[str, Any]) -> None:
    """Keep the generation's parameters on the imported item, as `flexiact_*` custom properties."""
    for key, value in params.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            target[f"{PARAM_PREFIX}{key}"] = value
        elif value is not None:
            target[f"{PARAM_PREFIX}{key}"] = json.dumps(value)


def stored_params(target: Any) -> dict[str, Any]:
    """The parameters `_store_params` kept on an imported strip or object (empty for anything else)."""
    return {key[len(PARAM_PREFIX):]: target[key] for key in target.keys() if key.startswith(PARAM_PREFIX)}


def _first_free_channel(scene: bpy.types.Scene, start: int, end: int, ignore: str = "") -> int:
    """The lowest channel with no strip (other than `ignore`) overlapping frames [start, end)."""
    busy = {s.channel for s in strips_of(scene) or ()
            if s.name != ignore and s.frame_final_start < end and s.frame_final_end > start}
    channel = 1
    while channel in busy:
        channel += 1
    return channel


def import_as_strip(scene: bpy.types.Scene, path: str, frame_start: int,
                    params: dict[str, Any] | None = None) -> bpy.types.Sequence:
    """A movie strip at `frame_start` on the first free channel, fitted to the scene's resolution (aspect kept)."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Generated clip not found: {path}")
    if scene.sequence_editor is None:
        scene.sequence_editor_create()
    strips = strips_of(scene)
    if len(strips) == 0 and scene.camera is not None:  # a 3D shot: F12 keeps rendering its camera
        scene.render.use_sequencer = False
    name = os.path.splitext(os.path.basename(path))[0]
    channel = _first_free_channel(scene, frame_start, frame_start + 1)
    strip = strips.new_movie(name=name, filepath=path, channel=channel, frame_start=frame_start, fit_method="FIT")
    free = _first_free_channel(scene, strip.frame_final_start, strip.frame_final_end, ignore=strip.name)
    if free != strip.channel:
        strip.channel = free
    _store_params(strip, params or {})
    return strip


def import_takes(scene: bpy.types.Scene, takes: list[tuple[str, dict[str, Any]]], frame_start: int,
                 chosen: int) -> list[bpy.types.Sequence]:
    """One strip per (clip, parameters), all starting at `frame_start`, stacked on free channels; only the
    `chosen` one is unmuted."""
    strips = [import_as_strip(scene, path, frame_start, params) for path, params in takes]
    for i, strip in enumerate(strips):
        strip.mute = i != chosen
    return strips


def import_preview(scene: bpy.types.Scene, path: str, frame_start: int,
                   params: dict[str, Any]) -> bpy.types.Sequence:
    """A training preview as a strip at `frame_start` on the preview channel; a preview it overlaps there is
    replaced, so the channel shows the latest. The first free channel becomes the preview channel if none is."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Preview clip not found: {path}")
    if scene.sequence_editor is None:
        scene.sequence_editor_create()
    editor, strips = scene.sequence_editor, strips_of(scene)
    name = os.path.splitext(os.path.basename(path))[0]
    strip = strips.new_movie(name=name, filepath=path, channel=_first_free_channel(scene, frame_start, frame_start + 1),
                             frame_start=frame_start)
    start, end = strip.frame_final_start, strip.frame_final_end
    named = next((i for i, c in enumerate(editor.channels) if i and c.name == PREVIEW_CHANNEL), 0)
    for old in [s for s in strips if s != strip and s.channel == named and s.get(f"{PARAM_PREFIX}preview_step")
                is not None and s.frame_final_start < end and s.frame_final_end > start]:
        strips.remove(old)
    busy = {s.channel for s in strips if s != strip and s.frame_final_start < end and s.frame_final_end > start}
    channel = named if named and named not in busy else _first_free_channel(scene, start, end, ignore=strip.name)
    strip.channel = channel
    editor.channels[channel].name = PREVIEW_CHANNEL
    _store_params(strip, params)
    return strip


def _camera_frame_size(scene: bpy.types.Scene, camera: bpy.types.Object, distance: float) -> tuple[float, float]:
    """Width and height of what the camera sees at `distance` in front of it."""
    corners = camera.data.view_frame(scene=scene)
    xs = [c.x for c in corners]
    ys = [c.y for c in corners]
    scale = 1.0 if camera.data.type == "ORTHO" else distance / abs(corners[0].z)
    return (max(xs) - min(xs)) * scale, (max(ys) - min(ys)) * scale


def _plane_mesh(name: str, width: float, height: float) -> bpy.types.Mesh:
    mesh = bpy.data.meshes.new(name)
    w, h = width / 2, height / 2
    mesh.from_pydata([(-w, -h, 0), (w, -h, 0), (w, h, 0), (-w, h, 0)], [], [(0, 1, 2, 3)])
    uv = mesh.uv_layers.new(name="UVMap")
    for loop, coord in zip(uv.data, ((0, 0), (1, 0), (1, 1), (0, 1))):
        loop.uv = coord
    mesh.update()
    return mesh


def _movie_material(name: str, image: bpy.types.Image, frame_start: int, frames: int) -> bpy.types.Material:
    """An emission material playing the clip from `frame_start`, auto-refreshed as the frame changes."""
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):  # always on (and deprecated) from 5.0
        mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    nodes.clear()
    tex = nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.image_user.frame_start = frame_start
    tex.image_user.frame_duration = frames
    tex.image_user.frame_offset = 0
    tex.image_user.use_auto_refresh = True
    tex.image_user.use_cyclic = False
    emission = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(tex.outputs["Color"], emission.inputs["Color"])
    links.new(emission.outputs["Emission"], out.inputs["Surface"])
    return mat


def import_as_plane(scene: bpy.types.Scene, path: str, frame_start: int,
                    size: tuple[int, int], fill_camera: bool = True,
                    params: dict[str, Any] | None = None) -> bpy.types.Object:
    """An image plane with the clip as a movie texture: parented to the active camera, or at the 3D cursor."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Generated clip not found: {path}")
    image = bpy.data.images.load(path, check_existing=True)
    image.source = "MOVIE"
    frames = image.frame_duration
    width_px, height_px = image.size[:] if image.size[0] > 0 else size
    aspect = width_px / height_px
    name = os.path.splitext(os.path.basename(path))[0]
    camera = scene.camera
    follow = fill_camera and camera is not None
    if follow:
        view_w, view_h = _camera_frame_size(scene, camera, PLANE_DISTANCE)
        width = max(view_w, view_h * aspect)
    else:
        width = 2.0 * aspect
    obj = bpy.data.objects.new(name, _plane_mesh(name, width, width / aspect))
    obj.data.materials.append(_movie_material(name, image, frame_start, frames))
    scene.collection.objects.link(obj)
    if follow:  # in the camera's own space: it moves with the camera
        obj.parent = camera
        obj.matrix_parent_inverse = Matrix.Identity(4)
        obj.matrix_basis = Matrix.Translation((0.0, 0.0, -PLANE_DISTANCE))
    else:
        obj.matrix_world = Matrix.Translation(scene.cursor.location) @ Matrix.Rotation(1.5707963267948966, 4, "X")
    _store_params(obj, params or {})
    return obj


def adopt_unsaved_results(blend_path: str) -> int:
    """Move results made before the first save from the unsaved folder to `//flexiact/` beside `blend_path`.

    Every user of a moved file (job records, images, movie strips) is repointed, blend-relative; returns how
    many files moved. Files elsewhere (the user's own clips) are never moved.
    """
    src = os.path.realpath(unsaved_dir())
    start = os.path.dirname(os.path.abspath(blend_path))
    dest = os.path.join(start, "flexiact")
    moved: dict[str, str] = {}

    def relocate(path: str) -> str | None:
        full = os.path.realpath(bpy.path.abspath(path)) if path else ""
        if not full or os.path.dirname(full) != src:
            return None
        if full not in moved:
            if not os.path.isfile(full):
                return None
            os.makedirs(dest, exist_ok=True)
            moved[full] = shutil.move(full, os.path.join(dest, os.path.basename(full)))
        return bpy.path.relpath(moved[full], start=start)

    for scene in bpy.data.scenes:
        for record in scene.flexiact.jobs:
            record.video_path = relocate(record.video_path) or record.video_path
        for strip in strips_of(scene) or ():
            if strip.type == "MOVIE":
                strip.filepath = relocate(strip.filepath) or strip.filepath
    for image in bpy.data.images:
        new = relocate(image.filepath)
        if new:
            image.filepath = new
    return len(moved)


def set_plane_movie(obj: bpy.types.Object, path: str, params: dict[str, Any]) -> None:
    """Make an imported plane play another clip of the same length (another take), with that clip's settings."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Generated clip not found: {path}")
    image = bpy.data.images.load(path, check_existing=True)
    image.source = "MOVIE"
    for material in obj.data.materials:
        for node in material.node_tree.nodes if material and material.node_tree else ():
            if node.type == "TEX_IMAGE":
                node.image = image
                node.image_user.frame_duration = image.frame_duration
    _store_params(obj, params)
