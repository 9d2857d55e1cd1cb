"""HTTP client for the FlexiAct backend (standard library only, no bpy: it runs in worker threads)."""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import urllib.parse
from typing import Any, BinaryIO

CHUNK = 1024 * 1024


class BackendError(Exception):
    """A failure stated in words a user can act on; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, code: str = "error", status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


def with_scheme(url: str) -> str:
    """The URL as typed, with http:// put in front when it names no scheme ("127.0.0.1:8765")."""
    url = url.strip()
    return url if not url or "://" in url else f"http://{url}"


def url_port(url: str) -> int:
    """The port a backend URL names (its scheme's default when it names none)."""
    parts = urllib.parse.urlsplit(with_scheme(url))
    try:
        return parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # not a number
        return 0


def port_taken(url: str, timeout: float = 0.5) -> bool:
    """True when something already listens where the URL points."""
    parts = urllib.parse.urlsplit(with_scheme(url))
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", url_port(url)), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(url: str) -> bool:
    """True when the URL names this machine, so no online access is needed to reach it."""
    host = urllib.parse.urlsplit(with_scheme(url)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def file_sha256(path: str) -> str:
    """The id the backend gives a file (its sha256), so an upload can be skipped when it has it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class BackendClient:
    """One backend at `url`; every call opens its own connection so threads never share one."""

    def __init__(self, url: str, token: str = "", timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(with_scheme(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"Backend URL {url!r} is not an http:// or https:// address (e.g. "
                               "http://127.0.0.1:8765): fix it in the FlexiAct preferences", "bad_url")
        self.url = with_scheme(url).rstrip("/")
        self._parts = parts
        self.token = token
        self.timeout = timeout

    # -- plumbing -----------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=self.timeout)

    def _open(self, method: str, path: str, body: bytes | BinaryIO | None = None,
              headers: dict[str, str] | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; raise BackendError for no answer or an error status, else return the response."""
        all_headers = {"Accept": "application/json"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        conn = self._connection()
        try:
            conn.request(method, self._parts.path.rstrip("/") + path, body=body, headers=all_headers)
            response = conn.getresponse()
        except (ConnectionError, socket.timeout, socket.gaierror, OSError) as exc:
            conn.close()
            raise BackendError(
                f"Cannot reach the FlexiAct backend at {self.url} ({exc.__class__.__name__}: {exc}). "
                "Is it running? Start it with `flexiact-backend serve --tiny` (a quick test model) or "
                "from the add-on preferences.",
                "unreachable") from exc
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise self._error(response.status, raw)
        return conn, response

    def _error(self, status: int, raw: bytes) -> BackendError:
        """Turn an error response into a message; 401 gets advice about the token."""
        code, message = "http_error", raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"
        try:
            body = json.loads(raw)
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                code = str(err.get("code", code))
                message = str(err.get("message", message))
        except ValueError:
            pass
        if status == 401 and not self.token:
            return BackendError(
                "The backend needs a token (401 Unauthorized): set the token it was started with "
                "in Preferences › Add-ons › FlexiAct.", "token_missing", status)
        if status == 401:
            return BackendError(
                "The backend refused the token (401 Unauthorized): set the token it was started with "
                "in Preferences › Add-ons › FlexiAct.", "unauthorized", status)
        return BackendError(f"Backend error {status} ({code}): {message}", code, status)

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn, response = self._open(method, path, body, headers)
        try:
            raw = response.read()
        finally:
            conn.close()
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise BackendError(f"The server at {self.url} did not answer with JSON: is it a FlexiAct backend?",
                               "bad_response", response.status) from exc

    # -- API ----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """GET /v1/health: model size, frames, fps, device and queue (sent with the token: the backend shows
        them only to it; without them the token is missing or wrong)."""
        health = self._json("GET", "/v1/health")
        if isinstance(health, dict) and "model" not in health:
            raise self._error(401, b"")
        return health

    def has_file(self, file_id: str) -> bool:
        """HEAD /v1/files/{id}: True when the server already holds this content."""
        try:
            conn, response = self._open("HEAD", f"/v1/files/{file_id}")
        except BackendError as exc:
            if exc.status == 404:
                return False
            raise
        response.read()
        conn.close()
        return True

    def upload(self, path: str, fps: float | None = None) -> dict[str, Any]:
        """Upload a file (skipped when the server has it already, then only `id` is known); return its record.

        The server tells what the file is from its content, so no type is guessed here; `fps` is the frame rate
        of a zip of numbered frames (an image sequence), whose stored id is that of the clip made from it."""
        if not os.path.isfile(path):
            raise BackendError(f"File not found: {path}", "missing_file")
        if fps is None:
            file_id = file_sha256(path)
            if self.has_file(file_id):
                return {"id": file_id, "meta": {}}
        query = "" if fps is None else "?" + urllib.parse.urlencode({"fps": repr(float(fps))})
        with open(path, "rb") as fh:
            headers = {"Content-Type": "application/octet-stream",
                       "X-Filename": urllib.parse.quote(os.path.basename(path)),
                       "Content-Length": str(os.path.getsize(path))}
            conn, response = self._open("POST", "/v1/files" + query, fh, headers)
            try:
                body = json.loads(response.read())
            finally:
                conn.close()
        return body

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON request (see requests.py) and return the answer."""
        return self._json("POST", route, payload)

    def list_actions(self) -> list[dict[str, Any]]:
        """GET /v1/actions."""
        body = self._json("GET", "/v1/actions")
        return list(body.get("actions", [])) if isinstance(body, dict) else list(body or [])

    def recent_jobs(self, limit: int = 1) -> list[dict[str, Any]]:
        """GET /v1/jobs (needs the token, unlike /v1/health)."""
        return list(self._json("GET", f"/v1/jobs?limit={int(limit)}").get("jobs", []))

    def rename_action(self, action_id: str, name: str) -> dict[str, Any]:
        """PATCH /v1/actions/{id} → the action."""
        return self._json("PATCH", f"/v1/actions/{urllib.parse.quote(action_id)}", {"name": name})

    def delete_action(self, action_id: str) -> None:
        """DELETE /v1/actions/{id}."""
        self._json("DELETE", f"/v1/actions/{urllib.parse.quote(action_id)}")

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}."""
        return self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel."""
        return self._json("POST", f"/v1/jobs/{urllib.parse.quote(job_id)}/cancel")

    def finish(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/finish: a running extraction stops at its next step, its action ready as it is."""
        return self._json("POST", f"/v1/jobs/{urllib.parse.quote(job_id)}/finish")

    def previews(self, job_id: str) -> list[dict[str, Any]]:
        """GET /v1/jobs/{id}/previews: the extraction's previews so far, oldest first."""
        return list(self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}/previews") or [])

    def download_video(self, job_id: str, dest: str, take: int = 0) -> str:
        """The job's mp4 (one take of it) to `dest`."""
        return self.download(f"/v1/jobs/{urllib.parse.quote(job_id)}/video?take={int(take)}", dest)

    def download(self, path: str, dest: str) -> str:
        """Stream an mp4 the backend serves at `path` to `dest` through a temporary file, so a partial file
        never looks done."""
        conn, response = self._open("GET", path, headers={"Accept": "video/mp4"})
        tmp = dest + ".part"
        try:
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
            os.replace(tmp, dest)
        finally:
            conn.close()
            if os.path.exists(tmp):
                os.remove(tmp)
        return dest
