"""What every request passes before any route reads it: Host, Origin, token, body size and read timeouts.

Why an ASGI middleware and not a FastAPI dependency: FastAPI reads and parses a JSON body before it runs
dependencies, so a token check there lets an unauthenticated client make the server hold any body it sends.
Here the request is refused from its headers alone, and the body is counted and timed as it arrives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from .auth import token_matches

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/v1/health"})
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: Routes whose body is a file upload, limited per kind by the upload policy instead of the JSON cap.
UPLOAD_PATHS = frozenset({"/v1/files"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyRefused(HTTPException):
    """Raised from `receive` when a body goes past its cap or stalls; FastAPI passes it on as the answer."""

    def __init__(self, status: int, message: str) -> None:
        # the rest of the body is never read: the connection cannot carry another request
        super().__init__(status, message, headers={"Connection": "close"})


def host_name(host_header: str) -> str:
    """'example.com:8765' -> 'example.com', '[::1]:8765' -> '::1', lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """Refuses a request from its headers (foreign Host, foreign Origin, missing token), caps and times its body."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: frozenset[str], public_docs: bool,
                 json_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.expected = token.encode() if token else None
        self.allowed_hosts = allowed_hosts
        self.open_paths = OPEN_PATHS | (DOCS_PATHS if public_docs else frozenset())
        self.json_body_bytes, self.body_timeout_s = json_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        cap = None if scope["path"] in UPLOAD_PATHS else self.json_body_bytes
        declared = headers.get("content-length", "")
        if refusal is None and cap is not None and declared.isdigit() and int(declared) > cap:
            refusal = 413, "too_large", f"request bodies are limited to {cap} bytes", {}
        if refusal is not None:
            await _answer(send, *refusal)
            return
        await self.app(scope, self._bounded(receive, cap), send)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str, dict[str, str]] | None:
        """(status, code, message, headers) when the request must not reach a route, else None."""
        host = host_name(headers.get("host", ""))
        if host not in self.allowed_hosts:
            return 400, "host_not_allowed", (
                f"this server does not answer to the host name {host or '(none)'!r}; if you reach it under that "
                "name on purpose, restart it with --allowed-host NAME"), {}
        if scope["method"] not in SAFE_METHODS and not _same_origin(headers, scope.get("scheme", "http")):
            return 403, "cross_origin", ("cross-origin requests that change state are refused: a web page "
                                         "cannot drive this server"), {}
        if self.expected is not None and scope["path"] not in self.open_paths:
            if not token_matches(headers.get("authorization", ""), self.expected):
                return 401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'", {
                    "WWW-Authenticate": "Bearer"}
        return None

    def _bounded(self, receive: Receive, cap: int | None) -> Receive:
        """`receive` that fails past `cap` body bytes or when the client sends nothing for body_timeout_s."""
        state = {"size": 0, "done": False}

        async def bounded() -> Message:
            if state["done"]:  # after the body only a disconnect can come: no timeout on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"the client sent nothing for {self.body_timeout_s:g} s "
                                  "while sending the request body; the request was dropped") from None
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if cap is not None and state["size"] > cap:
                    raise BodyRefused(413, f"request bodies are limited to {cap} bytes")
            else:
                state["done"] = True
            return message

        return bounded


def _same_origin(headers: dict[str, str], scheme: str) -> bool:
    """A state change is allowed from no browser page, or from a page this server served itself."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    return origin is None or origin.lower() == f"{scheme}://{headers.get('host', '').lower()}"


async def _answer(send: Send, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    """A refusal from the headers alone; the body is never read, so the connection closes after it."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
