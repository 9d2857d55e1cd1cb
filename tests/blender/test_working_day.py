"""An animator's working day (issue 23): shots that line up, takes that survive a save, a panel that tells the
truth. Against the real tiny backend where a job is needed; everything in one Blender session."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import bpy
import pytest

from conftest import make_scene, make_video
from test_addon import draw_all


def _strips(scene: bpy.types.Scene) -> Any:
    editor = scene.sequence_editor
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def _load_pixels(path: Path) -> tuple[list[float], int, int]:
    image = bpy.data.images.load(str(path))
    try:
        return list(image.pixels), image.size[0], image.size[1]
    finally:
        bpy.data.images.remove(image)


def _marker_x(path: Path) -> tuple[float, int]:
    """(x of the red marker's centre, image width) in a rendered image: the mean x of its reddest pixels."""
    pixels, width, height = _load_pixels(path)
    xs = [i % width for i in range(width * height)
          if pixels[4 * i] > 0.5 and pixels[4 * i + 1] < 0.25 and pixels[4 * i + 2] < 0.25]
    assert xs, f"no marker in {path}"
    return sum(xs) / len(xs), width


def _marker_y(path: Path) -> float:
    pixels, width, height = _load_pixels(path)
    ys = [i // width for i in range(width * height)
          if pixels[4 * i] > 0.5 and pixels[4 * i + 1] < 0.25 and pixels[4 * i + 2] < 0.25]
    return sum(ys) / len(ys)


def _marker_scene(width: int, height: int) -> bpy.types.Scene:
    """A Workbench shot with a red marker at a known world point off the frame's centre, on grey."""
    scene = make_scene()
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.display.shading.light = "FLAT"
    scene.display.shading.color_type = "OBJECT"
    scene.display.shading.background_type = "WORLD"
    scene.world = bpy.data.worlds.new("Grey")
    scene.world.color = (0.2, 0.2, 0.2)
    scene.view_settings.view_transform = "Standard"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    bpy.data.objects["Figure"].hide_render = True
    mesh = bpy.data.meshes.new("Marker")
    s = 0.15
    mesh.from_pydata([(-s, 0, -s), (s, 0, -s), (s, 0, s), (-s, 0, s)], [], [(0, 1, 2, 3)])
    marker = bpy.data.objects.new("Marker", mesh)
    marker.color = (1.0, 0.0, 0.0, 1.0)
    marker.location = (0.9, 0.0, 0.8)  # right of and above the centre
    scene.collection.objects.link(marker)
    return scene


def _render(scene: bpy.types.Scene, path: Path) -> Path:
    bpy.ops.render.render(write_still=False, scene=scene.name)
    bpy.data.images["Render Result"].save_render(filepath=str(path), scene=scene)
    return path


def _still_clip(image: Path, out: Path, fps: str = "24", frames: int = 4) -> Path:
    """The captured frame as a short clip: what a perfect model returns for a still target."""
    ffmpeg = os.environ.get("FLEXIACT_FFMPEG", "ffmpeg")
    subprocess.run([ffmpeg, "-v", "error", "-y", "-loop", "1", "-i", str(image), "-r", fps, "-frames:v",
                    str(frames), "-pix_fmt", "yuv444p", "-c:v", "libx264", "-qp", "0", str(out)], check=True)
    return out


@pytest.mark.parametrize("width,height", [(1920, 1080), (239, 100), (160, 120), (90, 160)])
def test_strip_and_capture_line_up_with_the_camera(addon: Any, tmp_path: Path, width: int, height: int) -> None:
    """16:9, 2.39:1, 4:3 and portrait: a marker at a known world point lands on the same pixel in the camera's
    render and in the Sequencer's render of the imported strip (within 2% of the width)."""
    if width == 1920:
        width, height = 192, 108  # 16:9, small enough to render quickly on a shared CPU
    scene = _marker_scene(width, height)
    camera_x, _w = _marker_x(_render(scene, tmp_path / "camera.png"))
    camera_y = _marker_y(tmp_path / "camera.png")
    target = Path(addon.capture.capture_target(scene, 96, 64, "WORKBENCH", str(tmp_path)))
    _pixels, cw, ch = _load_pixels(target)
    assert (cw, ch) == (96, 64)
    clip = _still_clip(target, tmp_path / "result.mp4")
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    scene.render.use_sequencer = True  # F12 now renders the Sequencer: the strip alone
    strip_x, _w = _marker_x(_render(scene, tmp_path / "strip.png"))
    strip_y = _marker_y(tmp_path / "strip.png")
    assert abs(strip_x - camera_x) <= 0.02 * width, (camera_x, strip_x)
    assert abs(strip_y - camera_y) <= 0.02 * width, (camera_y, strip_y)


def test_capture_follows_sensor_fit_and_pixel_aspect(addon: Any, tmp_path: Path) -> None:
    """A vertical sensor fit and non-square pixels: the strip still sits over the marker."""
    scene = _marker_scene(160, 90)
    scene.camera.data.sensor_fit = "VERTICAL"
    scene.render.pixel_aspect_x = 2.0  # anamorphic: every pixel twice as wide as high
    scene.render.resolution_x = 80
    camera_x, _w = _marker_x(_render(scene, tmp_path / "camera.png"))
    target = Path(addon.capture.capture_target(scene, 96, 64, "WORKBENCH", str(tmp_path)))
    assert bpy.ops.flexiact.import_result(filepath=str(_still_clip(target, tmp_path / "r.mp4"))) == {"FINISHED"}
    scene.render.use_sequencer = True
    strip_x, width = _marker_x(_render(scene, tmp_path / "strip.png"))
    assert abs(strip_x - camera_x) <= 0.02 * width, (camera_x, strip_x)


def test_a_clip_at_another_rate_plays_at_its_own_speed(addon: Any, tmp_path: Path) -> None:
    """An 8 fps clip of 9 frames (1.125 s) in a 30 fps scene lasts 34 frames, not 9; over the model's frame."""
    scene = make_scene(fps=30)
    clip = make_video(tmp_path / "preview.mp4", "8", 9)
    strip = addon.importers.add_clip(scene, str(clip), 5)
    assert strip.frame_final_start == 5 and strip.frame_final_duration == round(9 / 8 * 30)
    assert not strip.mute and strip.input_1.mute  # the speed effect shows it, its movie beneath is muted
    scale_x, scale_y = strip.input_1.transform.scale_x, strip.input_1.transform.scale_y
    assert abs(scale_y * 64 - 1080) < 1 and abs(scale_x * 96 - 1620) < 1  # over the 3:2 frame of a 16:9 shot


def _client(addon: Any) -> Any:
    return addon.preferences.make_client(bpy.context)


def test_takes_and_previews_made_before_the_first_save_survive_save_and_reopen(
        backend: Any, addon: Any, action_id: str, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        recwarn: pytest.WarningsRecorder) -> None:
    """In an unsaved file: an extraction with previews and a generation of two takes; Save As moves them beside
    the .blend (paths relative); after reopening, Switch Take and Import Preview work; no warning printed."""
    scene = make_scene(fps=30)
    s = scene.flexiact
    unsaved = Path(addon.preferences.unsaved_dir())
    capfd.readouterr()
    clip = make_video(tmp_path / "ref.mp4", "24", 24)
    request = addon.requests.extraction(s, str(clip), 0.0, 1.0)
    s.caption, s.preview_every, s.extract_steps = "a square slides", 1, 2
    s.extract_seed = int(time.time()) % 100_000  # a new extraction each run (the backend reuses a done one)
    request = addon.requests.extraction(s, str(clip), 0.0, 1.0)
    key = addon.jobs.submit(scene, _client(addon), "EXTRACT", request, (96, 64), wait=True)
    _scene, extraction = addon.jobs.find_record(scene.name, key)
    assert extraction.status == "SUCCEEDED" and extraction.preview_path
    assert Path(extraction.preview_path).parent == unsaved
    listed = {a.action_id: a for a in s.actions}  # the library was listed again when the action was made
    assert extraction.action_id in listed and listed[extraction.action_id].name == "a square slides"
    assert "Generate with: a square slides" in draw_all().kinds("label")
    s.capture_engine = "WORKBENCH"
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    s.action_id, s.prompt, s.steps, s.takes, s.import_mode = action_id, "a cube slides", 2, 2, "BOTH"
    assert bpy.ops.flexiact.generate() == {"FINISHED"}
    generation = s.jobs[-1]
    assert generation.imported and len(generation.takes) == 2
    assert all(Path(t.video_path).parent == unsaved for t in generation.takes)

    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "day" / "shot.blend"))
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "day" / "shot.blend"))
    scene = bpy.context.scene
    s = scene.flexiact
    extraction, generation = s.jobs[-2], s.jobs[-1]
    for path in (extraction.preview_path, generation.video_path, *(t.video_path for t in generation.takes)):
        assert path.startswith("//flexiact/"), path
        assert (tmp_path / "day" / "flexiact" / Path(path).name).is_file()
        assert not (unsaved / Path(path).name).exists()  # moved, not copied
    assert bpy.ops.flexiact.switch_take(key=generation.key, offset=1) == {"FINISHED"}
    strips = [_strips(scene)[t.strip_name] for t in generation.takes]
    assert [x.mute for x in strips] == [True, False]
    plane = bpy.data.objects[generation.plane_name]
    tex = next(n for n in plane.active_material.node_tree.nodes if n.type == "TEX_IMAGE")
    assert Path(bpy.path.abspath(tex.image.filepath)).resolve() == \
        Path(bpy.path.abspath(generation.takes[1].video_path)).resolve()
    scene.frame_current = 40
    assert bpy.ops.flexiact.import_preview(key=extraction.key) == {"FINISHED"}
    preview = next(x for x in _strips(scene) if x.get("flexiact_preview_step"))
    # the model's 9 frames at 8 fps last 1.125 s: 34 frames of this 30 fps scene, not 9
    assert preview.frame_final_start == 40 and preview.frame_final_duration == round(9 / 8 * 30)
    assert preview.channel not in {x.channel for x in strips}  # its own channel
    out = capfd.readouterr()
    assert "Warning" not in out.out + out.err and "doesn't exist" not in out.out + out.err, out
    assert not [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]  # e.g. "//" paths


def test_a_trim_past_the_end_is_refused_as_the_backend_refuses_it(backend: Any, addon: Any, tmp_path: Path) -> None:
    """The add-on checks a trim before rendering or uploading, in the words the CLI and the API use."""
    scene = make_scene()
    s = scene.flexiact
    clip = make_video(tmp_path / "two_seconds.mp4", "24", 48)
    s.reference_source, s.reference_path, s.caption = "FILE", str(clip), "a wave"
    s.clip_start, s.clip_end = 0.5, 3.0
    with pytest.raises(RuntimeError, match="past the end of the clip"):
        bpy.ops.flexiact.extract_action()
    assert "Trim end 3 s is past the end of the clip (2.000 s long)" in s.last_error
    client = _client(addon)
    video = client.upload(str(clip))["id"]
    with pytest.raises(addon.client.BackendError) as backend_says:
        client.post("/v1/actions", {"name": "x", "caption": "x", "video": video, "start_s": 0.5, "end_s": 3.0})
    assert backend_says.value.status == 422 or backend_says.value.status == 400
    assert s.last_error in backend_says.value.message  # the same words
    assert not s.jobs  # nothing was submitted
    s.clip_start, s.clip_end = 1.0, 0.5
    assert any("End is not after Start" in t for t in draw_all().kinds("label"))


def test_the_preset_shows_the_steps_in_use_and_imports_say_duplicates(backend: Any, addon: Any, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    scene = make_scene()
    s = scene.flexiact
    assert bpy.ops.flexiact.test_connection() == {"FINISHED"}
    assert s.extract_steps == 3000 and s.extract_preset == "STANDARD"  # the default is the standard preset
    s.extract_steps = 1234
    assert s.extract_preset == "CUSTOM"
    s.extract_preset = "QUICK"
    assert s.extract_steps == 1000
    clip = make_video(tmp_path / "take.mp4", "24", 12)
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    capfd.readouterr()
    assert bpy.ops.flexiact.import_result(filepath=str(clip)) == {"FINISHED"}
    assert "again: the clip was already in the scene as 'take'" in capfd.readouterr().out
