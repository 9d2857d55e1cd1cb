"""Fixtures for tests that run inside real Blender (the bpy module of one venv), launched by test_blender.py.

The add-on is installed from the built zip through Blender's own extension installer into a throwaway
user-resources folder, exactly as a user would install it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

if importlib.util.find_spec("bpy") is None:  # the main venv's pytest: these run only inside a bpy venv
    collect_ignore_glob = ["test_*.py"]
else:
    # Before bpy starts: the add-on is installed into a throwaway user folder, never the real one (the outer
    # test gives one inside its tmp_path; run alone, the folder made here is removed at exit).
    if "BLENDER_USER_RESOURCES" not in os.environ:
        os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="flexiact-blender-user-")
        atexit.register(shutil.rmtree, os.environ["BLENDER_USER_RESOURCES"], ignore_errors=True)
    import bpy

ROOT = Path(__file__).resolve().parents[2]
MODULE = "bl_ext.user_default.flexiact"


def _zip_path() -> Path:
    if os.environ.get("FLEXIACT_EXTENSION_ZIP"):
        return Path(os.environ["FLEXIACT_EXTENSION_ZIP"])
    zips = sorted((ROOT / "dist").glob("flexiact-*.zip"))
    assert zips, "No extension zip: run `make extension` first"
    return zips[-1]


@pytest.fixture(scope="session")
def addon() -> Iterator[Any]:
    """Install and enable the extension zip; at the end, disable it and check no timer is left."""
    result = bpy.ops.extensions.package_install_files(filepath=str(_zip_path()), repo="user_default",
                                                      enable_on_install=True)
    assert result == {"FINISHED"}
    mod = sys.modules[MODULE]
    # results of unsaved files go to a folder of this run, never the user's home
    bpy.context.preferences.addons[MODULE].preferences.unsaved_dir = tempfile.mkdtemp(
        prefix="unsaved-", dir=os.environ["BLENDER_USER_RESOURCES"])
    yield mod
    mod.runner.remove_timer()
    bpy.ops.preferences.addon_disable(module=MODULE)
    assert not bpy.app.timers.is_registered(mod.runner.timer_tick)


def point_at_test_backend(addon: Any) -> Any:
    """Preferences aimed at the test backend (or a dead port when there is none); returns them."""
    p = bpy.context.preferences.addons[MODULE].preferences
    p.backend_url = os.environ.get("FLEXIACT_TEST_BACKEND_URL", "http://127.0.0.1:9")
    p.token = os.environ.get("FLEXIACT_TEST_TOKEN", "")
    addon.connection.CONNECTION.forget()
    return p


@pytest.fixture()
def prefs(addon: Any) -> Iterator[Any]:
    """The add-on preferences, pointed at the test backend, restored afterwards."""
    p = bpy.context.preferences.addons[MODULE].preferences
    saved = (p.backend_url, p.token)
    point_at_test_backend(addon)
    yield p
    p.backend_url, p.token = saved
    addon.connection.CONNECTION.forget()


@pytest.fixture()
def backend(prefs: Any) -> Any:
    """The real backend process started by the outer test (tiny model)."""
    if not os.environ.get("FLEXIACT_TEST_BACKEND_URL"):
        pytest.skip("no backend: FLEXIACT_TEST_BACKEND_URL is not set")
    return prefs


def make_scene(fps: int = 24, fps_base: float = 1.0, frames: int = 12) -> bpy.types.Scene:
    """A fresh file with a camera looking at an animated cube: the smallest 'shot'."""
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = fps, fps_base
    scene.frame_start, scene.frame_end, scene.frame_current = 1, frames, 1
    mesh = bpy.data.meshes.new("Cube")
    s = 0.5
    verts = [(x, y, z) for x in (-s, s) for y in (-s, s) for z in (-s, s)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    mesh.from_pydata(verts, [], faces)
    cube = bpy.data.objects.new("Figure", mesh)
    scene.collection.objects.link(cube)
    cube.location = (-1.0, 0.0, 0.0)
    cube.keyframe_insert("location", frame=1)
    cube.location = (1.0, 0.0, 0.5)
    cube.keyframe_insert("location", frame=frames)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location = (0.0, -6.0, 0.5)
    cam.rotation_euler = (1.5707963, 0.0, 0.0)
    scene.camera = cam
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 4
    scene.cycles.device = "CPU"
    return scene


def make_video(path: Path, fps: str, frames: int, size: str = "96x64") -> Path:
    """A small H.264 test clip made by ffmpeg (FLEXIACT_FFMPEG, given by the outer test)."""
    ffmpeg = os.environ.get("FLEXIACT_FFMPEG", "ffmpeg")
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}",
                    "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)
    return path


def render_state(scene: bpy.types.Scene) -> tuple[Any, ...]:
    r = scene.render
    return (r.engine, r.resolution_x, r.resolution_y, r.resolution_percentage, r.filepath,
            r.image_settings.file_format, r.image_settings.color_mode, r.film_transparent, r.use_border,
            r.use_crop_to_border, r.border_min_x, r.border_max_y, r.pixel_aspect_x, r.pixel_aspect_y)


@pytest.fixture(scope="session")
def action_id(addon: Any) -> str:
    """An action extracted (a few steps) from the scene's own animation, through the operator: 18 frames at 24 fps,
    0.75 s, shorter than the tiny model's 1.125 s clip, so it is learned (and plays back) at its real speed."""
    if not os.environ.get("FLEXIACT_TEST_BACKEND_URL"):
        pytest.skip("no backend: FLEXIACT_TEST_BACKEND_URL is not set")
    point_at_test_backend(addon)
    scene = make_scene(frames=18)
    s = scene.flexiact
    s.reference_source = "SCENE"
    s.caption = "a cube slides to the right"
    s.extract_preset = "CUSTOM"
    s.extract_steps = 2
    before = render_state(scene)
    assert bpy.ops.flexiact.extract_action() == {"FINISHED"}
    assert render_state(scene) == before  # the Workbench clip render put every setting back
    record = s.jobs[-1]
    assert record.kind == "EXTRACT" and record.status == "SUCCEEDED" and record.progress == 1.0
    assert s.action_id and s.action_id == record.action_id
    return s.action_id
