"""Admission: how many uploads run at once, per token and in all, refused at once past the bound.

Why refuse instead of queueing: a request that waits holds its connection and its temp file; an answer with
Retry-After lets the client come back, and the server's cost stays bounded whatever clients send.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .api_errors import APIError


class UploadSlots:
    """Uploads in progress, per token and in all. Past either bound a request is refused at once with
    Retry-After (429 for one token's share, 503 when the server is full), never queued behind the others."""

    RETRY_AFTER_S = 2

    def __init__(self, per_token: int, total: int) -> None:
        self.per_token, self.total = per_token, total
        self._lock = threading.Lock()
        self._by_key: dict[str, int] = {}

    @contextmanager
    def take(self, key: str) -> Iterator[None]:
        retry = {"Retry-After": str(self.RETRY_AFTER_S)}
        with self._lock:
            if sum(self._by_key.values()) >= self.total:
                raise APIError(503, "server_busy", f"the server is checking {self.total} uploads already (its "
                               f"limit); send this one again in {self.RETRY_AFTER_S} s", headers=retry)
            if self._by_key.get(key, 0) >= self.per_token:
                raise APIError(429, "too_many_uploads", f"{self.per_token} uploads with this token are in progress "
                               f"(the limit); send this one when one of them is done, or in {self.RETRY_AFTER_S} s",
                               headers=retry)
            self._by_key[key] = self._by_key.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._by_key[key] -= 1
                if not self._by_key[key]:
                    del self._by_key[key]
