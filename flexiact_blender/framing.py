"""Where the model's frame sits in the shot, so a capture and the clip made from it line up with the camera.

The model makes clips of one fixed aspect (3:2). The shot is the source of truth: its camera (sensor fit, lens,
shift) at the render's resolution and pixel aspect. The model's frame is the largest centred rectangle of the
model's aspect inside the shot: full height in a wider shot (16:9, 2.39:1), full width in a narrower one (4:3,
portrait). Capture renders exactly that rectangle, and a strip or plane is placed exactly over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bpy


@dataclass(frozen=True)
class Region:
    """The model's frame inside the shot, as fractions of the shot's width and height (centred)."""

    width: float
    height: float


def shot_aspect(scene: bpy.types.Scene) -> float:
    """Width / height of the shot as it is seen: the render's resolution times its pixel aspect."""
    r = scene.render
    return (r.resolution_x * r.pixel_aspect_x) / (r.resolution_y * r.pixel_aspect_y)


def model_region(scene: bpy.types.Scene, model_width: int, model_height: int) -> Region:
    """The centred rectangle of the model's aspect that fills the shot in one direction."""
    shot, model = shot_aspect(scene), model_width / model_height
    return Region(model / shot, 1.0) if shot >= model else Region(1.0, shot / model)


def capture_settings(scene: bpy.types.Scene, model_width: int, model_height: int) -> dict[str, Any]:
    """Render settings (dotted paths under scene.render) that render the model's frame of the shot, at the model's
    size in square pixels: the whole shot at the scale where that frame is model-sized, cropped to it by a border.

    The camera is untouched: the same display aspect at square pixels gives Blender the same view."""
    region = model_region(scene, model_width, model_height)
    full_w = max(model_width, round(model_width / region.width))
    full_h = max(model_height, round(model_height / region.height))
    # Blender truncates border * size to whole pixels: a quarter pixel in keeps the crop at exactly the model size
    left = ((full_w - model_width) / 2 + 0.25) / full_w
    bottom = ((full_h - model_height) / 2 + 0.25) / full_h
    return {"resolution_x": full_w, "resolution_y": full_h, "resolution_percentage": 100,
            "pixel_aspect_x": 1.0, "pixel_aspect_y": 1.0, "use_border": True, "use_crop_to_border": True,
            "border_min_x": left, "border_max_x": left + model_width / full_w,
            "border_min_y": bottom, "border_max_y": bottom + model_height / full_h}


def strip_scale(scene: bpy.types.Scene, clip_width: int, clip_height: int) -> tuple[float, float]:
    """(scale_x, scale_y) that lay a centred clip of `clip_width` x `clip_height` square pixels (a clip of the
    model's aspect) over the model's frame of the shot, in the Sequencer's render pixels (pixel aspect included)."""
    region = model_region(scene, clip_width, clip_height)
    r = scene.render
    return r.resolution_x * region.width / clip_width, r.resolution_y * region.height / clip_height


def camera_view_size(scene: bpy.types.Scene, camera: bpy.types.Object, distance: float) -> tuple[float, float]:
    """Width and height of what the camera sees at `distance` in front of it (sensor fit and pixel aspect
    included: Blender's own view frame)."""
    corners = camera.data.view_frame(scene=scene)
    xs = [c.x for c in corners]
    ys = [c.y for c in corners]
    scale = 1.0 if camera.data.type == "ORTHO" else distance / abs(corners[0].z)
    return (max(xs) - min(xs)) * scale, (max(ys) - min(ys)) * scale


def camera_view_center(scene: bpy.types.Scene, camera: bpy.types.Object, distance: float) -> tuple[float, float]:
    """The centre of the camera's view at `distance` (off the axis when the lens is shifted)."""
    corners = camera.data.view_frame(scene=scene)
    scale = 1.0 if camera.data.type == "ORTHO" else distance / abs(corners[0].z)
    return (sum(c.x for c in corners) / 4 * scale, sum(c.y for c in corners) / 4 * scale)
