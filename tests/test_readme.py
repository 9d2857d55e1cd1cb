"""The README's examples run as written: curl (only the URL's port changed) against a real tiny-model server, the
one-machine studio recipe, the Python API and the GPU install on the hub-shaped tiny folder; and its preset times
are the estimate's."""

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

from flexiact_backend.presets import PRESETS, estimated_job_s
from flexiact_backend.service.process import free_port

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


def python_example() -> str:
    """The python blocks of the README's 'Python API' section, in order, as one script."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API\n"):text.index("## CLI\n")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the Python API section has its two examples"
    return "\n".join(blocks)


def test_readme_python_api_runs_as_written(hub_folder, motion_clip: Path, target_image, tmp_path: Path) -> None:
    """Only the model path and the step counts change: the hub-shaped tiny folder, 2 steps each."""
    script = python_example()
    for old, new in (('MODEL = "weights/CogVideoX-5b-I2V"', f"MODEL = {str(hub_folder.model)!r}"),
                     ("EXTRACT_STEPS, STEPS = 3000, 50", "EXTRACT_STEPS, STEPS = 2, 2")):
        assert old in script
        script = script.replace(old, new)
    shutil.copy(motion_clip, tmp_path / "reference.mp4")
    target_image.save(tmp_path / "target.png")
    script += "\nassert frames.shape[0] == info.frames, frames.shape\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_LIMIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refnetlora_step40000_model.pt 0.7" in done.stdout
    assert (tmp_path / "dog-jumps.mp4").stat().st_size > 0 and (tmp_path / "jump.safetensors").is_file()


def test_readme_preset_times_are_the_estimate() -> None:
    """The README's preset times are presets.estimated_job_s of each preset (labelled estimates)."""
    text = (ROOT / "README.md").read_text()
    for name, shown in (("standard", r"3,000 steps\*\*.*?an estimated ([\d.]+) h"), ("quick", r"1,000 steps\*\* \(an estimated ([\d.]+) h")):
        hours = float(re.search(shown, text, re.S).group(1))
        assert hours == round(estimated_job_s(PRESETS[name]) / 3600, 1), name


def gpu_install_block() -> list[str]:
    """The install lines of the README's GPU block: every line up to `download` (which needs the hub)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Running the backend on a GPU box\n.*?```sh\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line for line in lines[: next(i for i, line in enumerate(lines) if " download " in f"{line} ")] if line]


@pytest.mark.slow
def test_readme_gpu_install_then_every_command_on_the_hub_folder(hub_folder, motion_clip: Path, target_image,
                                                                  tmp_path: Path) -> None:
    """A fresh venv made and filled exactly as the README tells a GPU user (torch==2.13.0 resolves to this machine's
    CPU wheel; the rest comes from pip's cache), then doctor, generate, extract and import-action on the hub folder."""
    venv = tmp_path / "venv"
    install = gpu_install_block()
    assert install == ["python3 -m venv .venv", ".venv/bin/pip install torch==2.13.0",
                       ".venv/bin/pip install -e '.[download]'"]
    for line in install:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", line.replace(".venv", str(venv))], cwd=ROOT,
                              capture_output=True, text=True, timeout=RUN_LIMIT_S)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    cli = str(venv / "bin" / "flexiact-backend")
    target_image.save(tmp_path / "target.png")
    model = str(hub_folder.model)
    commands = [
        ["doctor", "--model", model, "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        ["import-action", str(hub_folder.action), "--name", "jump", "--caption", "a jump", "--out", str(tmp_path / "jump.safetensors")],
        ["generate", "--model", model, "--image", str(tmp_path / "target.png"), "--prompt", "a dog jumps", "--action",
         str(tmp_path / "jump.safetensors"), "--steps", "1", "--out", str(tmp_path / "dog.mp4")],
        ["extract", "--model", model, "--video", str(motion_clip), "--end", "1.5", "--caption", "a block slides",
         "--steps", "1", "--out", str(tmp_path / "slide.safetensors")],
    ]
    for args in commands:
        done = subprocess.run([cli, *args], capture_output=True, text=True, timeout=RUN_LIMIT_S)
        assert done.returncode == 0, f"{args[0]}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "dog.mp4").stat().st_size > 0 and (tmp_path / "slide.safetensors").is_file()


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
