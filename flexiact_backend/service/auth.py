"""Bearer-token check and the rule that a token is needed off loopback."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>` when the server has a token")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the service beyond this machine without a token."""
    if not token and not is_loopback(host):
        raise SystemExit(
            f"refusing to listen on {host} without a token: anyone who can reach this address could upload files "
            "and run jobs on your GPU. Pass --token (or FLEXIACT_TOKEN), or keep the default --host 127.0.0.1.")


def make_token_check(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through only with the right token (when one is set)."""
    expected = token.encode() if token else None

    async def require_token(request: Request) -> None:
        if expected is None:
            return
        creds: HTTPAuthorizationCredentials | None = await bearer(request)
        given = creds.credentials.encode() if creds else b""
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_token
