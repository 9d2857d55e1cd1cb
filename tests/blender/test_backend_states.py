"""The three backend states the panel tells apart from "Connected" and "not answering": a studio pool that is
lost (degraded health, jobs accepted with a note) and a token the backend refuses or was not sent.

The degraded answers come from a tiny real HTTP server on loopback that serves studio_degraded.json (checked
against the backend's Health and JobAccepted schemas by tests/test_blender.py): a real Ray head cannot be lost on
cue here. The token states use the real tiny backend.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import bpy
import pytest

from conftest import make_scene
from test_addon import draw_all
from test_backend import _beat_until, _drive_timer, _tick_until

ANSWERS = json.loads((Path(__file__).parent / "studio_degraded.json").read_text())
STUDIO_TOKEN = "studio-token"


class StudioBackend(BaseHTTPRequestHandler):
    """A backend whose Ray cluster is lost: degraded health (details only to the token), jobs accepted with a
    note and polled as queued until `job_status` says otherwise."""

    job_status = "queued"

    def _send(self, status: int, body: Any = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {STUDIO_TOKEN}"

    def do_GET(self) -> None:
        health = ANSWERS["health"]
        if self.path == "/v1/health":
            self._send(200, health if self._authorized() else {"status": health["status"],
                                                                 "version": health["version"]})
        elif not self._authorized():
            self._send(401, {"error": {"code": "unauthorized", "message": "missing or wrong token"}})
        elif self.path.startswith("/v1/jobs?"):  # Test Connection proves the token with the job list
            self._send(200, {"jobs": [{**ANSWERS["accepted"]["job"], "status": type(self).job_status}]})
        elif self.path.startswith("/v1/jobs/"):
            self._send(200, {**ANSWERS["accepted"]["job"], "status": type(self).job_status})
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

    def do_HEAD(self) -> None:  # every file is already held: the add-on skips the upload
        self._send(200 if self._authorized() and self.path.startswith("/v1/files/") else 404)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorized():
            self._send(401, {"error": {"code": "unauthorized", "message": "missing or wrong token"}})
        elif self.path in ("/v1/generations", "/v1/actions"):
            self._send(202, ANSWERS["accepted"])
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture()
def studio(prefs: Any) -> Iterator[Any]:
    """The preferences pointed at a StudioBackend on a free loopback port, with its token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StudioBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StudioBackend.job_status = "queued"
    prefs.backend_url = f"http://127.0.0.1:{server.server_address[1]}"
    prefs.token = STUDIO_TOKEN
    try:
        yield prefs
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _labels() -> list[str]:
    return draw_all().kinds("label")


def test_degraded_pool_shows_its_reason_while_the_backend_still_answers(studio: Any, addon: Any) -> None:
    make_scene()
    connection = addon.connection.CONNECTION
    _beat_until(addon, "DEGRADED")
    reason = ANSWERS["health"]["cluster"]["reason"]
    assert connection.summary == f"Backend degraded: {reason}"
    assert connection.answered_at is not None and not connection.error
    assert connection.model_size() == (96, 64)  # it answers: its model is known, renders are sized by it
    labels = _labels()
    assert f"Backend degraded: {reason}" in labels
    assert "New jobs wait in the queue until the studio pool is back" in labels
    assert not any(t.startswith(("Connected", "Backend not answering")) for t in labels)
    assert bpy.ops.flexiact.test_connection() == {"FINISHED"}  # answering, so Test Connection passes


def test_job_accepted_with_a_note_says_why_it_waits(studio: Any, addon: Any, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """A 202 with a note: the status bar says it, the job's box shows it while queued, and it goes once ended."""
    scene = make_scene()
    s = scene.flexiact
    s.action_id, s.prompt, s.steps = "a" * 32, "a cube slides", 2
    image = tmp_path / "target.png"
    image.write_bytes(b"a target frame")  # the backend holds every file: only its id is sent
    request = addon.requests.generation(s, str(image), 24.0)
    capfd.readouterr()
    key = addon.jobs.submit(scene, addon.preferences.make_client(bpy.context), "GENERATE", request, (96, 64),
                            wait=False)
    note = ANSWERS["accepted"]["note"]

    def record() -> Any:
        return addon.jobs.find_record(scene.name, key)[1]

    _tick_until(addon.runner, lambda: record().status == "QUEUED", "accepted job")
    assert record().note == note
    assert f"Warning: FlexiAct: Generate 'a cube slides': {note}" in capfd.readouterr().out
    assert note in _labels()
    StudioBackend.job_status = "cancelled"  # the job ends: polling stops and the note is past
    _drive_timer(addon.runner)
    assert record().status == "CANCELLED" and record().note == ""
    assert note not in _labels()


@pytest.mark.parametrize("token, state", [("wrong-token", "Token refused"), ("", "Token missing")])
def test_refused_token_is_its_own_state_not_a_dead_backend(backend: Any, addon: Any, token: str,
                                                           state: str) -> None:
    """The real backend answers but refuses the token: the panel asks for the token and never says it is down."""
    make_scene()
    connection = addon.connection.CONNECTION
    backend.token = token
    _beat_until(addon, "TOKEN")
    expected = f"{state}: set the token the backend was started with (Preferences › Token)"
    assert connection.summary == expected and connection.answered_at is not None
    labels = _labels()
    assert expected in labels
    assert not any(t.startswith(("Backend not answering", "Failed", "Connected")) for t in labels)
    assert not any(t.startswith("Start a backend") for t in labels)  # one runs: no advice to start one
    backend.token = os.environ["FLEXIACT_TEST_TOKEN"]  # the right token: connected again on the next beat
    _beat_until(addon, "CONNECTED")
