"""The README's curl examples, run as written (only the URL's port changed) against a real tiny-model server."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service_helpers import ServerProcess, clip_bytes, png_bytes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_URL = "http://127.0.0.1:8765"
#: A bound for the whole example (it waits for an extraction and a generation of two steps each).
RUN_LIMIT_S = 600


def curl_example() -> str:
    """The sh block that follows the README's 'With `curl`' paragraph."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"With `curl`.*?```sh\n(.*?)```", text, re.S)
    assert match, "the README has no curl example block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_run_against_a_real_server(tmp_path: Path) -> None:
    script = curl_example()
    token = re.search(r"FLEXIACT_TOKEN=(\S+)", script).group(1)
    work = tmp_path / "work"
    work.mkdir()
    clip_bytes(work / "reference.mp4", seconds=2.0)
    (work / "frame.png").write_bytes(png_bytes(7, (96, 64)))
    with ServerProcess(tmp_path / "server", token=token) as server:
        assert EXAMPLE_URL in script
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(EXAMPLE_URL, server.url)],
                              cwd=work, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "result.mp4").stat().st_size > 0
    assert '"name":"big wave"' in done.stdout  # the rename shows in the final listing
