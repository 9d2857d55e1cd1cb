"""What an animator meets in the first hour (issue 16): explained controls, where results and failures go."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import bpy
import pytest

from conftest import MODULE, ROOT, make_scene, make_video
from test_addon import draw_all

#: Blender's own members of every struct, never shown to a user.
HIDDEN = {"rna_type", "bl_idname"}


def _property_groups(addon: Any) -> list[Any]:
    prefs = bpy.context.preferences.addons[MODULE].preferences
    ops = [getattr(bpy.ops.flexiact, name).get_rna_type() for name in dir(bpy.ops.flexiact)]
    return [*(cls.bl_rna for cls in addon.properties.CLASSES), prefs.bl_rna, *ops]


def test_every_property_has_a_description_and_settings_have_distinct_labels(addon: Any) -> None:
    missing = [f"{rna.identifier}.{p.identifier}" for rna in _property_groups(addon)
               for p in rna.properties if p.identifier not in HIDDEN and p.identifier != "name"
               and not p.description.strip()]
    assert not missing, missing
    settings = addon.properties.FlexiActSettings.bl_rna.properties
    labels = [p.name for p in settings if p.identifier != "rna_type" and p.name]
    assert len(labels) == len(set(labels)), sorted(label for label in labels if labels.count(label) > 1)


def _pixels(path: Path) -> list[float]:
    image = bpy.data.images.load(str(path))
    try:
        return list(image.pixels)
    finally:
        bpy.data.images.remove(image)


def _render(scene: bpy.types.Scene, path: Path) -> list[float]:
    bpy.ops.render.render(write_still=False, scene=scene.name)
    bpy.data.images["Render Result"].save_render(filepath=str(path), scene=scene)
    return _pixels(path)


def _strips(scene: bpy.types.Scene) -> Any:
    editor = scene.sequence_editor
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def test_strip_fits_a_1080p_scene_and_the_shot_still_renders_its_camera(addon: Any, tmp_path: Path) -> None:
    scene = make_scene()
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 5
    scene.frame_set(3)
    before = _render(scene, tmp_path / "before.png")
    clip = make_video(tmp_path / "result.mp4", "24", 24, size="96x64")
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    strip = _strips(scene)[scene.flexiact.jobs[-1].strip_name]
    # fitted: as large as the 1920×1080 frame allows with the clip's 3:2 aspect, i.e. 1620×1080
    assert abs(strip.transform.scale_x * 96 - 1620) < 1 and abs(strip.transform.scale_y * 64 - 1080) < 1
    assert strip.frame_final_start == 3 and strip.channel == 1
    assert not scene.render.use_sequencer  # documented choice: the shot's F12 stays the camera's
    assert _render(scene, tmp_path / "after.png") == before
    scene.render.use_sequencer = True  # the check can fail: with the Sequencer on, F12 shows the strip
    assert _render(scene, tmp_path / "sequencer.png") != before


def test_plane_follows_the_camera_and_stays_out_of_the_next_capture(addon: Any, tmp_path: Path) -> None:
    scene = make_scene()
    cam = scene.camera
    cam.keyframe_insert("location", frame=1)
    cam.location.x += 3.0
    cam.keyframe_insert("location", frame=10)
    scene.frame_set(1)
    first = addon.capture.capture_target(scene, 64, 48, "WORKBENCH", str(tmp_path))
    scene.flexiact.import_mode = "PLANE"
    clip = make_video(tmp_path / "result.mp4", "24", 24)
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    plane = bpy.data.objects[scene.flexiact.jobs[-1].plane_name]
    assert plane.parent == cam
    places = []
    for frame in (1, 10):
        scene.frame_set(frame)
        local = cam.matrix_world.inverted() @ plane.matrix_world.translation
        assert abs(local.z + addon.importers.PLANE_DISTANCE) < 1e-4 and abs(local.x) < 1e-4
        places.append(plane.matrix_world.translation.copy())
    assert (places[1] - places[0]).length > 2.9  # it moved with the camera
    # over the model's frame of the shot: as high as the 16:9 view (the 3:2 clip is narrower), as the capture is
    view_w, view_h = addon.framing.camera_view_size(scene, cam, addon.importers.PLANE_DISTANCE)
    assert abs(plane.dimensions.y - view_h) < 1e-4 and plane.dimensions.x < view_w
    scene.frame_set(1)
    again = addon.capture.capture_target(scene, 64, 48, "WORKBENCH", str(tmp_path))
    assert _pixels(Path(again)) == _pixels(Path(first))  # the plane is not in the capture
    assert not plane.hide_render  # and renders again afterwards


def test_trims_count_the_clips_own_frames(addon: Any, tmp_path: Path) -> None:
    """A 12 fps clip in a 24 fps scene: frame 6 of the clip is 0.5 s, whatever the scene's rate."""
    scene = make_scene(fps=24)
    s = scene.flexiact
    s.reference_source, s.reference_path = "FILE", str(make_video(tmp_path / "ref.mp4", "12", 36))
    s.trim_unit, s.clip_start, s.clip_end = "FRAMES", 6, 18
    ref = addon.reference.resolve(scene, 96, 64, str(tmp_path))
    assert abs(ref.start_s - 0.5) < 1e-6 and abs(ref.end_s - 1.5) < 1e-6
    s.trim_unit, s.clip_start, s.clip_end = "SECONDS", 0.25, 1.0
    ref = addon.reference.resolve(scene, 96, 64, str(tmp_path))
    assert abs(ref.start_s - 0.25) < 1e-6 and abs(ref.end_s - 1.0) < 1e-6


def test_scene_reference_can_be_trimmed(addon: Any, tmp_path: Path) -> None:
    scene = make_scene(fps=24, frames=24)
    s = scene.flexiact
    s.reference_source, s.trim_unit, s.clip_start, s.clip_end = "SCENE", "FRAMES", 6, 18
    ref = addon.reference.resolve(scene, 64, 48, str(tmp_path))
    assert abs(ref.start_s - 0.25) < 1e-6 and abs(ref.end_s - 0.75) < 1e-6


def test_job_list_clear_finished_and_remove(addon: Any) -> None:
    scene = make_scene()
    s = scene.flexiact
    statuses = ["SUCCEEDED", "FAILED", "RUNNING", "CANCELLED", "QUEUED"]
    for status in statuses:
        addon.jobs.new_record(scene, "GENERATE", status.lower(), {}).status = status
    running = next(r.key for r in s.jobs if r.status == "RUNNING")
    with pytest.raises(RuntimeError, match="still running"):
        bpy.ops.flexiact.delete_job(key=running)
    assert bpy.ops.flexiact.delete_job(key=s.jobs[0].key) == {"FINISHED"}
    assert [r.status for r in s.jobs] == statuses[1:]
    assert bpy.ops.flexiact.clear_finished_jobs() == {"FINISHED"}
    assert [r.status for r in s.jobs] == ["RUNNING", "QUEUED"]
    with pytest.raises(RuntimeError, match="No downloaded clip"):
        bpy.ops.flexiact.show_result(key=running)
    rec = draw_all()
    assert "flexiact.clear_finished_jobs" in rec.kinds("operator")


def test_no_backend_shows_how_to_start_one(prefs: Any) -> None:
    """Start finds flexiact-backend in the configured environment (Blender's PATH rarely has it), or says where to
    set it; the command serves the Backend URL's port."""
    make_scene()
    prefs.backend_url, prefs.launcher_command, prefs.backend_env = "http://127.0.0.1:9", "", str(ROOT / "missing")
    with pytest.raises(RuntimeError, match="Backend URL: Cannot reach"):
        bpy.ops.flexiact.test_connection()
    assert any("flexiact-backend was not found" in text for text in draw_all().kinds("label"))
    with pytest.raises(RuntimeError, match="Backend Environment"):
        bpy.ops.flexiact.backend_start()
    prefs.backend_env = str(ROOT / ".venv")
    rec = draw_all()
    command = f"{ROOT / '.venv' / 'bin' / 'flexiact-backend'} serve --tiny --port 9"
    assert command in rec.kinds("label")
    assert {"flexiact.copy_command", "flexiact.backend_start"} <= set(rec.kinds("operator"))
    assert bpy.ops.flexiact.copy_command() == {"FINISHED"}
    prefs.backend_env = ""


def test_start_says_port_in_use_at_once(prefs: Any) -> None:
    """A port held by another program is refused before anything is launched."""
    make_scene()
    with socket.socket() as other:  # listens, never answers HTTP
        other.bind(("127.0.0.1", 0))
        other.listen()
        prefs.backend_url = f"127.0.0.1:{other.getsockname()[1]}"  # no scheme: http:// is added
        assert prefs.backend_url.startswith("http://127.0.0.1:")
        prefs.launcher_command = "false"
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="is in use by another program"):
            bpy.ops.flexiact.backend_start()
        assert time.monotonic() - start < 10
    prefs.launcher_command = ""
