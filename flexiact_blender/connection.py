"""The backend's health, kept in this one place: what the panels show and what renders are sized by."""

from __future__ import annotations

from typing import Any, Callable

from . import runner
from .client import BackendClient, BackendError

HEALTH_TIMEOUT_S = 5.0


class Connection:
    """The last /v1/health answer, or why there is none."""

    def __init__(self) -> None:
        self.health: dict[str, Any] | None = None
        self.error = ""

    def update(self, health: dict[str, Any] | None, error: BackendError | None = None) -> None:
        self.health = health
        self.error = error.message if error is not None else ""

    def forget(self) -> None:
        """The backend changed (URL, token, started or stopped): ask again next time."""
        self.update(None)

    @property
    def summary(self) -> str:
        if self.health is not None:
            model, device = self.health.get("model", {}), self.health.get("device", {})
            queue = self.health.get("queue", {})
            return (f"Connected · {model.get('id', '?')}{' (tiny)' if model.get('tiny') else ''} · "
                    f"{device.get('type', '?')} · queue {queue.get('running', 0)} running, "
                    f"{queue.get('queued', 0)} queued")
        return f"Failed: {self.error}" if self.error else ""

    def model_size(self) -> tuple[int, int]:
        """(width, height) the model generates at; 0 × 0 before the health is known."""
        model = (self.health or {}).get("model", {})
        return int(model.get("width") or 0), int(model.get("height") or 0)

    def clip_seconds(self) -> float:
        """How long the model's clip lasts (frames / fps; 6.125 s for CogVideoX); 0 before the health is known."""
        model = (self.health or {}).get("model", {})
        return float(model.get("frames") or 0) / float(model.get("fps") or 1)

    def seconds_per_step(self, kind: str) -> float | None:
        """The backend's measured time per step of `kind` (extract, generate); None until it has run one."""
        value = ((self.health or {}).get("step_s") or {}).get(kind)
        return float(value) if value else None

    def presets(self) -> dict[str, int]:
        """The backend's extraction presets (name → training steps); empty before the health is known."""
        return {str(k): int(v) for k, v in ((self.health or {}).get("presets") or {}).items()}


CONNECTION = Connection()


def check(client: BackendClient) -> dict[str, Any]:
    """The health, the model and the token, each failure saying which of the three to fix (off the main thread).

    /v1/health is open but shows the model only to the token; the authenticated call after it proves the token.
    """
    try:
        health = client.health()
    except BackendError as exc:
        field = "Token" if exc.status == 401 else "Backend URL"
        raise BackendError(f"{field}: {exc.message}", exc.code, exc.status) from exc
    if health.get("status") == "error":
        raise BackendError(f"Model: the backend is up but could not load its model: "
                           f"{(health.get('model') or {}).get('error')}. See the backend's log.", "load_failed")
    try:
        client.recent_jobs(1)
    except BackendError as exc:
        if exc.status == 401:
            raise BackendError(f"Token: {exc.message}", exc.code, exc.status) from exc
        raise
    return health


def with_health(client: BackendClient, then: Callable[[dict[str, Any]], str], wait: bool,
                failed: Callable[[str], None]) -> str | None:
    """Run `then(health)` now if the health is known, else once it has been fetched.

    `then` returns "" or a problem. When it runs now (known health, or wait=True) its problem is returned to the
    caller; when it runs later, the problem goes to `failed`.
    """
    if CONNECTION.health is not None:
        return then(CONNECTION.health)

    def done(health: dict[str, Any] | None, error: BackendError | None) -> str:
        CONNECTION.update(health, error)
        problem = error.message if error is not None else then(health or {})
        if problem and not wait:
            failed(problem)
        return problem

    return runner.call(client.health, done, wait)
