"""Helpers for the service tests: a real server process, clips and images, job polling, mp4 decoding."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexiact_backend.media import write_mp4
from flexiact_backend.tools.serve_bench import Client, png_bytes
from flexiact_backend.service.process import ServerProcess

TERMINAL = ("succeeded", "failed", "cancelled")
#: A safety net so a broken server fails the test instead of hanging it; never a performance bound.
WAIT_S = 240.0
#: A safety net for worker states to change; never a performance bound.
STATE_WAIT_S = 180.0

__all__ = ["Client", "ServerProcess", "png_bytes", "TERMINAL", "action_tensors", "assert_monotonic", "clip_bytes",
           "decode_mp4", "extraction", "frames", "upload", "wait_job", "wait_until", "wait_workers", "workers",
           "read_only", "small_disk"]


def clip_bytes(path: Path, seconds: float = 2.0, fps: float = 24.0, size: tuple[int, int] = (96, 64)) -> bytes:
    """An mp4 of a white square moving left to right (clear motion for extraction)."""
    n = round(seconds * fps)
    w, h = size
    frames = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        x = int((w - 16) * t / max(1, n - 1))
        frames[t, h // 3: h // 3 + 16, x: x + 16] = 255
    write_mp4(path, frames, fps)
    return path.read_bytes()


def upload(client: Client, data: bytes, content_type: str, filename: str) -> dict:
    status, body = client.upload(data, content_type, filename)
    assert status == 201, body
    return body  # type: ignore[return-value]


def wait_job(client: Client, job_id: str, until: tuple[str, ...] = TERMINAL, *, min_step: int = 0,
             history: list[dict] | None = None) -> dict:
    """Poll a job until its status is in `until` (and its step >= min_step); every poll goes in `history`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, job = client.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, job
        if history is not None:
            history.append(job)  # type: ignore[arg-type]
        if job["status"] in until and job["step"] >= min_step:  # type: ignore[index]
            return job  # type: ignore[return-value]
        if job["status"] in TERMINAL:  # type: ignore[index]
            raise AssertionError(f"job ended {job['status']} while waiting for {until}: {job}")  # type: ignore[index]
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not {until} after {WAIT_S} s")


def extraction(client: Client, clip: dict, **fields) -> tuple[int, dict]:
    """POST a short extraction of `clip` (4 steps, no previews; `fields` override)."""
    body = {"name": "slide", "caption": "a square slides right", "video": clip["id"], "start_s": 0.0, "end_s": 2.0,
            "steps": 4, "preview_every": 0, **fields}
    return client.request("POST", "/v1/actions", json_body=body)  # type: ignore[return-value]


def action_tensors(client: Client, action_id: str, path: Path) -> dict[str, torch.Tensor]:
    """An action's tensors, downloaded to `path`."""
    status, data = client.request("GET", f"/v1/actions/{action_id}/file")
    assert status == 200, data
    path.write_bytes(data)  # type: ignore[arg-type]
    return load_file(path)


def frames(client: Client, url: str, path: Path) -> np.ndarray:
    """A job's video, downloaded to `path` and decoded to (frames, height, width, 3) uint8."""
    status, data = client.request("GET", url)
    assert status == 200, data
    path.write_bytes(data)  # type: ignore[arg-type]
    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def wait_until(get, ok, what: str, limit_s: float = STATE_WAIT_S):
    """Call `get()` until `ok(value)` holds; returns that value."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = get()
        if ok(value):
            return value
        time.sleep(0.2)
    raise TimeoutError(f"never {what} within {limit_s} s: {get()}")


def workers(client: Client) -> list[dict]:
    return client.request("GET", "/v1/health")[1]["workers"]  # type: ignore[index]


def wait_workers(client: Client, ok, what: str) -> list[dict]:
    """Poll /v1/health until `ok(workers)` holds."""
    return wait_until(lambda: workers(client), ok, f"workers {what}")


def assert_monotonic(history: list[dict]) -> None:
    """Progress and step never go backwards across the polls of one job."""
    progress = [j["progress"] for j in history]
    steps = [j["step"] for j in history]
    assert progress == sorted(progress), progress
    assert steps == sorted(steps), steps


def decode_mp4(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(frames, fps, size) by decoding every frame with the bundled ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    count = sum(1 for _ in reader)
    return count, float(meta["fps"]), tuple(meta["size"])


def _mount(*args: str) -> None:
    """mount(8) as root, else through passwordless sudo; skips the test where neither may mount."""
    cmd = ["mount", *args] if os.geteuid() == 0 else ["sudo", "-n", "mount", *args]
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("mounting a small tmpfs needs root or passwordless sudo")
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)] if os.geteuid() == 0 else ["sudo", "-n", "umount", str(path)], check=True)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """`path` as a tmpfs of `size` (e.g. '40m'): a disk that really fills up."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` unwritable for the service: mode 0555, or (root ignores modes) a read-only tmpfs over it."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)
