"""The Blender add-on in real Blender 4.2, 4.5 and 5.0 (the bpy module, one venv each) against a real backend.

Each version runs tests/blender in its own Python (Blender brings its own), with the extension zip built by
`make extension` and the tiny-model backend started here; see tests/blender/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import pytest

from flexiact_backend.service.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"4.2": ".venv-bpy42", "4.5": ".venv-bpy45", "5.0": ".venv-bpy50"}
TOKEN = "blender-test-token"
#: A safety net so a hung Blender fails the run instead of stalling it; never a performance bound.
RUN_LIMIT_S = 1200

pytestmark = pytest.mark.blender


def _python(version: str) -> Path:
    python = ROOT / VERSIONS[version] / "bin" / "python"
    assert python.exists(), f"no bpy {version} venv: run `make blender-setup`"
    return python


@pytest.fixture(scope="module")
def extension_zip() -> Path:
    """`make extension`: Blender's builder makes the zip and its validators accept it."""
    done = subprocess.run(["make", "-s", "extension"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    version = next(line.split('"')[1] for line in (ROOT / "blender_manifest.toml").read_text().splitlines()
                   if line.startswith("version"))
    path = ROOT / "dist" / f"flexiact-{version}.zip"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("blender-backend"), token=TOKEN) as server:
        yield server


@pytest.mark.parametrize("version", list(VERSIONS))
def test_extension_validates(version: str, extension_zip: Path) -> None:
    cli = next((ROOT / VERSIONS[version]).glob("lib/python3.*/site-packages/bpy/*/scripts/addons_core/"
                                              "bl_pkg/cli/blender_ext.py"))
    done = subprocess.run([str(_python(version)), str(cli), "validate", str(extension_zip)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Success" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("version", list(VERSIONS))
def test_addon_in_blender(version: str, extension_zip: Path, backend: ServerProcess, tmp_path: Path) -> None:
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "blender-user"),
           "FLEXIACT_EXTENSION_ZIP": str(extension_zip), "FLEXIACT_TEST_BACKEND_URL": backend.url,
           "FLEXIACT_TEST_TOKEN": TOKEN, "FLEXIACT_FFMPEG": imageio_ffmpeg.get_ffmpeg_exe(),
           "PYTHONDONTWRITEBYTECODE": "1"}
    port = free_port()  # for the add-on's own local-backend launcher
    env["FLEXIACT_TEST_LAUNCH_URL"] = f"http://127.0.0.1:{port}"
    env["FLEXIACT_TEST_LAUNCH_COMMAND"] = (f"{sys.executable} -m flexiact_backend serve --tiny "
                                           f"--port {port} --data-dir {tmp_path / 'launched'}")
    env.pop("PYTHONPATH", None)
    cmd = [str(_python(version)), "-m", "pytest", "-q", "-c", "tests/blender/pytest.ini",
           "--rootdir", "tests/blender", "--confcutdir", "tests/blender", "--basetemp", str(tmp_path / "t"),
           "tests/blender"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    output = done.stdout + done.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    sys.stdout.write(f"bpy {version}: {summary}\n")
    assert done.returncode == 0, output[-20000:]
    assert "passed" in summary and "skipped" not in summary and "error" not in summary, output[-5000:]


def test_studio_answers_in_the_blender_tests_are_the_backends_schema() -> None:
    """tests/blender/studio_degraded.json stands in for a studio backend whose Ray head is lost: it must be what
    the backend answers, field for field (its Health and JobAccepted schemas, nothing they do not have)."""
    from flexiact_backend.service.schemas import ClusterHealth, Health, JobAccepted

    answers = json.loads((ROOT / "tests" / "blender" / "studio_degraded.json").read_text())
    health, accepted = Health.model_validate(answers["health"]), JobAccepted.model_validate(answers["accepted"])
    assert health.status == "degraded" and health.cluster.status == "degraded" and health.cluster.reason
    assert set(answers["health"]) <= set(Health.model_fields)
    assert set(answers["health"]["cluster"]) == set(ClusterHealth.model_fields)
    assert accepted.job.status == "queued" and accepted.note


_RENDER_SEQUENCES = """
import sys, bpy
out = sys.argv[-1]
bpy.ops.wm.read_homefile(use_empty=True)
scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, 6
mesh = bpy.data.meshes.new("Cube")
mesh.from_pydata([(x, y, z) for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)], [],
                 [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
cube = bpy.data.objects.new("Figure", mesh)
scene.collection.objects.link(cube)
cube.location = (-1, 0, 0); cube.keyframe_insert("location", frame=1)
cube.location = (1, 0, .5); cube.keyframe_insert("location", frame=6)
cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
scene.collection.objects.link(cam)
cam.location, cam.rotation_euler = (0, -6, .5), (1.5707963, 0, 0)
scene.camera = cam
scene.render.engine = "BLENDER_WORKBENCH"
scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 96, 64, 100
scene.view_settings.view_transform = "Standard"
scene.render.dither_intensity = 0.0
for fmt, depth, folder in (("PNG", "8", "png"), ("OPEN_EXR", "32", "exr")):
    scene.render.image_settings.file_format = fmt
    scene.render.image_settings.color_mode = "RGB"
    scene.render.image_settings.color_depth = depth
    scene.render.filepath = f"{out}/{folder}/shot_"
    bpy.ops.render.render(animation=True)
"""


def test_blender_exr_sequence_matches_its_png_as_a_reference(tmp_path: Path) -> None:
    """Blender renders one shot as PNG (Standard view) and as EXR (scene-linear); read as reference clips, the
    EXR's conversion to display sRGB gives the PNG's pixels, and both give the same trimmed frames."""
    from flexiact_backend.media import read_clip
    from flexiact_backend.sequences import encode_sequence

    script = tmp_path / "render.py"
    script.write_text(_RENDER_SEQUENCES)
    done = subprocess.run([str(_python("5.0")), str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=RUN_LIMIT_S, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "exr").glob("shot_*.exr"))) == 6
    clips = {}
    for kind in ("png", "exr"):
        info = encode_sequence(tmp_path / kind / f"shot_####.{kind}", 6, tmp_path / f"{kind}.avi")
        assert (info.frames, info.width, info.height, info.fps) == (6, 96, 64, 6.0)
        clips[kind] = read_clip(tmp_path / f"{kind}.avi", 1 / 6, 5 / 6, 4).astype(int)
    assert clips["png"].std() > 10  # a real picture, not a blank frame
    assert np.abs(clips["exr"] - clips["png"]).max() <= 2
