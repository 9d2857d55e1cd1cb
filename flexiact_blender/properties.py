"""Scene settings (`scene.flexiact`), job records and the action list: all saved in the .blend."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty,
                       PointerProperty, StringProperty)

from .connection import CONNECTION
from .requests import EXTRACTION_DEFAULTS, GENERATION_DEFAULTS

ACTIVE_STATUSES = {"SUBMITTING", "QUEUED", "RUNNING"}


class FlexiActJob(bpy.types.PropertyGroup):
    """One backend job as this scene knows it; kept in the .blend so polling resumes after reopening."""

    key: StringProperty(description="Local id, known before the backend answers")
    job_id: StringProperty(name="Job")
    kind: EnumProperty(items=[("EXTRACT", "Extract", ""), ("GENERATE", "Generate", "")])
    status: EnumProperty(items=[(s, s.title(), "") for s in
                                ("SUBMITTING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")])
    phase: StringProperty()
    progress: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")
    eta_s: FloatProperty(default=-1.0)
    queue_position: IntProperty(description="While queued: 1 starts next; 0 when not queued")
    worker: StringProperty(description="The backend worker that runs the job (one per GPU)")
    error: StringProperty()
    action_id: StringProperty()
    label: StringProperty()
    params_json: StringProperty(description="The request, stored on the imported result")
    model_width: IntProperty(description="The model's frame width when the job was submitted")
    model_height: IntProperty(description="The model's frame height when the job was submitted")
    video_path: StringProperty(description="The downloaded clip (blend-relative when the file is saved)")
    import_mode: StringProperty(default="STRIP")
    frame_start: IntProperty()
    imported: BoolProperty(description="The result has been imported (each result is imported once)")
    strip_name: StringProperty()
    plane_name: StringProperty()


class FlexiActActionItem(bpy.types.PropertyGroup):
    """One entry of the backend's action library, as last listed."""

    action_id: StringProperty()
    status: StringProperty()
    progress: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")


def _pick_action(self: "FlexiActSettings", _context: bpy.types.Context) -> None:
    """Selecting a row of the library makes it the action to generate with."""
    if 0 <= self.action_index < len(self.actions):
        self.action_id = self.actions[self.action_index].action_id


_PRESET_ITEMS: list[tuple[str, str, str]] = []  # Blender reads the strings later: keep them referenced


def _preset_items(_self: "FlexiActSettings", _context: bpy.types.Context | None) -> list[tuple[str, str, str]]:
    """Custom, then the backend's own extraction presets (known once it has answered)."""
    _PRESET_ITEMS[:] = [("CUSTOM", "Custom", "Set the number of training steps yourself")] + [
        (name.upper(), name.title(), f"The backend's {name} preset: {steps} training steps")
        for name, steps in CONNECTION.presets().items()]
    return _PRESET_ITEMS


def _apply_preset(self: "FlexiActSettings", _context: bpy.types.Context) -> None:
    steps = CONNECTION.presets().get(self.extract_preset.lower())
    if steps is not None:
        self.extract_steps = steps


class FlexiActSettings(bpy.types.PropertyGroup):
    """Everything the sidebar edits; names are relied on by batch scripts."""

    # Target frame
    target_source: EnumProperty(name="Target", items=[
        ("CAPTURE", "Capture", "Render the current frame from the active camera"),
        ("IMAGE", "Image", "An image datablock"),
        ("FILE", "File", "An image file")])
    target_image: PointerProperty(name="Image", type=bpy.types.Image)
    target_path: StringProperty(name="Image File", subtype="FILE_PATH")
    capture_engine: EnumProperty(name="Engine", items=[
        ("SCENE", "Scene Engine", "Render with the scene's own engine and settings"),
        ("WORKBENCH", "Workbench (fast)", "A quick solid-shaded render")], default="WORKBENCH")

    # Reference clip
    reference_source: EnumProperty(name="Reference", items=[
        ("FILE", "File", "A video file"),
        ("STRIP", "Strip", "A movie strip of the Sequencer, with its trim"),
        ("SCENE", "Scene", "The scene's own animation, rendered with Workbench")])
    reference_path: StringProperty(name="Video", subtype="FILE_PATH",
                                   description="A video file, a folder of numbered frames or one of its frames")
    reference_strip: StringProperty(name="Strip")
    trim_unit: EnumProperty(name="Trim In", items=[("SECONDS", "Seconds", ""), ("FRAMES", "Frames", "")])
    clip_start: FloatProperty(name="Start", min=0.0, description="Trim start (0: beginning)")
    clip_end: FloatProperty(name="End", min=0.0, description="Trim end (0: end of the clip)")

    # Action
    caption: StringProperty(name="Caption", description="What the reference clip shows")
    extract_preset: EnumProperty(name="Preset", items=_preset_items, update=_apply_preset)
    extract_steps: IntProperty(name="Steps", min=1, max=100000, default=EXTRACTION_DEFAULTS["steps"])
    action_id: StringProperty(name="Action", description="The backend action to generate with")
    actions: CollectionProperty(type=FlexiActActionItem)
    action_index: IntProperty(update=_pick_action)
    action_file: StringProperty(name="Action File", subtype="FILE_PATH",
                                description="A published .pt or safetensors action to import")

    # Generate
    prompt: StringProperty(name="Prompt")
    seed: IntProperty(name="Seed", min=0, max=2**31 - 1, default=GENERATION_DEFAULTS["seed"])
    steps: IntProperty(name="Steps", min=1, max=1000, default=GENERATION_DEFAULTS["steps"])
    guidance: FloatProperty(name="Guidance", min=0.0, max=50.0, default=GENERATION_DEFAULTS["guidance_scale"])
    lora_weight: FloatProperty(name="RefAdapter Weight", min=0.0, max=4.0,
                               default=GENERATION_DEFAULTS["lora_weight"])
    reweighting: BoolProperty(name="Reweighting", default=True,
                              description="The paper's frequency-aware reweighting: the action weighs more while "
                                          "the motion is being shaped. Off: as the authors' released script runs")
    reweight_scale: FloatProperty(name="Motion Strength", min=0.0, max=20.0,
                                  default=GENERATION_DEFAULTS["reweight_scale"])
    transition: FloatProperty(name="Transition", min=0.01, max=1.0, default=GENERATION_DEFAULTS["high_timesteps"],
                              description="Where the high-noise (motion) timesteps end")
    step_cache: BoolProperty(name="Step Cache", default=False,
                             description="Faster: reuse transformer work at steps after the motion window "
                                         "(the steps that carry the motion always compute in full)")

    # Import
    import_mode: EnumProperty(name="Import As", items=[
        ("STRIP", "Strip", "A Sequencer movie strip"),
        ("PLANE", "Plane", "An image plane in the 3D scene"),
        ("BOTH", "Both", "")])
    plane_fill_camera: BoolProperty(name="Fill Camera View", default=True,
                                    description="Place the plane in front of the active camera, filling its view")

    jobs: CollectionProperty(type=FlexiActJob)
    job_index: IntProperty()
    last_error: StringProperty(description="The last problem, shown in the panel")


CLASSES = (FlexiActJob, FlexiActActionItem, FlexiActSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.flexiact = PointerProperty(type=FlexiActSettings)


def unregister() -> None:
    del bpy.types.Scene.flexiact
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
