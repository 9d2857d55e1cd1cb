"""Every error leaves the service as JSON `{"error": {"code", "message"}}`, with a 4xx for what the client did."""

from __future__ import annotations

import errno
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CheckpointError, FlexiActError, MediaError, MediaTooLarge
from .schemas import ErrorResponse

log = logging.getLogger("flexiact.service")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_request", 507: "insufficient_storage"}

#: The error answers every /v1 route may give, as published in /openapi.json.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": desc} for status, desc in (
        (400, "bad request (e.g. malformed JSON)"), (401, "missing or wrong token"), (404, "unknown id"),
        (409, "not possible in the current state"), (413, "over a size limit"),
        (415, "unsupported file type"), (422, "invalid field or unusable media"),
        (507, "not enough free disk on the server"))}


class APIError(Exception):
    """An error answer raised from a route: status, stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def path_redactor(roots: Iterable[Path | str]) -> Callable[[str], str]:
    """A function that replaces every path under `roots` in a message by the file's name alone.

    Why: a message goes to whoever sent the request; the server's directory layout is none of their business.
    """
    prefixes = sorted({str(p) for r in roots for p in (Path(r), Path(r).resolve()) if str(p) not in ("", "/")},
                      key=len, reverse=True)
    if not prefixes:
        return lambda text: text
    pattern = re.compile("(?:" + "|".join(map(re.escape, prefixes)) + r")(?![\w.-])(?:/[^\s'\"():,;]*)?")
    return lambda text: pattern.sub(lambda m: Path(m.group(0)).name or "(server path)", text)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed_json", "the request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts) or "invalid request"


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the published schema lists for this path (Starlette's own 405 names only one route's)."""
    paths = app.openapi()["paths"]
    if path in paths:  # a literal path like /v1/actions/import wins over /v1/actions/{action_id}
        return sorted(m.upper() for m in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def install_error_handlers(app: FastAPI, redact: Callable[[str], str]) -> None:
    """Every error as JSON; `redact` takes server paths out of each message."""

    def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": redact(message)}}, status_code=status,
                            headers=headers)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), detail, headers)

    @app.exception_handler(FlexiActError)
    async def _flexiact(request: Request, exc: FlexiActError) -> JSONResponse:
        status = 413 if isinstance(exc, MediaTooLarge) else 422 if isinstance(exc, (MediaError, CheckpointError)) else 400
        return error_response(status, exc.code, str(exc))

    @app.exception_handler(OSError)
    async def _os(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return error_response(507, "insufficient_storage", "the server's disk is full; the request was not "
                                  "stored. Free space on the server (or run `flexiact-backend gc`) and try again.")
        return _internal(request)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request)

    def _internal(request: Request) -> JSONResponse:
        """A logged 500 with an id to find it in the log by; the client sees no traceback and no internals."""
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error {error_id}; this is a bug: report it with "
                              "this id (the server's log holds the details under it)")
