"""The backend's health, kept in this one place: what the panels show and what renders are sized by."""

from __future__ import annotations

import time
from typing import Any, Callable

import bpy

from . import runner
from .client import BackendClient, BackendError

HEALTH_TIMEOUT_S = 5.0
#: How often the backend is asked whether it is alive while Blender runs; a dead one shows within this plus
#: HEARTBEAT_TIMEOUT_S.
HEARTBEAT_S = 2.0
HEARTBEAT_TIMEOUT_S = 3.0
#: BackendClient's error codes for a backend that answered but refused (or was not sent) the token
TOKEN_CODES = ("unauthorized", "token_missing")


class Connection:
    """The last /v1/health answer, when the backend last answered anything, and why it does not now."""

    def __init__(self) -> None:
        self.health: dict[str, Any] | None = None
        self.error = ""
        #: the failed call's error code ("unauthorized", "token_missing": the backend answered but not to us)
        self.error_code = ""
        #: time.monotonic() of the backend's last answer to any call (None: not since it was last changed)
        self.answered_at: float | None = None

    def update(self, health: dict[str, Any] | None, error: BackendError | None = None) -> None:
        """A health call's outcome. A failure keeps the last health (its model size, presets, step times)."""
        if error is not None:
            self.error, self.error_code = error.message, error.code
            if error.status == 401:  # it answered: only the token keeps it from telling more
                self.answered_at = time.monotonic()
            return
        self.health, self.error, self.error_code = health, "", ""
        if health is not None:
            self.answered_at = time.monotonic()

    def answered(self) -> None:
        """Any call was answered (a job poll, a download): the backend is alive (callable from any thread)."""
        self.answered_at = time.monotonic()
        if self.health is not None:
            self.error, self.error_code = "", ""

    def forget(self) -> None:
        """The backend changed (URL, token, started or stopped): ask again next time."""
        self.health, self.error, self.error_code, self.answered_at = None, "", "", None

    @property
    def state(self) -> str:
        """CONNECTED (the last call was answered), DEGRADED (answered, but its studio pool is lost: jobs wait),
        TOKEN (answered, but refused the token), DOWN (not answered) or UNKNOWN (not asked yet)."""
        if self.error:
            return "TOKEN" if self.error_code in TOKEN_CODES else "DOWN"
        if self.health is None:
            return "UNKNOWN"
        return "DEGRADED" if self.health.get("status") == "degraded" else "CONNECTED"

    def degraded_reason(self) -> str:
        """Why the backend's studio pool (its Ray cluster) is unreachable, in the backend's words."""
        cluster = (self.health or {}).get("cluster") or {}
        return str(cluster.get("reason") or "its studio pool is unreachable")

    def age(self) -> str:
        """How long ago the backend last answered, in words ("" when it never did)."""
        if self.answered_at is None:
            return ""
        seconds = max(0, int(time.monotonic() - self.answered_at))
        return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"

    @property
    def summary(self) -> str:
        if self.state == "CONNECTED":
            model, device = self.health.get("model", {}), self.health.get("device", {})
            queue = self.health.get("queue", {})
            return (f"Connected · {model.get('id', '?')}{' (tiny)' if model.get('tiny') else ''} · "
                    f"{device.get('type', '?')} · queue {queue.get('running', 0)} running, "
                    f"{queue.get('queued', 0)} queued · answered {self.age()}")
        if self.state == "DEGRADED":
            return f"Backend degraded: {self.degraded_reason()}"
        if self.state == "TOKEN":
            what = "Token missing" if self.error_code == "token_missing" else "Token refused"
            return f"{what}: set the token the backend was started with (Preferences › Token)"
        if self.state == "DOWN" and self.answered_at is not None:
            return f"Backend not answering (last answer {self.age()}): {self.error}"
        return f"Failed: {self.error}" if self.error else ""

    def is_tiny(self) -> bool:
        """The backend serves the tiny test model, whose clips are noise by design."""
        return bool(((self.health or {}).get("model") or {}).get("tiny"))

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


class Heartbeat:
    """Asks the backend for its health every HEARTBEAT_S (a Blender timer), so the panel's connection state, model
    and step times are current without Test Connection; one call at a time."""

    def __init__(self) -> None:
        self.client_factory: Callable[[float], BackendClient] | None = None
        self._asked_at: float | None = None  # the call in flight (an answer dropped on file load expires)

    def tick(self) -> float | None:
        """The timer: start a health call unless one is in flight; returns the interval to the next tick."""
        if self.client_factory is None:
            return None
        now = time.monotonic()
        if self._asked_at is None or now - self._asked_at > HEARTBEAT_TIMEOUT_S + HEARTBEAT_S:
            try:
                client = self.client_factory(HEARTBEAT_TIMEOUT_S)
            except BackendError as exc:  # no usable URL, or a remote backend without Online Access
                CONNECTION.update(None, exc)
                return HEARTBEAT_S
            self._asked_at = now
            runner.call(client.health, self._answered)
        return HEARTBEAT_S

    def _answered(self, health: dict[str, Any] | None, error: BackendError | None) -> None:
        self._asked_at = None
        CONNECTION.update(health, error)



HEARTBEAT = Heartbeat()


def heartbeat_tick() -> float | None:
    """The Blender timer of HEARTBEAT (a plain function: Blender finds timers by identity)."""
    return HEARTBEAT.tick()


def start_heartbeat(client_factory: Callable[[float], BackendClient]) -> None:
    """Ask the backend now (in half a second) and every HEARTBEAT_S from then on."""
    HEARTBEAT.client_factory = client_factory
    if not bpy.app.timers.is_registered(heartbeat_tick):
        bpy.app.timers.register(heartbeat_tick, first_interval=0.5, persistent=True)


def stop_heartbeat() -> None:
    HEARTBEAT.client_factory = None
    if bpy.app.timers.is_registered(heartbeat_tick):
        bpy.app.timers.unregister(heartbeat_tick)
