"""The whole loop inside Blender against the real backend (tiny model): capture, extract, generate, import."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import bpy
import pytest

from conftest import make_scene, make_video, render_state as _render_state
from test_addon import draw_all

pytestmark = pytest.mark.backend


def _health(url: str) -> dict[str, Any]:
    """The full health (its details need the token)."""
    token = os.environ.get("FLEXIACT_TEST_TOKEN", "")
    request = urllib.request.Request(url + "/v1/health", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _strips(scene: bpy.types.Scene) -> Any:
    editor = scene.sequence_editor
    return editor.strips if hasattr(editor, "strips") else editor.sequences


@pytest.mark.parametrize("engine", ["WORKBENCH", "SCENE"])
def test_capture_renders_model_size_and_restores_settings(backend: Any, engine: str) -> None:
    scene = make_scene()
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 640, 360, 50
    scene.render.filepath = "//renders/shot_"
    before = _render_state(scene)
    scene.flexiact.capture_engine = engine
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    model = _health(backend.backend_url)["model"]
    image = scene.flexiact.target_image
    assert image is not None and Path(bpy.path.abspath(image.filepath)).is_file()
    assert tuple(image.size) == (model["width"], model["height"])
    assert _render_state(scene) == before
    assert scene.render.engine == "CYCLES"


def test_capture_without_camera_is_refused(backend: Any) -> None:
    scene = make_scene()
    scene.camera = None
    assert not bpy.ops.flexiact.capture_target.poll()
    with pytest.raises(RuntimeError, match="active camera"):
        bpy.ops.flexiact.capture_target()


@pytest.mark.parametrize("fps,fps_base", [(24, 1.0), (30, 1.001)])
def test_generate_imports_strip_and_plane_at_scene_rate(backend: Any, addon: Any, action_id: str, tmp_path: Path,
                                                        fps: int, fps_base: float) -> None:
    scene = make_scene(fps, fps_base)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "shot.blend"))
    scene = bpy.context.scene
    s = scene.flexiact
    s.capture_engine = "WORKBENCH"
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    s.action_id = action_id
    s.prompt = "a cube slides"
    s.steps = 2
    s.import_mode = "BOTH"
    scene.frame_current = 5
    assert bpy.ops.flexiact.generate() == {"FINISHED"}

    record = s.jobs[-1]
    assert record.status == "SUCCEEDED" and record.imported
    assert record.video_path.startswith("//flexiact/")
    assert (tmp_path / "flexiact" / Path(record.video_path).name).is_file()
    duration = _client(addon)._json("GET", f"/v1/actions/{action_id}")["duration_s"]
    assert duration == pytest.approx(0.75)  # the reference's length: the strip and plane play it at that speed
    expected = duration * fps / fps_base
    strip = _strips(scene)[record.strip_name]
    assert strip.frame_final_start == 5
    assert abs(strip.frame_final_duration - expected) <= 1.0
    assert strip["flexiact_prompt"] == "a cube slides" and strip["flexiact_action"] == action_id
    plane = bpy.data.objects[record.plane_name]
    assert plane["flexiact_job"] == record.job_id
    texture = next(n for n in plane.active_material.node_tree.nodes if n.type == "TEX_IMAGE")
    assert abs(texture.image_user.frame_duration - expected) <= 1.0

    job_id = record.job_id
    bpy.ops.wm.save_mainfile()
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "shot.blend"))
    scene = bpy.context.scene
    reopened = scene.flexiact.jobs[-1]
    assert reopened.job_id == job_id and reopened.status == "SUCCEEDED"
    assert reopened.imported and reopened.strip_name in _strips(scene)
    assert len(_strips(scene)) == 1
    assert reopened.plane_name in bpy.data.objects


def test_unsaved_results_move_beside_the_blend_on_first_save(backend: Any, addon: Any, action_id: str,
                                                             tmp_path: Path) -> None:
    """Before the first save results go to the preferences' visible folder; saving moves them to //flexiact/."""
    scene = make_scene()
    s = scene.flexiact
    unsaved = Path(addon.preferences.unsaved_dir())
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    assert Path(s.target_image.filepath).parent == unsaved
    s.action_id, s.prompt, s.steps, s.import_mode = action_id, "a cube slides", 2, "BOTH"
    assert bpy.ops.flexiact.generate() == {"FINISHED"}
    record = s.jobs[-1]
    assert Path(record.video_path).parent == unsaved and record.imported
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "first.blend"))
    scene = bpy.context.scene
    record = scene.flexiact.jobs[-1]
    strip = _strips(scene)[record.strip_name]
    plane_image = next(n for n in bpy.data.objects[record.plane_name].active_material.node_tree.nodes
                       if n.type == "TEX_IMAGE").image
    for path in (record.video_path, strip.filepath, plane_image.filepath, scene.flexiact.target_image.filepath):
        assert path.startswith("//flexiact/"), path
        assert (tmp_path / "flexiact" / Path(path).name).is_file()
    assert not any(unsaved.glob(Path(record.video_path).name))  # moved, not copied
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "first.blend"))  # the saved file holds the new paths
    assert bpy.context.scene.flexiact.jobs[-1].video_path.startswith("//flexiact/")


def _client(addon: Any) -> Any:
    return addon.preferences.make_client(bpy.context)


def _target_id(addon: Any, tmp_path: Path) -> str:
    scene = bpy.context.scene
    scene.flexiact.capture_engine = "WORKBENCH"
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    return _client(addon).upload(bpy.path.abspath(scene.flexiact.target_image.filepath))["id"]


def _generation(addon: Any, image: str, action: str, steps: int, fps: float) -> str:
    body = {"action": action, "image": image, "prompt": "a cube slides", "steps": steps, "fps": fps}
    return _client(addon).post("/v1/generations", body)["job"]["id"]


def _record(addon: Any, scene: bpy.types.Scene, job_id: str, kind: str = "GENERATE") -> str:
    """A job record as the add-on keeps it for a job it submitted; returns its key."""
    record = addon.jobs.new_record(scene, kind, "test job", {"prompt": "a cube slides"})
    record.job_id = job_id
    record.status = "QUEUED"
    return record.key


def test_polling_resumes_on_reopen_with_hand_driven_timer(backend: Any, addon: Any, action_id: str,
                                                          tmp_path: Path) -> None:
    """A job still queued when the file was saved is polled after reopening and imported exactly once."""
    scene = make_scene()
    image = _target_id(addon, tmp_path)
    key = _record(addon, scene, _generation(addon, image, action_id, 2, 24.0))
    scene.flexiact.jobs[-1].import_mode = "STRIP"
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "pending.blend"))
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "pending.blend"))  # load_post resumes polling

    jobs, runner = addon.jobs, addon.runner
    assert bpy.app.timers.is_registered(runner.timer_tick)
    assert jobs.POLLER.watching(bpy.context.scene.name, key)
    _drive_timer(runner)
    assert not bpy.app.timers.is_registered(runner.timer_tick)
    _scene, record = jobs.find_record(bpy.context.scene.name, key)
    assert record.status == "SUCCEEDED" and record.imported
    assert len(_strips(bpy.context.scene)) == 1
    assert runner.timer_tick() is None and len(_strips(bpy.context.scene)) == 1  # imported once only


def _drive_timer(runner: Any) -> None:
    """Timers never fire in bpy-as-a-module: call the runner's tick by hand until it stops, then unregister it."""
    interval = runner.TICK_S
    deadline = time.monotonic() + 300
    while interval is not None and time.monotonic() < deadline:
        time.sleep(interval)
        interval = runner.timer_tick()
    runner.remove_timer()
    assert interval is None, "the runner was still busy after 300 s"


def test_interactive_submit_goes_through_the_runner(backend: Any, addon: Any, action_id: str, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """Without waiting (as in the UI), submit returns at once; the timer uploads, posts, polls and imports."""
    scene = make_scene()
    _target_id(addon, tmp_path)
    s = scene.flexiact
    s.action_id, s.prompt, s.steps, s.import_mode = action_id, "a cube slides", 2, "STRIP"
    request = addon.requests.generation(s, bpy.path.abspath(s.target_image.filepath), 24.0)
    capfd.readouterr()
    key = addon.jobs.submit(scene, _client(addon), "GENERATE", request, (96, 64), wait=False)
    _scene, record = addon.jobs.find_record(scene.name, key)
    assert record.status == "SUBMITTING" and not record.job_id
    _drive_timer(addon.runner)
    _scene, record = addon.jobs.find_record(scene.name, key)
    assert record.status == "SUCCEEDED" and record.imported and record.job_id
    assert (record.model_width, record.model_height) == (96, 64)
    assert len(_strips(scene)) == 1
    assert json.loads(record.params_json)["guidance_scale"] == s.guidance
    assert "Info: FlexiAct: Generate 'a cube slides': done" in capfd.readouterr().out  # the status bar and Info


def test_background_failure_leaves_a_report(backend: Any, addon: Any, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    """A job that fails after its operator returned says so in the status bar/Info, not only in the panel."""
    scene = make_scene()
    _target_id(addon, tmp_path)
    s = scene.flexiact
    s.action_id, s.prompt = "f" * 32, "a cube slides"  # no such action: the backend refuses it
    request = addon.requests.generation(s, bpy.path.abspath(s.target_image.filepath), 24.0)
    capfd.readouterr()
    key = addon.jobs.submit(scene, _client(addon), "GENERATE", request, (96, 64), wait=False)
    _drive_timer(addon.runner)
    _scene, record = addon.jobs.find_record(scene.name, key)
    assert record.status == "FAILED"
    out = capfd.readouterr().out
    assert "Warning: FlexiAct: Generate 'a cube slides' failed" in out and record.error in out
    assert record.error in s.last_error


def test_more_gpus_than_the_backend_has_is_its_message_in_the_status_bar(
        backend: Any, addon: Any, action_id: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """GPUs per Job past the backend's machine: refused at submission (a 422), said in the status bar and panel."""
    scene = make_scene()
    _target_id(addon, tmp_path)
    s = scene.flexiact
    s.action_id, s.prompt, s.gpus = action_id, "a cube slides", 64
    request = addon.requests.generation(s, bpy.path.abspath(s.target_image.filepath), 24.0)
    capfd.readouterr()
    key = addon.jobs.submit(scene, _client(addon), "GENERATE", request, (96, 64), wait=False)
    _drive_timer(addon.runner)
    _scene, record = addon.jobs.find_record(scene.name, key)
    assert record.status == "FAILED" and not record.job_id, record.status  # nothing was queued
    assert "gpus: 64" in record.error and "ask for at most" in record.error, record.error
    assert record.error in capfd.readouterr().out and record.error in s.last_error


def test_failed_job_shows_backend_message(backend: Any, addon: Any, tmp_path: Path) -> None:
    """A generation whose action is deleted while it waits fails; the record carries the backend's words."""
    scene = make_scene(frames=30)
    s = scene.flexiact
    s.reference_source, s.caption, s.extract_preset, s.extract_steps = "SCENE", "doomed", "CUSTOM", 1
    s.extract_seed = 7
    assert bpy.ops.flexiact.extract_action() == {"FINISHED"}
    doomed = s.action_id
    image = _target_id(addon, tmp_path)
    client = _client(addon)
    blocker = _generation(addon, image, doomed, 1000, 24.0)  # keeps the worker busy
    key = _record(addon, scene, _generation(addon, image, doomed, 1, 24.0))
    client._json("DELETE", f"/v1/actions/{doomed}")
    try:
        client.cancel(blocker)
    except addon.client.BackendError as exc:  # it may have failed already: its action is gone
        assert exc.status == 409, exc.message
    _scene, record = addon.jobs.find_record(scene.name, key)
    addon.jobs.follow(client, scene, record, wait=True)
    assert record.status == "FAILED"
    assert "deleted or is not ready" in record.error
    assert "failed" in s.last_error and record.error in s.last_error
    assert bpy.ops.flexiact.copy_report(key=key) == {"FINISHED"}


def test_cancel_job_operator(backend: Any, addon: Any, action_id: str, tmp_path: Path) -> None:
    scene = make_scene()
    assert not bpy.ops.flexiact.cancel_job.poll()
    image = _target_id(addon, tmp_path)
    key = _record(addon, scene, _generation(addon, image, action_id, 1000, 24.0))
    assert bpy.ops.flexiact.cancel_job.poll()
    assert bpy.ops.flexiact.cancel_job(key=key) == {"FINISHED"}
    _scene, record = addon.jobs.find_record(scene.name, key)
    addon.jobs.follow(_client(addon), scene, record, wait=True)  # a running job stops within a step
    assert record.status == "CANCELLED"
    assert not bpy.ops.flexiact.cancel_job.poll()


def test_extract_presets_are_the_backends(backend: Any, addon: Any) -> None:
    """The preset buttons are the backend's table (from /v1/health); choosing one sets the steps."""
    s = make_scene().flexiact
    assert bpy.ops.flexiact.test_connection() == {"FINISHED"}
    presets = _health(backend.backend_url)["presets"]
    with pytest.raises(TypeError):
        s.extract_preset = "FAST"  # not a preset of the backend
    s.extract_preset = "QUICK"
    assert s.extract_steps == presets["quick"]
    s.extract_preset = "STANDARD"
    assert s.extract_steps == presets["standard"]


def test_request_defaults_are_the_apis(backend: Any, addon: Any) -> None:
    """The add-on's defaults are the ones the API's schema publishes, and its requests use the schema's names."""
    schemas = _client(addon)._json("GET", "/openapi.json")["components"]["schemas"]
    generation = schemas["GenerationCreate"]["properties"]
    for name, value in addon.requests.GENERATION_DEFAULTS.items():
        assert generation[name]["default"] == value, name
    for name, value in addon.requests.EXTRACTION_DEFAULTS.items():
        assert schemas["ActionCreate"]["properties"][name]["default"] == value, name
    s = make_scene().flexiact
    body = addon.requests.generation(s, "/tmp/x.png", 24.0).with_file("0" * 64)
    assert set(body) <= set(generation) and set(schemas["GenerationCreate"]["required"]) <= set(body)
    assert body["guidance_scale"] == s.guidance and body["high_timesteps"] == s.transition
    assert body["reweight_scale"] == s.reweight_scale
    s.reweighting = False  # the authors' released script: no reweighting, sent as null
    assert addon.requests.generation(s, "/tmp/x.png", 24.0).body["reweight_scale"] is None
    assert "null" in [t.get("type") for t in generation["reweight_scale"]["anyOf"]]
    s.caption = "a wave"
    body = addon.requests.extraction(s, "/tmp/x.mp4", 0.0, 1.0).with_file("0" * 64)
    assert set(body) <= set(schemas["ActionCreate"]["properties"])
    assert set(schemas["ActionCreate"]["required"]) <= set(body)
    assert "gpus" not in body  # one GPU: the API's default, not sent
    s.gpus = 2
    assert addon.requests.extraction(s, "/tmp/x.mp4", 0.0, 1.0).body["gpus"] == 2
    assert addon.requests.generation(s, "/tmp/x.png", 24.0).body["gpus"] == 2


def test_wrong_token_is_explained(backend: Any) -> None:
    scene = make_scene(frames=30)
    scene.flexiact.reference_source, scene.flexiact.caption = "SCENE", "x"
    backend.token = "wrong-token"
    with pytest.raises(RuntimeError, match="refused the token"):
        bpy.ops.flexiact.extract_action()
    assert "401" in scene.flexiact.last_error
    assert len(scene.flexiact.jobs) == 0  # refused at the health check, before anything was rendered or sent


def test_reference_too_short_is_explained(backend: Any, tmp_path: Path) -> None:
    scene = make_scene()
    s = scene.flexiact
    s.reference_source, s.caption = "FILE", "x"
    s.reference_path = str(make_video(tmp_path / "short.mp4", "8", 3))
    with pytest.raises(RuntimeError, match="at least"):
        bpy.ops.flexiact.extract_action()


def test_test_connection_checks_the_token(backend: Any) -> None:
    """/v1/health is open: only an authenticated call proves the token, and the message says it is the token."""
    make_scene()
    backend.token = "wrong-token"
    with pytest.raises(RuntimeError, match="Token: The backend refused the token"):
        bpy.ops.flexiact.test_connection()
    backend.token = ""
    with pytest.raises(RuntimeError, match="Token:"):
        bpy.ops.flexiact.test_connection()


def test_library_rename_delete_and_cancelled_hidden(backend: Any, addon: Any, tmp_path: Path) -> None:
    scene = make_scene()
    s = scene.flexiact
    client = _client(addon)
    video = client.upload(str(make_video(tmp_path / "lib.mp4", "24", 48)))["id"]
    made = [client.post("/v1/actions", {"name": name, "caption": name, "video": video, "start_s": 0.0,
                                        "end_s": 1.9, "steps": steps, "seed": seed})
            for seed, name, steps in ((101, "to cancel", 5000), (102, "to keep", 1))]
    cancelled, keep = made[0]["action"]["id"], made[1]["action"]["id"]
    try:
        client.cancel(made[0]["job"]["id"])
        deadline = time.monotonic() + 600  # a running extraction stops within a step (slow on a loaded CPU)
        while client._json("GET", f"/v1/actions/{keep}")["status"] == "pending":
            assert time.monotonic() < deadline, "the extractions did not end within 600 s"
            time.sleep(0.5)
        assert client._json("GET", f"/v1/actions/{cancelled}")["status"] == "cancelled"
        assert bpy.ops.flexiact.refresh_actions() == {"FINISHED"}
        listed = {a.action_id: a for a in s.actions}
        assert cancelled not in listed and keep in listed  # the cancelled one is hidden
        assert bpy.ops.flexiact.rename_action(action_id=keep, name="Slow wave") == {"FINISHED"}
        assert client._json("GET", f"/v1/actions/{keep}")["name"] == "Slow wave"
        assert next(a for a in s.actions if a.action_id == keep).name == "Slow wave"
        s.action_id = keep
        assert bpy.ops.flexiact.delete_action(action_id=keep) == {"FINISHED"}
        assert keep not in {a.action_id for a in s.actions} and s.action_id == ""
        with pytest.raises(addon.client.BackendError) as gone:
            client._json("GET", f"/v1/actions/{keep}")
        assert gone.value.status in (404, 410)
    finally:  # never leave an extraction behind to hold the worker
        for action in (cancelled, keep):
            try:
                client.delete_action(action)
            except addon.client.BackendError:
                pass


def test_time_estimate_from_the_backends_measured_steps(backend: Any, addon: Any, action_id: str) -> None:
    """After one extraction the backend knows its time per step; the panel turns the chosen steps into a time."""
    scene = make_scene()
    assert bpy.ops.flexiact.test_connection() == {"FINISHED"}
    per_step = _health(backend.backend_url)["step_s"]["extract"]
    assert per_step and per_step > 0
    scene.flexiact.extract_preset = "STANDARD"
    text = addon.panels.estimate(scene.flexiact.extract_steps, "extract")
    assert text.startswith("About ") and f"{per_step:.2f} s per step" in text


def test_test_connection_reports_model(backend: Any, addon: Any) -> None:
    assert bpy.ops.flexiact.test_connection() == {"FINISHED"}
    summary = addon.connection.CONNECTION.summary
    assert summary.startswith("Connected") and "tiny" in summary


def _beat_until(addon: Any, state: str) -> float:
    """One heartbeat, then the runner's timer by hand (timers never fire in bpy-as-a-module) until the connection
    is in `state`; returns the seconds that took."""
    start = time.monotonic()
    assert addon.connection.heartbeat_tick() == addon.connection.HEARTBEAT_S
    while addon.connection.CONNECTION.state != state:
        assert time.monotonic() - start < 60, f"still {addon.connection.CONNECTION.state} after 60 s"
        time.sleep(addon.runner.TICK_S)
        addon.runner.timer_tick()
    _drive_timer(addon.runner)
    return time.monotonic() - start


def test_local_backend_launcher_starts_and_the_panel_sees_it_hang_and_die(addon: Any, prefs: Any) -> None:
    """Preferences › Start runs the command line, waits for health, logs to the user folder. The heartbeat then
    tells the truth: a hung backend, then a killed one, shows as not answering within 5 s of its next tick."""
    if not os.environ.get("FLEXIACT_TEST_LAUNCH_COMMAND"):
        pytest.skip("no launch command: FLEXIACT_TEST_LAUNCH_COMMAND is not set")
    make_scene()
    prefs.backend_url = os.environ["FLEXIACT_TEST_LAUNCH_URL"]
    prefs.token = ""
    prefs.launcher_command = os.environ["FLEXIACT_TEST_LAUNCH_COMMAND"]
    connection = addon.connection.CONNECTION
    assert not bpy.ops.flexiact.backend_stop.poll()
    try:
        assert bpy.ops.flexiact.backend_start() == {"FINISHED"}
        assert addon.launcher.LAUNCHER.running()
        assert connection.summary.startswith("Connected") and connection.is_tiny()
        assert any("noise by design" in t for t in draw_all().kinds("label"))
        log = Path(addon.launcher.LAUNCHER.log_path)
        assert log.is_file() and Path(addon.preferences.user_dir()) in log.parents
        pid = addon.launcher.LAUNCHER.process.pid
        os.kill(pid, signal.SIGSTOP)  # hung: it takes connections but never answers
        try:
            assert _beat_until(addon, "DOWN") < 5.0
            assert any(t.startswith("Backend not answering · last answer") for t in draw_all().kinds("label"))
        finally:
            os.kill(pid, signal.SIGCONT)
        _beat_until(addon, "CONNECTED")
        assert bpy.ops.flexiact.backend_stop.poll()
        os.kill(pid, signal.SIGKILL)  # killed
        assert _beat_until(addon, "DOWN") < 5.0
        assert connection.summary.startswith("Backend not answering (last answer")
        assert any(t.startswith("Backend not answering") for t in draw_all().kinds("label"))
    finally:
        addon.launcher.LAUNCHER.stop()
    assert not addon.launcher.LAUNCHER.running()
    with pytest.raises(RuntimeError, match="Cannot reach"):
        bpy.ops.flexiact.test_connection()


def test_launcher_reports_a_command_that_fails(addon: Any, prefs: Any) -> None:
    prefs.backend_url = "http://127.0.0.1:9"  # nothing answers there, so only the process can end the wait
    prefs.launcher_command = f"{sys.executable} -c 'raise SystemExit(3)'"
    with pytest.raises(RuntimeError, match="exited with code 3"):
        bpy.ops.flexiact.backend_start()
    assert not addon.launcher.LAUNCHER.running()


def _render_frames(scene: bpy.types.Scene, folder: Path, file_format: str) -> list[str]:
    """The scene's animation as numbered frames rendered by Blender (Workbench, 96x64); their file names."""
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 96, 64, 100
    scene.render.image_settings.file_format = file_format
    scene.render.filepath = str(folder / "shot_")
    bpy.ops.render.render(animation=True)
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("source, file_format", [("STRIP", "PNG"), ("FILE", "OPEN_EXR")])
def test_extract_from_a_rendered_image_sequence(backend: Any, tmp_path: Path, source: str, file_format: str) -> None:
    """Blender's own output as the reference: a PNG image strip in the Sequencer, or a folder of EXR frames
    chosen by one numbered frame; the frames travel as a zip with the scene's fps and an action is extracted."""
    scene = make_scene(frames=24)
    names = _render_frames(scene, tmp_path / "frames", file_format)
    assert len(names) == 24
    s = scene.flexiact
    if source == "STRIP":
        scene.sequence_editor_create()
        strip = _strips(scene).new_image("shot", str(tmp_path / "frames" / names[0]), 1, 1)
        for name in names[1:]:
            strip.elements.append(name)
        strip.frame_offset_start = 6  # the trim: frames 7-24 of the sequence
        s.reference_strip = strip.name
    else:
        s.reference_path = str(tmp_path / "frames" / names[3])
    s.reference_source = source
    s.caption = "a cube slides to the right"
    s.extract_preset = "CUSTOM"
    s.extract_steps = 1
    assert bpy.ops.flexiact.extract_action() == {"FINISHED"}
    record = s.jobs[-1]
    assert record.kind == "EXTRACT" and record.status == "SUCCEEDED", record.error
    action = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{backend.backend_url}/v1/actions/{record.action_id}",
        headers={"Authorization": f"Bearer {backend.token}"}), timeout=10).read())
    assert action["start_s"] == (0.25 if source == "STRIP" else 0.0) and action["end_s"] == 1.0


def _tick_until(runner: Any, done: Any, what: str) -> None:
    """Drive the runner's timer by hand (timers never fire in bpy-as-a-module) until `done()` holds."""
    deadline = time.monotonic() + 300
    while not done():
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(runner.TICK_S)
        runner.timer_tick()


def test_preview_import_and_finish_now(backend: Any, addon: Any, tmp_path: Path) -> None:
    """A long extraction shows its latest preview; Import Preview puts it at the playhead on the preview channel,
    a newer preview replaces it there; Finish Now makes the action ready from the steps trained so far."""
    scene = make_scene()
    s = scene.flexiact
    s.caption, s.extract_steps, s.preview_every = "a square slides", 100_000, 3
    s.extract_seed = bpy.app.version[0] * 100 + bpy.app.version[1]  # one backend, every Blender: a new action each
    clip = make_video(tmp_path / "ref.mp4", "24", 48)
    request = addon.requests.extraction(s, str(clip), 0.0, 1.0)  # within one model clip: one window per crop
    assert request.body["preview_every"] == 3
    key = addon.jobs.submit(scene, _client(addon), "EXTRACT", request, (96, 64), wait=False)
    _scene, record = addon.jobs.find_record(scene.name, key)
    try:
        _preview_import_and_finish_now(backend, addon, scene, record)
    finally:  # a failure never leaves a 100,000-step extraction holding the one worker
        if record.job_id and record.status in addon.properties.ACTIVE_STATUSES:
            _client(addon).cancel(record.job_id)


def _preview_import_and_finish_now(backend: Any, addon: Any, scene: bpy.types.Scene, record: Any) -> None:
    s, key = scene.flexiact, record.key
    with pytest.raises(RuntimeError, match="No preview yet"):
        bpy.ops.flexiact.import_preview(key=key)
    _tick_until(addon.runner, lambda: record.preview_step >= 3, "preview")
    assert record.status == "RUNNING" and record.preview_frames == _health(backend.backend_url)["model"]["frames"]
    assert Path(bpy.path.abspath(record.preview_path)).is_file()
    rec = draw_all()  # the Jobs panel shows it, with both buttons
    assert f"Preview · step {record.preview_step} · {record.preview_frames} frames" in rec.kinds("label")
    assert {"flexiact.import_preview", "flexiact.finish_job"} <= set(rec.kinds("operator"))

    scene.frame_current = 7
    assert bpy.ops.flexiact.import_preview(key=key) == {"FINISHED"}
    editor = scene.sequence_editor
    (strip,) = [x for x in _strips(scene) if x.get("flexiact_preview_step")]
    # the preview, at the model's fps (8), plays at its own speed in this 24 fps scene: 9 frames last 27
    model_fps = _health(backend.backend_url)["model"]["fps"]
    assert strip.frame_final_start == 7 and strip.frame_final_duration == round(record.preview_frames / model_fps * 24)
    assert editor.channels[strip.channel].name == "FlexiAct Preview"
    assert strip["flexiact_preview_step"] == record.preview_step and strip["flexiact_job"] == record.job_id
    first_step = record.preview_step
    _tick_until(addon.runner, lambda: record.preview_step > first_step, "newer preview")
    assert bpy.ops.flexiact.import_preview(key=key) == {"FINISHED"}
    (strip,) = [x for x in _strips(scene) if x.get("flexiact_preview_step")]  # the newer replaced the older
    assert len(_strips(scene)) == 2  # it and the movie strip beneath its speed effect
    assert strip["flexiact_preview_step"] == record.preview_step > first_step

    assert bpy.ops.flexiact.finish_job(key=key) == {"FINISHED"}
    assert record.finish_requested and "flexiact.finish_job" not in draw_all().kinds("operator")
    _tick_until(addon.runner, lambda: record.status == "SUCCEEDED", "finished extraction")
    _drive_timer(addon.runner)
    action = _client(addon)._json("GET", f"/v1/actions/{record.action_id}")
    assert action["status"] == "ready" and 3 <= action["meta"]["steps_trained"] < 100_000
    assert s.action_id == record.action_id
    with pytest.raises(RuntimeError, match="running extraction"):
        bpy.ops.flexiact.finish_job(key=key)


def test_takes_stacked_switched_and_settings_round_trip(backend: Any, addon: Any, action_id: str,
                                                        tmp_path: Path) -> None:
    """Three takes: three strips at one start on free channels, one unmuted; the switcher moves which one plays,
    the plane follows; Use These Settings on a take's strip fills the panel with that take's settings."""
    scene = make_scene()
    s = scene.flexiact
    s.capture_engine = "WORKBENCH"
    assert bpy.ops.flexiact.capture_target() == {"FINISHED"}
    s.action_id, s.prompt, s.steps, s.seed, s.takes, s.guidance = action_id, "a cube slides", 2, 40, 3, 5.5
    s.import_mode = "BOTH"
    scene.frame_current = 4
    assert bpy.ops.flexiact.generate() == {"FINISHED"}
    record = s.jobs[-1]
    assert record.status == "SUCCEEDED" and record.imported and len(record.takes) == 3
    strips = [_strips(scene)[t.strip_name] for t in record.takes]
    assert [x.frame_final_start for x in strips] == [4, 4, 4] and len({x.channel for x in strips}) == 3
    assert [x.mute for x in strips] == [False, True, True]
    assert [x["flexiact_seed"] for x in strips] == [40, 41, 42] == [t.seed for t in record.takes]
    assert len({Path(bpy.path.abspath(t.video_path)).read_bytes() for t in record.takes}) == 3
    plane = bpy.data.objects[record.plane_name]

    def plane_clip() -> str:
        tex = next(n for n in plane.active_material.node_tree.nodes if n.type == "TEX_IMAGE")
        return bpy.path.abspath(tex.image.filepath)

    assert plane_clip() == bpy.path.abspath(record.takes[0].video_path)
    assert "Take 1/3 · seed 40" in draw_all("sequencer").kinds("label")
    assert bpy.ops.flexiact.switch_take(key=record.key, offset=1) == {"FINISHED"}
    assert [x.mute for x in strips] == [True, False, True] and record.take_index == 1
    assert plane_clip() == bpy.path.abspath(record.takes[1].video_path) and plane["flexiact_seed"] == 41
    assert bpy.ops.flexiact.switch_take(key=record.key, offset=-2) == {"FINISHED"}  # wraps to the last take
    assert [x.mute for x in strips] == [True, True, False] and record.strip_name == strips[2].name

    s.prompt, s.seed, s.steps, s.guidance, s.action_id = "something else", 1, 9, 1.0, ""
    scene.sequence_editor.active_strip = None
    bpy.context.view_layer.objects.active = None
    assert not bpy.ops.flexiact.use_settings.poll()  # nothing FlexiAct made is selected
    scene.sequence_editor.active_strip = strips[1]
    assert bpy.ops.flexiact.use_settings() == {"FINISHED"}
    assert (s.prompt, s.seed, s.steps, s.guidance, s.action_id) == ("a cube slides", 41, 2, 5.5, action_id)
    assert s.lora_weight == pytest.approx(strips[1]["flexiact_lora_weight"])
    assert s.transition == pytest.approx(strips[1]["flexiact_high_timesteps"])
    scene.sequence_editor.active_strip = None
    s.seed = 1
    bpy.context.view_layer.objects.active = plane  # the plane plays take 3: its settings
    assert bpy.ops.flexiact.use_settings() == {"FINISHED"} and s.seed == 42
