"""Bring a generated clip into the project: a Sequencer movie strip and/or an image plane.

The shot's own render stays the camera's: importing the first strip into a scene that had none keeps the
Sequencer out of its F12 render (Post Processing › Sequencer off); the strip plays in the Sequencer's preview.
Strips and planes sit over the model's frame of the shot (framing.py), where the capture took it from, so the
character in the clip is where it is in the camera's view. The plane is parented to the camera at PLANE_DISTANCE
and is left out of FlexiAct's captures. Takes are stacked on free channels; training previews go to a named
preview channel that results never use. Each import keeps its settings as `flexiact_*` custom properties.
"""

from __future__ import annotations

import json
import os
from typing import Any

import bpy
from mathutils import Matrix

from .capture import IMPORTED_TAG
from .framing import camera_view_center, camera_view_size, strip_scale
from .reference import scene_fps, strips_of

#: How far in front of the camera the plane sits (in the camera's local units).
PLANE_DISTANCE = 5.0
PARAM_PREFIX = "flexiact_"
#: The Sequencer channel training previews go to (named so, so the next preview finds it).
PREVIEW_CHANNEL = "FlexiAct Preview"
#: Marks the muted movie strip beneath a preview's speed effect.
PREVIEW_SOURCE = "flexiact_preview_source"


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


def _first_free_channel(scene: bpy.types.Scene, start: int, end: int, ignore: tuple[str, ...] = (),
                        reserved: frozenset[int] = frozenset()) -> int:
    """The lowest channel, not `reserved`, with no strip (other than those named in `ignore`) overlapping frames
    [start, end)."""
    busy = {s.channel for s in strips_of(scene) or ()
            if s.name not in ignore and s.frame_final_start < end and s.frame_final_end > start}
    channel = 1
    while channel in busy or channel in reserved:
        channel += 1
    return channel


def _is_preview(strip: bpy.types.Sequence) -> bool:
    """A training preview, or the muted movie beneath one."""
    return strip.get(f"{PARAM_PREFIX}preview_step") is not None or bool(strip.get(PREVIEW_SOURCE))


def _channels(scene: bpy.types.Scene, previews: bool) -> frozenset[int]:
    """The channels holding previews (previews=True) or anything else: results and previews never share one."""
    return frozenset(s.channel for s in strips_of(scene) or () if _is_preview(s) == previews)


def _new_effect(strips: Any, name: str, channel: int, start: int, length: int, source: Any) -> Any:
    """A Speed Control effect playing `source` stretched over `length` frames (its input is `seq1` in 4.2,
    `input1` from 4.5; its end `frame_end` up to 4.5, `length` in 5.0)."""
    args = strips.bl_rna.functions["new_effect"].parameters.keys()
    kwargs = {"input1" if "input1" in args else "seq1": source}
    kwargs.update({"length": length} if "length" in args else {"frame_end": start + length})
    return strips.new_effect(name=name, type="SPEED", channel=channel, frame_start=start, **kwargs)


def add_clip(scene: bpy.types.Scene, path: str, frame_start: int,
             reserved: frozenset[int] = frozenset()) -> bpy.types.Sequence:
    """A clip at `frame_start` on the first free channel not `reserved`, laid over the model's frame of the shot
    (framing.py) and playing at its own frame rate; returns the strip that shows it.

    A clip whose rate is not the scene's plays through a Speed Control effect (Stretch) over its real length,
    its movie strip muted beneath as the effect's input: the Sequencer's movie strips play frame for frame.
    """
    if not os.path.isfile(bpy.path.abspath(path)):
        raise FileNotFoundError(f"Clip not found: {path}")
    if scene.sequence_editor is None:
        scene.sequence_editor_create()
    strips = strips_of(scene)
    if len(strips) == 0 and scene.camera is not None:  # a 3D shot: F12 keeps rendering its camera
        scene.render.use_sequencer = False
    name = os.path.splitext(os.path.basename(path))[0]
    movie = strips.new_movie(name=name, filepath=path, frame_start=frame_start, fit_method="ORIGINAL",
                             channel=_first_free_channel(scene, frame_start, frame_start + 1, reserved=reserved))
    element = movie.elements[0]
    movie.transform.scale_x, movie.transform.scale_y = strip_scale(scene, element.orig_width, element.orig_height)
    length = round(movie.frame_duration / movie.fps * scene_fps(scene)) if movie.fps > 0 else movie.frame_duration
    shown = movie
    if length != movie.frame_duration:
        movie.frame_final_duration = length
        channel = _first_free_channel(scene, frame_start, frame_start + length, (movie.name,), reserved)
        movie.channel = channel
        shown = _new_effect(strips, f"{name} (speed)", channel + 1, frame_start, length, movie)
        movie.mute = True
    free = _first_free_channel(scene, shown.frame_final_start, shown.frame_final_end, (shown.name,),
                               reserved | {movie.channel} if shown != movie else reserved)
    if free != shown.channel:
        shown.channel = free
    return shown


def remove_clip(scene: bpy.types.Scene, strip: bpy.types.Sequence) -> None:
    """Remove a strip `add_clip` made, with the movie strip beneath a speed effect."""
    strips = strips_of(scene)
    source = getattr(strip, "input_1", None) if strip.type == "SPEED" else None
    strips.remove(strip)
    if source is not None:
        strips.remove(source)


def import_as_strip(scene: bpy.types.Scene, path: str, frame_start: int,
                    params: dict[str, Any] | None = None) -> bpy.types.Sequence:
    """A result at `frame_start` on a free channel that holds no preview, over the model's frame of the shot."""
    strip = add_clip(scene, path, frame_start, _channels(scene, previews=True))
    _store_params(strip, params or {})
    return strip


def already_imported(scene: bpy.types.Scene, path: str) -> str:
    """The name of a strip or image plane of `scene` that already plays the clip at `path` ("" if none)."""
    target = os.path.realpath(bpy.path.abspath(path))

    def same(other: str) -> bool:
        return bool(other) and os.path.realpath(bpy.path.abspath(other)) == target

    strip = next((s for s in strips_of(scene) or () if s.type == "MOVIE" and same(s.filepath)), None)
    if strip is not None:
        return strip.name
    plane = next((o for o in scene.objects if IMPORTED_TAG in o.keys() and o.type == "MESH"
                  for m in o.data.materials if m and m.node_tree for n in m.node_tree.nodes
                  if n.type == "TEX_IMAGE" and n.image and same(n.image.filepath)), None)
    return plane.name if plane is not None else ""


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
    """A training preview at `frame_start` on the preview channel, at its own frame rate; a preview it overlaps
    there is replaced, so the channel shows the latest. Previews never go on a channel that holds a result."""
    editor = scene.sequence_editor
    named = next((i for i, c in enumerate(editor.channels) if i and c.name == PREVIEW_CHANNEL), 0) if editor else 0
    results = _channels(scene, previews=False)
    strip = add_clip(scene, path, frame_start, results)
    source = getattr(strip, "input_1", strip)
    if source != strip:
        source[PREVIEW_SOURCE] = True
    start, end, ours = strip.frame_final_start, strip.frame_final_end, (strip.name, source.name)
    for old in [s for s in strips_of(scene) if s.name not in ours and s.channel == named
                and s.get(f"{PARAM_PREFIX}preview_step") is not None
                and s.frame_final_start < end and s.frame_final_end > start]:
        remove_clip(scene, old)
    busy = {s.channel for s in strips_of(scene) if s.name not in ours and s.frame_final_start < end
            and s.frame_final_end > start}
    taken = results | ({source.channel} if source != strip else set())
    usable = named and named not in busy and named not in taken
    strip.channel = named if usable else _first_free_channel(scene, start, end, (strip.name,), taken)
    scene.sequence_editor.channels[strip.channel].name = PREVIEW_CHANNEL
    _store_params(strip, params)
    return strip


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
    if follow:  # over the model's frame of the shot, as the capture framed it
        view_w, view_h = camera_view_size(scene, camera, PLANE_DISTANCE)
        width = min(view_w, view_h * aspect)
    else:
        width = 2.0 * aspect
    obj = bpy.data.objects.new(name, _plane_mesh(name, width, width / aspect))
    obj.data.materials.append(_movie_material(name, image, frame_start, frames))
    scene.collection.objects.link(obj)
    if follow:  # in the camera's own space: it moves with the camera
        obj.parent = camera
        obj.matrix_parent_inverse = Matrix.Identity(4)
        obj.matrix_basis = Matrix.Translation((*camera_view_center(scene, camera, PLANE_DISTANCE), -PLANE_DISTANCE))
    else:
        obj.matrix_world = Matrix.Translation(scene.cursor.location) @ Matrix.Rotation(1.5707963267948966, 4, "X")
    _store_params(obj, params or {})
    return obj


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
