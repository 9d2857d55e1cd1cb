"""Bearer-token check and the rule that a token is needed off loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress


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


def token_matches(authorization: str, expected: bytes) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header value."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), expected)


def client_key(authorization: str, peer: str | None) -> str:
    """Whom a request counts against for the per-token limits: its token (hashed), else its peer address."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return "token:" + hashlib.sha256(given.strip().encode("latin-1")).hexdigest()[:16]
    return f"peer:{peer or '?'}"
