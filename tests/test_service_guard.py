"""Section 1 and 3 of the hardening issue on a real server: Host allow-list, no CORS, Origin check, the token
before the body, the JSON body cap, and header/body read timeouts."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from service_helpers import Client, ServerProcess

TOKEN = "guard-token"
ALLOWED = "studio.example"
#: a safety net for the socket tests; the timeouts under test are 1 s
SOCKET_WAIT_S = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    args = ("--allowed-host", ALLOWED, "--header-timeout", "1", "--body-timeout", "1")
    with ServerProcess(tmp_path_factory.mktemp("service-guard"), token=TOKEN, extra_args=args) as s:
        yield s


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _routes(server: ServerProcess) -> list[tuple[str, str]]:
    """Every (method, path) the server publishes, ids filled with well-formed values."""
    spec = httpx.get(f"{server.url}/openapi.json", headers=_auth()).json()
    out = []
    for template, operations in spec["paths"].items():
        path = template.replace("{file_id}", "0" * 64).replace("{job_id}", "a" * 32).replace("{action_id}", "b" * 32)
        out += [(method.upper(), path) for method in operations]
    return out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_foreign_host_is_refused_on_every_route(server: ServerProcess) -> None:
    routes = _routes(server) + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/v1/nowhere")]
    assert len(routes) >= 12
    for method, path in routes:
        r = httpx.request(method, server.url + path, headers={**_auth(), "Host": "evil.example"})
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        if method != "HEAD":
            assert r.json()["error"]["code"] == "host_not_allowed" and "--allowed-host" in r.json()["error"]["message"]
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}", ALLOWED,
                 f"{ALLOWED.upper()}:{server.port}"):
        r = httpx.get(f"{server.url}/v1/jobs", headers={**_auth(), "Host": host})
        assert r.status_code == 200, (host, r.text)


def test_no_cors_and_cross_origin_changes_are_refused(server: ServerProcess) -> None:
    evil = {"Origin": "http://evil.example", **_auth()}
    preflight = httpx.options(f"{server.url}/v1/generations", headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    read = httpx.get(f"{server.url}/v1/jobs", headers=evil)
    for r in (preflight, read):
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers
    for method, path in _routes(server):
        if method in ("GET", "HEAD"):
            continue
        for headers in (evil, {**_auth(), "Origin": "null"}, {**_auth(), "Sec-Fetch-Site": "cross-site"}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", (method, path, r.text)
    # the server's own origin (its own /docs page) may change state: here it reaches validation (422)
    own = httpx.post(f"{server.url}/v1/generations", json={}, headers={**_auth(), "Origin": server.url})
    assert own.status_code == 422, own.text


def test_docs_need_the_token(server: ServerProcess) -> None:
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers=_auth()).status_code == 200
    assert httpx.get(f"{server.url}/v1/health").status_code == 200  # health stays open


def test_unauthenticated_huge_body_is_refused_before_it_is_read(server: ServerProcess) -> None:
    pid = server.proc.pid
    before = _rss_kib(pid)
    chunk = b"x" * (1 << 20)
    for _ in range(4):  # declares 400 MiB, sends until the server answers (it answers from the headers alone)
        with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_WAIT_S) as s:
            s.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 419430400\r\n\r\n")
            sent = 0
            try:
                while sent < 400 * len(chunk):
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = s.recv(4096)
            assert b" 401 " in reply.split(b"\r\n", 1)[0], reply[:200]
            assert sent < 400 * len(chunk)  # the server closed the connection instead of reading it all
    def chunked():
        for _ in range(64):
            yield chunk
    r = httpx.post(f"{server.url}/v1/actions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    grew_mib = (_rss_kib(pid) - before) / 1024
    assert grew_mib < 8, f"server RSS grew by {grew_mib:.1f} MiB"


def test_json_bodies_are_capped(server: ServerProcess) -> None:
    big = {"image": "0" * 64, "prompt": "x" * (70 * 1024)}
    r = httpx.post(f"{server.url}/v1/generations", json=big, headers=_auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large" and "65536" in r.text

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192
    r = httpx.post(f"{server.url}/v1/generations", content=chunked(),
                   headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text


def _closed_or_answered(s: socket.socket) -> tuple[float, bytes]:
    t0 = time.monotonic()
    s.settimeout(SOCKET_WAIT_S)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return time.monotonic() - t0, data


def test_slow_head_and_stalled_body_are_dropped(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        waited, data = _closed_or_answered(s)
    assert data == b"" and waited < SOCKET_WAIT_S
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        waited, data = _closed_or_answered(s)
    assert data.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in data, data[:300]
    assert Client(server.url, TOKEN).request("GET", "/v1/jobs")[0] == 200  # and the server serves on
