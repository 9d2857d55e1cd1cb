"""Scene settings (`scene.flexiact`), job records and the action list: all saved in the .blend."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty,
                       PointerProperty, StringProperty)

from .connection import CONNECTION
from .requests import EXTRACTION_DEFAULTS, GENERATION_DEFAULTS

ACTIVE_STATUSES = {"SUBMITTING", "QUEUED", "RUNNING"}
#: File paths here may be blend-relative ("//…"); 4.5+ warns about a "//" path unless the property says so (4.2
#: has no such option and no warning).
BLEND_RELATIVE = {"PATH_SUPPORTS_BLEND_RELATIVE"} if bpy.app.version >= (4, 5, 0) else set()


class FlexiActTake(bpy.types.PropertyGroup):
    """One take of a generation: its seed, its downloaded clip and the strip it was imported as."""

    seed: IntProperty(name="Seed", description="The noise seed this take was generated with")
    video_path: StringProperty(name="Clip", subtype="FILE_PATH", options=BLEND_RELATIVE, description="The take's downloaded clip")
    strip_name: StringProperty(name="Strip", description="The Sequencer strip this take was imported as")


class FlexiActJob(bpy.types.PropertyGroup):
    """One backend job as this scene knows it; kept in the .blend so polling resumes after reopening."""

    key: StringProperty(description="Local id, known before the backend answers")
    job_id: StringProperty(name="Job", description="The backend's id of the job")
    kind: EnumProperty(name="Kind", description="What the job does", items=[
        ("EXTRACT", "Extract", "Learns an action from a reference clip"),
        ("GENERATE", "Generate", "Makes a clip of the target frame performing an action")])
    status: EnumProperty(name="Status", description="Where the job stands", items=[
        (s, s.title(), f"The job is {s.lower()}") for s in
        ("SUBMITTING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")])
    phase: StringProperty(name="Phase", description="What the backend is doing now (e.g. training, denoising)")
    progress: FloatProperty(name="Progress", description="How far the job is", min=0.0, max=1.0,
                            subtype="FACTOR")
    eta_s: FloatProperty(name="Time Left", description="The backend's estimate in seconds (-1: unknown)",
                         default=-1.0)
    queue_position: IntProperty(name="Queue Position", description="While queued: 1 starts next; 0 when not "
                                                                   "queued")
    worker: StringProperty(name="Worker", description="The backend worker that runs the job (one per GPU)")
    error: StringProperty(name="Error", description="Why the job failed, in the backend's words")
    note: StringProperty(name="Note", description="Why the queued job cannot start soon, in the backend's "
                                                   "words (e.g. its studio pool is unreachable)")
    action_id: StringProperty(name="Action", description="The action an extraction makes")
    label: StringProperty(name="Label", description="How the job list names the job")
    params_json: StringProperty(description="The request, stored on the imported result")
    model_width: IntProperty(description="The model's frame width when the job was submitted")
    model_height: IntProperty(description="The model's frame height when the job was submitted")
    video_path: StringProperty(name="Result", description="The downloaded clip (blend-relative when the file "
                                                          "is saved)")
    import_mode: StringProperty(default="STRIP", description="How the result is imported: STRIP, PLANE or BOTH")
    frame_start: IntProperty(name="Start Frame", description="The frame the imported result starts at")
    imported: BoolProperty(description="The result has been imported (each result is imported once)")
    strip_name: StringProperty(name="Strip", description="The imported strip")
    plane_name: StringProperty(name="Plane", description="The imported image plane")
    takes: CollectionProperty(type=FlexiActTake, description="Every take of a generation, in seed order")
    take_index: IntProperty(description="The chosen take: its strip is the one unmuted, the plane plays it")
    preview_step: IntProperty(description="The training step of the latest preview (0: none yet)")
    preview_frames: IntProperty(name="Preview Frames", description="Frame count of the latest training preview")
    preview_path: StringProperty(subtype="FILE_PATH", options=BLEND_RELATIVE, description="The latest preview, downloaded")
    finish_requested: BoolProperty(description="Finish Now was pressed: the extraction stops at its next step")


class FlexiActActionItem(bpy.types.PropertyGroup):
    """One entry of the backend's action library, as last listed."""

    action_id: StringProperty(name="Action", description="The backend's id of the action")
    caption: StringProperty(name="Caption", description="What the action's reference clip shows")
    status: StringProperty(name="Status", description="ready, pending or failed")
    progress: FloatProperty(name="Progress", description="1 when the action is ready", min=0.0, max=1.0,
                            subtype="FACTOR")


def _pick_action(self: "FlexiActSettings", _context: bpy.types.Context) -> None:
    """Selecting a row of the library makes it the action to generate with."""
    if 0 <= self.action_index < len(self.actions):
        self.action_id = self.actions[self.action_index].action_id


_PRESET_ITEMS: list[tuple[str, str, str, int]] = []  # Blender reads the strings later: keep them referenced


def _preset_items(_self: "FlexiActSettings", _context: bpy.types.Context | None) -> list[tuple[str, str, str, int]]:
    """Custom, then the backend's own extraction presets (known once it has answered), numbered for get/set."""
    _PRESET_ITEMS[:] = [("CUSTOM", "Custom", "A number of training steps of your own", 0)] + [
        (name.upper(), name.title(), f"The backend's {name} preset: {steps} training steps", i)
        for i, (name, steps) in enumerate(CONNECTION.presets().items(), start=1)]
    return _PRESET_ITEMS


def _get_preset(self: "FlexiActSettings") -> int:
    """The preset whose steps are the ones in use (3,000 is Standard), else Custom."""
    steps = list(CONNECTION.presets().values())
    return steps.index(self.extract_steps) + 1 if self.extract_steps in steps else 0


def _set_preset(self: "FlexiActSettings", value: int) -> None:
    """Choosing a preset sets its steps; Custom keeps the steps as they are."""
    steps = list(CONNECTION.presets().values())
    if 1 <= value <= len(steps):
        self.extract_steps = steps[value - 1]


def _trim_items() -> list[tuple[str, str, str]]:
    return [("SECONDS", "Seconds", "Start and End are seconds of the clip"),
            ("FRAMES", "Frames", "Start and End are frames of the clip, at the clip's own frame rate")]


class FlexiActSettings(bpy.types.PropertyGroup):
    """Everything the sidebar edits; names are relied on by batch scripts."""

    # Target frame
    target_source: EnumProperty(name="Target", description="Where the frame to animate comes from", items=[
        ("CAPTURE", "Capture", "Render the current frame from the active camera"),
        ("IMAGE", "Image", "An image datablock"),
        ("FILE", "File", "An image file")])
    target_image: PointerProperty(name="Image", type=bpy.types.Image,
                                  description="The frame the generated clip starts from")
    target_path: StringProperty(name="Image File", subtype="FILE_PATH", options=BLEND_RELATIVE,
                                description="An image file to use as the target frame")
    capture_engine: EnumProperty(name="Capture Engine", description="How Capture renders the target frame",
                                 items=[("SCENE", "Scene Engine", "Render with the scene's own engine and settings"),
                                        ("WORKBENCH", "Workbench (fast)", "A quick solid-shaded render")],
                                 default="WORKBENCH")

    # Reference clip
    reference_source: EnumProperty(name="Reference", description="Where the motion to learn comes from", items=[
        ("FILE", "File", "A video file"),
        ("STRIP", "Strip", "A movie strip of the Sequencer, with its trim"),
        ("SCENE", "Scene", "The scene's own animation, rendered with Workbench")])
    reference_path: StringProperty(name="Video", subtype="FILE_PATH", options=BLEND_RELATIVE,
                                   description="A video file, a folder of numbered frames or one of its frames")
    reference_strip: StringProperty(name="Strip", description="The Sequencer movie strip to learn from "
                                                              "(its own trim is used)")
    trim_unit: EnumProperty(name="Trim In", description="The unit of the reference trim", items=_trim_items())
    clip_start: FloatProperty(name="Start", min=0.0,
                              description="Trim start, counted from the clip's (or the rendered scene's) "
                                          "first frame (0: beginning)")
    clip_end: FloatProperty(name="End", min=0.0, description="Trim end, counted from the clip's (or the "
                                                             "rendered scene's) first frame (0: the end)")

    # Action
    caption: StringProperty(name="Caption", description="What the reference clip shows, in a short sentence "
                                                        "(it names the action in the library)")
    extract_preset: EnumProperty(name="Preset", description="How long to train: the backend's presets (the one "
                                                            "matching Training Steps is shown)",
                                 items=_preset_items, get=_get_preset, set=_set_preset)
    extract_steps: IntProperty(name="Training Steps", min=1, max=100000, default=EXTRACTION_DEFAULTS["steps"],
                               description="How many training steps the extraction runs (more: closer motion, "
                                           "longer)")
    extract_seed: IntProperty(name="Extraction Seed", min=0, max=2**31 - 1, default=EXTRACTION_DEFAULTS["seed"],
                              description="Random seed of the extraction's training (the same seed and inputs "
                                          "give the same action)")
    preview_every: IntProperty(name="Preview Every", min=0, max=100000, default=500,
                               description="Render a short preview of the action every this many training steps "
                                           "(0: no previews)")
    action_id: StringProperty(name="Action", description="The backend action to generate with")
    actions: CollectionProperty(type=FlexiActActionItem, description="The backend's action library, as last "
                                                                     "listed (Refresh lists it again)")
    action_index: IntProperty(update=_pick_action, description="The selected row of the action library")
    action_file: StringProperty(name="Action File", subtype="FILE_PATH", options=BLEND_RELATIVE,
                                description="A published .pt or safetensors action to import")

    # Generate
    prompt: StringProperty(name="Prompt", description="What the generated clip shows: the target frame's "
                                                      "subject doing the action")
    seed: IntProperty(name="Seed", min=0, max=2**31 - 1, default=GENERATION_DEFAULTS["seed"],
                      description="Random seed of the generation: the same seed gives the same clip")
    steps: IntProperty(name="Quality Steps", min=1, max=1000, default=GENERATION_DEFAULTS["steps"],
                       description="How many denoising steps the generation takes (more: finer detail, slower)")
    guidance: FloatProperty(name="Prompt Strength", min=0.0, max=50.0, default=GENERATION_DEFAULTS["guidance_scale"],
                            description="How strongly the clip follows the prompt (classifier-free guidance)")
    takes: IntProperty(name="Takes", min=1, max=8, default=1,
                       description="How many videos to make, with seeds Seed, Seed+1, …, stacked as strips")
    lora_weight: FloatProperty(name="Keep Target's Look", min=0.0, max=4.0,
                               default=GENERATION_DEFAULTS["lora_weight"],
                               description="How closely the clip keeps the target frame's look and layout (the RefAdapter's "
                                           "weight)")
    reweighting: BoolProperty(name="Stress Motion Early", default=True,
                              description="The action weighs more while the motion is being shaped (the paper's "
                                          "frequency-aware reweighting). Off: as the authors' released script runs")
    reweight_scale: FloatProperty(name="Motion Strength", min=0.0, max=20.0,
                                  default=GENERATION_DEFAULTS["reweight_scale"],
                                  description="How strongly the action's motion is weighted in the early steps")
    transition: FloatProperty(name="Motion Window", min=0.7, max=1.0, default=GENERATION_DEFAULTS["high_timesteps"],
                              description="The noise level (a fraction of the schedule) above which steps shape the motion: "
                                          "0.8 makes the first fifth of the steps the motion steps; from 0.7 to 1 "
                                          "(the extra motion weight fades out by 0.7)")
    gpus: IntProperty(name="GPUs per Job", min=1, max=64, default=1,
                      description="How many GPUs of one backend machine each generation and extraction runs on "
                                  "(faster on a multi-GPU machine or studio pool; the backend refuses more than its "
                                  "largest machine has)")
    step_cache: BoolProperty(name="Faster Detail Steps", default=False,
                             description="Faster: reuse transformer work at steps after the motion window "
                                         "(the steps that carry the motion always compute in full)")

    # Import
    import_mode: EnumProperty(name="Import As", description="How a finished clip comes into the project", items=[
        ("STRIP", "Strip", "A Sequencer movie strip, fitted to the scene's resolution"),
        ("PLANE", "Plane", "An image plane in the 3D scene"),
        ("BOTH", "Both", "A strip and an image plane")])
    plane_fill_camera: BoolProperty(name="Fill Camera View", default=True,
                                    description="Parent the plane to the active camera, filling its view "
                                                "(else at the 3D cursor)")

    jobs: CollectionProperty(type=FlexiActJob, description="This scene's backend jobs, kept in the .blend")
    job_index: IntProperty(description="The selected job")
    last_error: StringProperty(description="The last problem, shown in the panel")


CLASSES = (FlexiActTake, FlexiActJob, FlexiActActionItem, FlexiActSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.flexiact = PointerProperty(type=FlexiActSettings)


def unregister() -> None:
    del bpy.types.Scene.flexiact
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
