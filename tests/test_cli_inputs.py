"""The CLI checks its inputs before it loads a model, and says what is wrong without a traceback.

Every case names a model folder that does not exist: an input mistake must be reported first, and a sequence
that is fine gets as far as the model (proving it was read and written as a clip before that).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flexiact_backend.tools.cli import main
from flexiact_backend.media import probe_video
from tests.media_fixtures import coded_frame


def _frames(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(coded_frame(i)).save(folder / f"shot_{i + 1:04d}.png")
    return folder


def _extract(tmp_path: Path, video: Path, fps: str | None = None, end: str = "1.5", out: Path | None = None
             ) -> list[str]:
    return ["extract", "--model", str(tmp_path / "no-model"), "--video", str(video), "--end", end,
            "--caption", "a jump", "--out", str(out or tmp_path / "jump.safetensors"),
            *(["--fps", fps] if fps else [])]


@pytest.mark.parametrize("case, fragment", [
    ("no_fps", "is an image sequence: give the frame rate it was rendered at with --fps"),
    ("gap", "frame 3 (shot_0003.png) is missing"),
    ("trim", "past the end of the clip"),
    ("missing", "no such file"),
    ("out_folder", "does not exist; create it first"),
])
def test_input_mistakes_are_reported_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            case: str, fragment: str) -> None:
    frames = _frames(tmp_path / "render", 24)
    args = {"no_fps": _extract(tmp_path, frames),
            "gap": _extract(tmp_path, frames, "24"),
            "trim": _extract(tmp_path, frames / "shot_####.png", "12", end="9"),
            "missing": _extract(tmp_path, tmp_path / "nope.mp4"),
            "out_folder": _extract(tmp_path, frames, "24", out=tmp_path / "no" / "jump.safetensors")}[case]
    if case == "gap":
        (frames / "shot_0003.png").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and "no-model" not in err


def test_a_good_sequence_is_written_as_a_clip_then_the_model_is_looked_for(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    frames = _frames(tmp_path / "render", 24)
    assert main(_extract(tmp_path, frames / "shot_%04d.png", "12")) == 2
    assert "no-model" in capsys.readouterr().err
    clip = probe_video(tmp_path / "jump.safetensors.work" / "reference.avi")
    assert (clip.frames, clip.fps, clip.duration_s) == (24, 12.0, 2.0)


#: What the CLI's --help must not load (checked by module list, not by time: a loaded machine is slow anyway).
HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "fastapi", "av", "ray")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["extract", "--help"], ["serve", "--help"],
                                  ["bench", "full", "--help"], ["doctor", "--help"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    """`flexiact-backend --help` builds its parser from light modules; torch and friends load when a command runs."""
    code = ("import sys\nfrom flexiact_backend.tools.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout.strip().splitlines()[-1]
