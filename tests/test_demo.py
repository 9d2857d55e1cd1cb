"""The demo's whole loop (backend + the add-on in Blender 5.0) with smaller settings, so `make demo` cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service_helpers import decode_mp4

ROOT = Path(__file__).resolve().parents[1]
BLENDER_PYTHON = ROOT / ".venv-bpy50" / "bin" / "python"

pytestmark = pytest.mark.blender


def test_demo_produces_blend_clip_and_contact_sheet(tmp_path: Path) -> None:
    assert BLENDER_PYTHON.exists(), "no bpy 5.0 venv: run `make blender-setup`"
    zips = sorted((ROOT / "dist").glob("flexiact-*.zip"))
    assert zips, "no extension zip: run `make extension`"
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "demo" / "main.py"), "--blender-python", str(BLENDER_PYTHON),
                           "--zip", str(zips[-1]), "--out", str(out), "--frames", "30", "--extract-steps", "1",
                           "--steps", "2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    report = json.loads((out / "demo.json").read_text())
    assert (out / "demo.blend").is_file() and report["action"] and report["plane"]
    frames, fps, size = decode_mp4(out / "demo.mp4")
    assert (fps, size) == (24.0, (96, 64))  # the tiny model's clip, re-timed to the scene's 24 fps
    assert frames == report["strip"]["frames"] == 27  # 9 frames at 8 fps last 27 frames at 24 fps
    sheet = Image.open(out / "contact-sheet.png")
    assert sheet.height == 3 * (160 + 6) + 6  # target, reference and result rows
    assert "demo: done in" in done.stdout
