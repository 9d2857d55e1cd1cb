"""The requests the add-on sends, built from `scene.flexiact` in this one place with the API's own field names.

The defaults are the API's (`GenerationCreate`/`ActionCreate` in /openapi.json; a test compares them); the
extraction presets are the backend's, read from /v1/health.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bpy

#: GenerationCreate's defaults, as the backend's /openapi.json publishes them.
GENERATION_DEFAULTS: dict[str, Any] = {"seed": 42, "steps": 50, "guidance_scale": 6.0, "lora_weight": 0.7,
                                       "reweight_scale": 1.0, "high_timesteps": 0.8}
#: ActionCreate's defaults (its steps are the backend's "standard" preset).
EXTRACTION_DEFAULTS: dict[str, Any] = {"seed": 0, "steps": 3000}
#: A generation's settings: the API's field name → the `scene.flexiact` property that holds it. Imported strips
#: keep these fields as custom properties, and "Use These Settings" reads them back through this table.
GENERATION_SETTINGS: dict[str, str] = {"action": "action_id", "prompt": "prompt", "seed": "seed", "steps": "steps",
                                       "guidance_scale": "guidance", "lora_weight": "lora_weight",
                                       "reweight_scale": "reweight_scale", "high_timesteps": "transition"}


@dataclass(frozen=True)
class Request:
    """One POST: its route and body, and the local file whose uploaded id goes into `file_field`."""

    route: str
    body: dict[str, Any]
    file_path: str
    file_field: str
    #: How the job list names it.
    label: str = ""
    #: The frame rate of an image sequence's zip (the backend makes a clip of it at this rate); None otherwise.
    file_fps: float | None = None

    def with_file(self, file_id: str) -> dict[str, Any]:
        return {**self.body, self.file_field: file_id}


def extraction(settings: bpy.types.PropertyGroup, video_path: str, start_s: float, end_s: float,
               fps: float | None = None) -> Request:
    """POST /v1/actions: learn the reference clip's motion between `start_s` and `end_s` (`fps`: the rate of an
    image sequence's zip)."""
    caption = settings.caption.strip()
    name = caption[:60]
    body = {"name": name, "caption": caption, "start_s": round(start_s, 4), "end_s": round(end_s, 4),
            "steps": settings.extract_steps, "seed": settings.extract_seed,
            "preview_every": settings.preview_every, **_gpus(settings)}
    return Request("/v1/actions", body, video_path, "video", f"Extract '{name}'", fps)


def generation(settings: bpy.types.PropertyGroup, image_path: str, fps: float) -> Request:
    """POST /v1/generations: the target frame performing the chosen action, at the scene's frame rate."""
    prompt = settings.prompt.strip()
    body = {"action": settings.action_id, "prompt": prompt, "seed": settings.seed, "steps": settings.steps,
            "guidance_scale": settings.guidance, "lora_weight": settings.lora_weight,
            "reweight_scale": settings.reweight_scale if settings.reweighting else None,
            "high_timesteps": settings.transition, "fit": "crop", "step_cache": settings.step_cache,
            "fps": round(fps, 6), "takes": settings.takes, **_gpus(settings)}
    return Request("/v1/generations", body, image_path, "image", f"Generate '{prompt[:40]}'")


def _gpus(settings: bpy.types.PropertyGroup) -> dict[str, int]:
    """`gpus` when above one (a backend that predates it still takes one-GPU requests)."""
    return {"gpus": settings.gpus} if settings.gpus > 1 else {}


def apply_settings(settings: bpy.types.PropertyGroup, stored: dict[str, Any]) -> list[str]:
    """Fill `settings` from a generation's stored fields (an imported strip's); returns the fields used."""
    used = []
    for field, name in GENERATION_SETTINGS.items():
        if field in stored:
            setattr(settings, name, type(getattr(settings, name))(stored[field]))
            used.append(field)
    return used


def action_import(file_path: str, name: str, caption: str) -> Request:
    """POST /v1/actions/import: a published action file, ready at once."""
    return Request("/v1/actions/import", {"name": name, "caption": caption}, file_path, "file", f"Import '{name}'")
