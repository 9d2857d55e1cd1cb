"""Importing a clip as a Sequencer strip and an image plane, at scene rates including 29.97, and reopening."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpy
import pytest

from conftest import make_scene, make_video

MODEL_SECONDS = 6.125


def _strips(scene: bpy.types.Scene) -> Any:
    editor = scene.sequence_editor
    return editor.strips if hasattr(editor, "strips") else editor.sequences


@pytest.mark.parametrize("fps,fps_base,rate", [(24, 1.0, "24"), (30, 1.001, "30000/1001")])
def test_import_both_lasts_model_duration_and_survives_reopen(addon: Any, tmp_path: Path, fps: int,
                                                               fps_base: float, rate: str) -> None:
    scene = make_scene(fps, fps_base)
    scene_fps = fps / fps_base
    expected = MODEL_SECONDS * scene_fps
    clip = make_video(tmp_path / "result.mp4", rate, round(expected))
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "shot.blend"))
    scene = bpy.context.scene
    scene.frame_current = 10
    scene.flexiact.import_mode = "BOTH"
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}

    record = scene.flexiact.jobs[-1]
    assert record.imported and record.strip_name and record.plane_name
    strip = _strips(scene)[record.strip_name]
    assert strip.frame_final_start == 10
    assert abs(strip.frame_final_duration - expected) <= 1.0
    assert strip.channel == 1
    assert strip["flexiact_source"] == str(clip)

    plane = bpy.data.objects[record.plane_name]
    tex = next(n for n in plane.active_material.node_tree.nodes if n.type == "TEX_IMAGE")
    assert tex.image.source == "MOVIE"
    assert tex.image_user.frame_start == 10 and tex.image_user.use_auto_refresh
    assert abs(tex.image_user.frame_duration - expected) <= 1.0
    dims = plane.dimensions
    assert abs(dims.x / dims.y - 96 / 64) < 1e-3  # the clip's aspect
    # in front of the camera: the camera looks down its -Z axis at the plane's centre
    local = scene.camera.matrix_world.inverted() @ plane.matrix_world.translation
    assert local.z < 0 and abs(local.x) < 1e-4 and abs(local.y) < 1e-4

    # a second import of another clip goes to the next free channel over the same frames
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    assert _strips(scene)[scene.flexiact.jobs[-1].strip_name].channel == 2

    bpy.ops.wm.save_mainfile()
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "shot.blend"))
    scene = bpy.context.scene
    assert len(scene.flexiact.jobs) == 2
    assert all(r.imported for r in scene.flexiact.jobs)
    assert len(_strips(scene)) == 2  # reopening never imports again
    assert scene.flexiact.jobs[0].plane_name in bpy.data.objects
    assert not addon.runner.busy()


def test_import_missing_file_is_reported(addon: Any, tmp_path: Path) -> None:
    scene = make_scene()
    with pytest.raises(RuntimeError, match="Clip not found"):
        bpy.ops.flexiact.import_result(filepath=str(tmp_path / "nope.mp4"))
    assert "Clip not found" in scene.flexiact.last_error


def test_import_without_a_finished_job_is_reported(addon: Any) -> None:
    make_scene()
    with pytest.raises(RuntimeError, match="No finished generation"):
        bpy.ops.flexiact.import_result()
