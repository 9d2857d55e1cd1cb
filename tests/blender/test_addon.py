"""Install, registration, preferences, polls, panel drawing and errors that need no backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpy
import pytest

from conftest import MODULE, make_scene, make_video

OPERATORS = ("capture_target", "extract_action", "generate", "import_result", "cancel_job", "test_connection",
             "finish_job", "import_preview", "switch_take", "use_settings")


class Recorder:
    """A stand-in for UILayout that records what a panel draws (labels, props, operators, progress bars)."""

    def __init__(self, log: list[tuple[str, Any]] | None = None) -> None:
        self.log = [] if log is None else log

    def _child(self, *_args: Any, **_kwargs: Any) -> "Recorder":
        return Recorder(self.log)

    row = column = box = split = _child

    def label(self, text: str = "", **_kwargs: Any) -> None:
        self.log.append(("label", text))

    def prop(self, data: Any, name: str, **_kwargs: Any) -> None:
        assert name in data.bl_rna.properties, name  # a typo in a panel fails here
        self.log.append(("prop", name))

    def prop_search(self, data: Any, name: str, search_data: Any, search_name: str, **_kwargs: Any) -> None:
        assert name in data.bl_rna.properties and hasattr(search_data, search_name)
        self.log.append(("prop_search", search_name))

    def operator(self, idname: str, **_kwargs: Any) -> Any:
        module, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, module), name), idname
        self.log.append(("operator", idname))
        return type("OperatorProperties", (), {})()

    def progress(self, factor: float = 0.0, type: str = "BAR", text: str = "") -> None:
        self.log.append(("progress", (factor, text)))

    def template_list(self, listtype: str, *_args: Any, **_kwargs: Any) -> None:
        assert hasattr(bpy.types, listtype), listtype
        self.log.append(("template_list", listtype))

    def template_ID(self, data: Any, name: str, **_kwargs: Any) -> None:
        self.log.append(("template_ID", name))

    def template_icon(self, icon_value: int = 0, **_kwargs: Any) -> None:
        self.log.append(("template_icon", icon_value))

    def kinds(self, kind: str) -> list[Any]:
        return [value for k, value in self.log if k == kind]


def draw_all(space: str = "view3d") -> Recorder:
    """Run every FlexiAct panel's real draw() for the current context into one Recorder."""
    rec = Recorder()
    panels = [getattr(bpy.types, name) for name in dir(bpy.types) if name.startswith(f"FLEXIACT_PT_{space}_")]
    assert len(panels) == 7
    for panel in panels:
        assert panel.poll(bpy.context)
        panel.draw(type("Panel", (), {"layout": rec})(), bpy.context)
    return rec


def test_installed_as_extension(addon: Any) -> None:
    assert MODULE in bpy.context.preferences.addons
    assert Path(addon.__file__).parent.name == "flexiact"
    user = Path(addon.preferences.user_dir())
    assert user.is_dir() and Path(addon.__file__).parent not in user.parents


def test_operators_and_settings_have_the_documented_names(addon: Any) -> None:
    for name in OPERATORS:
        assert getattr(bpy.ops.flexiact, name).get_rna_type().identifier
    make_scene()
    props = bpy.context.scene.flexiact.bl_rna.properties
    for name in ("reference_source", "reference_path", "reference_strip", "clip_start", "clip_end", "caption",
                 "extract_steps", "prompt", "seed", "steps", "import_mode", "action_id", "takes", "preview_every"):
        assert name in props, name
    assert {i.identifier for i in props["reference_source"].enum_items} == {"FILE", "STRIP", "SCENE"}
    assert {i.identifier for i in props["import_mode"].enum_items} == {"STRIP", "PLANE", "BOTH"}
    prefs = bpy.context.preferences.addons[MODULE].preferences
    assert prefs.bl_rna.properties["backend_url"].default == "http://127.0.0.1:8765"
    assert prefs.bl_rna.properties["token"].subtype == "PASSWORD"


def test_polls(addon: Any) -> None:
    scene = make_scene()
    assert bpy.ops.flexiact.capture_target.poll()
    assert not bpy.ops.flexiact.generate.poll()  # no action yet
    assert not bpy.ops.flexiact.cancel_job.poll()  # nothing running
    scene.flexiact.action_id = "00000000-0000-0000-0000-000000000000"
    assert bpy.ops.flexiact.generate.poll()
    scene.camera = None
    assert not bpy.ops.flexiact.capture_target.poll()


@pytest.mark.parametrize("space", ["view3d", "sequencer"])
def test_panels_draw_every_state(addon: Any, tmp_path: Path, space: str) -> None:
    scene = make_scene()
    s = scene.flexiact
    rec = draw_all(space)
    assert "flexiact.capture_target" in rec.kinds("operator")
    assert "flexiact.extract_action" in rec.kinds("operator")
    assert "flexiact.generate" in rec.kinds("operator")
    assert "No jobs yet" in rec.kinds("label")
    assert any("rendered with Workbench" in t for t in rec.kinds("label")) is False  # FILE source by default

    s.reference_source = "SCENE"
    assert any("rendered with Workbench" in t for t in draw_all(space).kinds("label"))
    connection = addon.connection.CONNECTION
    connection.update({"model": {"frames": 9, "fps": 8.0}})  # a backend serving the tiny model: 1.125 s clips
    try:
        assert "Learned at real speed: results last 0.50 s" in draw_all(space).kinds("label")  # 12 frames at 24 fps
        scene.frame_end = scene.frame_start + 47
        assert "Learned from windows of 1.1 s: results last 1.1 s" in draw_all(space).kinds("label")
    finally:
        connection.forget()
    assert not any(t.startswith("Learned") for t in draw_all(space).kinds("label"))  # unknown model: no claim
    s.reference_source = "STRIP"
    assert any("Sequencer is empty" in t for t in draw_all(space).kinds("label"))
    clip = make_video(tmp_path / "ref.mp4", "24", 48)
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    s.reference_strip = s.jobs[-1].strip_name
    rec = draw_all(space)
    assert "strips" in rec.kinds("prop_search") or "sequences" in rec.kinds("prop_search")
    assert any(t.startswith("Trimmed: 48 frames") for t in rec.kinds("label"))

    running = addon.jobs.new_record(scene, "EXTRACT", "Extract 'wave'", {})
    running.status, running.job_id, running.phase, running.progress, running.eta_s = \
        "RUNNING", "job-1", "training", 0.25, 75
    queued = addon.jobs.new_record(scene, "GENERATE", "Generate 'y'", {})
    addon.jobs.apply_job(scene, queued, {"id": "job-2", "status": "queued", "phase": "queued", "progress": 0,
                                         "eta_s": None, "queue_position": 2, "worker": None})
    addon.jobs.apply_job(scene, running, {"id": "job-1", "status": "running", "phase": "training",
                                          "progress": 0.25, "eta_s": 75, "queue_position": None, "worker": "worker-1"})
    failed = addon.jobs.new_record(scene, "GENERATE", "Generate 'x'", {})
    failed.status, failed.error = "FAILED", "the action was deleted"
    s.last_error = "Generate 'x' failed: the action was deleted"
    s.target_source, s.import_mode = "FILE", "BOTH"
    rec = draw_all(space)
    assert (0.25, "Running on worker-1 · training · ETA 1:15") in rec.kinds("progress")
    assert (0.0, "Queued · #2 in queue · queued") in rec.kinds("progress")
    assert "flexiact.cancel_job" in rec.kinds("operator")
    assert "flexiact.copy_report" in rec.kinds("operator")
    assert "the action was deleted" in rec.kinds("label")
    assert s.last_error in rec.kinds("label")
    assert "plane_fill_camera" in rec.kinds("prop") and "target_path" in rec.kinds("prop")
    assert "reweighting" in rec.kinds("prop") and "reweight_scale" in rec.kinds("prop")


def test_preferences_draw(addon: Any) -> None:
    prefs = bpy.context.preferences.addons[MODULE].preferences
    rec = Recorder()

    class Stand:  # the real preferences, with the recording layout in place of Blender's
        layout = rec

        def __getattr__(self, name: str) -> Any:
            return getattr(prefs, name)

    type(prefs).draw(Stand(), bpy.context)
    assert {"flexiact.test_connection", "flexiact.backend_start", "flexiact.backend_stop"} <= set(
        rec.kinds("operator"))
    assert "Stopped" in rec.kinds("label")


def test_backend_down_is_reported(prefs: Any) -> None:
    scene = make_scene()
    prefs.backend_url = "http://127.0.0.1:9"
    with pytest.raises(RuntimeError, match="Cannot reach the FlexiAct backend"):
        bpy.ops.flexiact.test_connection()
    assert __import__(MODULE, fromlist=["connection"]).connection.CONNECTION.summary.startswith("Failed")
    assert "Cannot reach" in scene.flexiact.last_error
    assert any("Cannot reach" in t for t in draw_all().kinds("label"))
    with pytest.raises(RuntimeError, match="Cannot reach"):
        bpy.ops.flexiact.capture_target()


def test_remote_backend_needs_online_access(prefs: Any) -> None:
    make_scene()
    prefs.backend_url = "http://192.0.2.1:8765"
    if bpy.app.online_access:
        pytest.skip("online access is on in this Blender")
    with pytest.raises(RuntimeError, match="Online Access"):
        bpy.ops.flexiact.test_connection()
    assert "Remote backend needs Online Access" in draw_all().kinds("label")


def test_missing_inputs_are_reported(prefs: Any, tmp_path: Path) -> None:
    scene = make_scene()
    s = scene.flexiact
    with pytest.raises(RuntimeError, match="caption"):
        bpy.ops.flexiact.extract_action()
    s.caption = "a wave"
    s.reference_path = str(tmp_path / "missing.mp4")
    jobs_before = len(s.jobs)
    s.action_id = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(RuntimeError, match="prompt"):
        bpy.ops.flexiact.generate()
    s.prompt = "a wave"
    s.target_source, s.target_path = "FILE", str(tmp_path / "missing.png")
    with pytest.raises(RuntimeError, match="Target image not found"):
        bpy.ops.flexiact.generate()
    assert "Target image not found" in s.last_error
    assert len(s.jobs) == jobs_before  # nothing was submitted


def test_missing_reference_file_is_reported(prefs: Any, tmp_path: Path) -> None:
    """Needs the backend's health for the model size only when the scene is rendered; a file needs none."""
    scene = make_scene()
    s = scene.flexiact
    s.caption = "a wave"
    s.reference_source, s.reference_path = "FILE", str(tmp_path / "missing.mp4")
    connection = __import__(MODULE, fromlist=["connection"]).connection
    connection.CONNECTION.update({"model": {"width": 96, "height": 64}})  # as left by a successful connection
    with pytest.raises(RuntimeError, match="Reference video not found"):
        bpy.ops.flexiact.extract_action()


def test_reference_trim_from_strip_and_frames(addon: Any, tmp_path: Path) -> None:
    """A strip's trim and a file trim given in frames both become seconds of the source clip."""
    scene = make_scene()
    s = scene.flexiact
    clip = make_video(tmp_path / "ref.mp4", "24", 48)
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    strip = addon.reference.strips_of(scene)[s.jobs[-1].strip_name]
    strip.frame_offset_start = 12
    strip.frame_offset_end = 6
    s.reference_source, s.reference_strip = "STRIP", strip.name
    ref = addon.reference.resolve(scene, 96, 64, str(tmp_path))
    assert Path(ref.path) == clip
    assert abs(ref.start_s - 0.5) < 1e-6 and abs(ref.end_s - 1.75) < 1e-6

    s.reference_source, s.reference_path, s.trim_unit = "FILE", str(clip), "FRAMES"
    s.clip_start, s.clip_end = 6, 30
    ref = addon.reference.resolve(scene, 96, 64, str(tmp_path))
    assert abs(ref.start_s - 0.25) < 1e-6 and abs(ref.end_s - 1.25) < 1e-6
    s.clip_start, s.clip_end = 40, 30
    with pytest.raises(addon.reference.ReferenceError, match="is not after the start"):
        addon.reference.resolve(scene, 96, 64, str(tmp_path))


def test_reference_strip_missing_is_reported(addon: Any, tmp_path: Path) -> None:
    scene = make_scene()
    scene.flexiact.reference_source, scene.flexiact.reference_strip = "STRIP", "gone"
    with pytest.raises(addon.reference.ReferenceError, match="No movie or image-sequence strip named 'gone'"):
        addon.reference.resolve(scene, 96, 64, str(tmp_path))
