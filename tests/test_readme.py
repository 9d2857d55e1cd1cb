"""The README's curl examples (only the URL's port changed) and its one-machine studio recipe, run as written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def studio_recipe() -> str:
    """The sh block that follows the README's '**One machine**' paragraph (Studio section)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"\*\*One machine\*\*.*?```sh\n(.*?)```", text, re.S)
    assert match, "the README has no one-machine studio recipe"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_one_machine_studio_recipe_runs_as_written(tmp_path: Path) -> None:
    """The recipe on loopback, changed only where a shared test machine needs it: the ports are free ones, the
    tiny model with one CPU worker replaces the real model, and Ray's temp dir and resources are the test's own
    (HOME and TMPDIR too, so the token file and the actors' folders are the test's)."""
    pytest.importorskip("ray", reason="studio mode needs the [cluster] extra (make setup installs it)")
    from flexiact_backend.service.process import free_port

    script = studio_recipe()
    model_arg = "--model ~/.local/share/flexiact-backend/weights/CogVideoX-5b-I2V"
    assert model_arg in script and "6379" in script and "--disable-usage-stats" in script
    ray_port, port = free_port(), free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths have a limit
    script = (script.replace("6379", str(ray_port))
              .replace(model_arg, f"--tiny --ray-workers 1 --port {port} --data-dir {tmp_path / 'data'}")
              .replace("--disable-usage-stats", f"--disable-usage-stats --temp-dir={ray_tmp} --num-cpus=1 "
                       "--num-gpus=0 --include-dashboard=false --object-store-memory=80000000"))
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    with open(tmp_path / "recipe.log", "wb") as log:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(tmp_path / "data", port=port)
    try:
        health = server.wait_loaded(RUN_LIMIT_S)
        assert health["cluster"]["auth"] == "token" and health["status"] == "ok", health
        assert (tmp_path / "home" / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the service and our `ray start --block`, as Ctrl-C would
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        head = int((tmp_path / "ray-head.pid").read_text())
        deadline = time.monotonic() + 60
        while _alive(head) and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not _alive(head), (tmp_path / "recipe.log").read_text()[-3000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
