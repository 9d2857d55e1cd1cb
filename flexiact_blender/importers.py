"""Bring a generated clip into the project: a Sequencer movie strip and/or an image plane."""

from __future__ import annotations

import json
import os
from typing import Any

import bpy
from mathutils import Matrix

from .reference import strips_of

PLANE_DISTANCE = 5.0


def _store_params(target: Any, params: dict[str, Any]) -> None:
    """Keep the generation's parameters on the imported item, as `flexiact_*` custom properties."""
    for key, value in params.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            target[f"flexiact_{key}"] = value
        elif value is not None:
            target[f"flexiact_{key}"] = json.dumps(value)


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
    """A movie strip starting at `frame_start` on the first free channel, with the parameters attached."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Generated clip not found: {path}")
    if scene.sequence_editor is None:
        scene.sequence_editor_create()
    strips = strips_of(scene)
    name = os.path.splitext(os.path.basename(path))[0]
    channel = _first_free_channel(scene, frame_start, frame_start + 1)
    strip = strips.new_movie(name=name, filepath=path, channel=channel, frame_start=frame_start)
    free = _first_free_channel(scene, strip.frame_final_start, strip.frame_final_end, ignore=strip.name)
    if free != strip.channel:
        strip.channel = free
    _store_params(strip, params or {})
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
    """An image plane with the clip as a movie texture, in front of the active camera or at the 3D cursor."""
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Generated clip not found: {path}")
    image = bpy.data.images.load(path, check_existing=True)
    image.source = "MOVIE"
    frames = image.frame_duration
    width_px, height_px = image.size[:] if image.size[0] > 0 else size
    aspect = width_px / height_px
    name = os.path.splitext(os.path.basename(path))[0]
    camera = scene.camera
    if fill_camera and camera is not None:
        view_w, view_h = _camera_frame_size(scene, camera, PLANE_DISTANCE)
        width = max(view_w, view_h * aspect)
        matrix = camera.matrix_world.normalized() @ Matrix.Translation((0.0, 0.0, -PLANE_DISTANCE))
    else:
        width = 2.0 * aspect
        matrix = Matrix.Translation(scene.cursor.location) @ Matrix.Rotation(1.5707963267948966, 4, "X")
    obj = bpy.data.objects.new(name, _plane_mesh(name, width, width / aspect))
    obj.data.materials.append(_movie_material(name, image, frame_start, frames))
    obj.matrix_world = matrix
    scene.collection.objects.link(obj)
    _store_params(obj, params or {})
    return obj
