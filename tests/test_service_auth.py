"""Token, loopback rule and upload limits of the service, on a real server started with a token and tiny limits."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service_helpers import Client, ServerProcess, clip_bytes, png_bytes

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    limits = ("--max-image-bytes", "20000", "--max-image-pixels", "5000", "--max-video-bytes", "4000")
    with ServerProcess(tmp_path_factory.mktemp("service-auth"), token=TOKEN, extra_args=limits) as s:
        yield s


def test_health_is_open_everything_else_needs_the_token(server: ServerProcess) -> None:
    anonymous, wrong, right = Client(server.url), Client(server.url, "wrong"), Client(server.url, TOKEN)
    assert anonymous.request("GET", "/v1/health")[0] == 200
    for path in ("/v1/jobs", "/v1/actions", f"/v1/jobs/{'a' * 32}"):
        for client in (anonymous, wrong):
            status, body = client.request("GET", path)
            assert status == 401 and body["error"]["code"] == "unauthorized", (path, body)
    assert right.request("GET", "/v1/jobs")[0] == 200
    r = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Basic " + TOKEN})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_upload_without_token_is_refused_and_not_stored(server: ServerProcess) -> None:
    data = png_bytes(5)
    status, _ = Client(server.url).upload(data, "image/png", "a.png")
    assert status == 401
    sha = hashlib.sha256(data).hexdigest()
    assert Client(server.url, TOKEN).request("HEAD", f"/v1/files/{sha}")[0] == 404


def test_limits_answer_413(server: ServerProcess, tmp_path: Path) -> None:
    client = Client(server.url, TOKEN)
    big = png_bytes(3, (200, 200))  # ~120 kB of noise, over the 20000-byte image limit
    status, body = client.upload(big, "image/png", "big.png")
    assert status == 413 and body["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield b"\0" * 4096

    r = httpx.post(f"{server.url}/v1/files", content=chunks(),
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    pixels = png_bytes(4, (100, 60))  # small file, 6000 pixels > 5000
    status, body = client.upload(pixels, "image/png", "wide.png")
    assert status == 413 and "megapixels" in body["error"]["message"]

    status, body = client.upload(clip_bytes(tmp_path / "c.mp4", seconds=4.0), "video/mp4", "c.mp4")
    assert status == 413 and body["error"]["code"] == "too_large"

    small = png_bytes(6, (40, 30))
    status, body = client.upload(small, "image/png", "ok.png")
    assert status == 201 and body["meta"] == {"width": 40, "height": 30}


def test_refuses_non_loopback_address_without_token(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "flexiact_backend", "serve", "--tiny", "--host", "0.0.0.0",
           "--data-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a token" in run.stderr
    assert not (tmp_path / "state.sqlite3").exists()
