"""GET /v1/health: open without a token (liveness and version), so the add-on can tell "down" from "wrong
token"; what runs where, the disk and the timings only with the token."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ... import __version__
from ...presets import PRESETS
from ..auth import token_matches
from ..context import Svc
from ..api_errors import ERROR_RESPONSES
from ..schemas import Health

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, response_model_exclude_unset=True,
            responses={422: ERROR_RESPONSES[422]})
def health(svc: Svc, request: Request) -> dict:
    """Is the server up (open to all); with the token also which model, which device, how busy."""
    loaded = svc.pool.loaded.is_set()
    status = "ok" if loaded else ("error" if svc.pool.load_error else "loading")
    cluster = svc.pool.cluster_health()
    if cluster is not None and cluster["status"] == "degraded":
        status = "degraded"
    token = svc.config.token
    if token and not token_matches(request.headers.get("authorization", ""), token.encode()):
        return {"status": status, "version": __version__}
    i = svc.info
    return {"status": status, "version": __version__,
            "model": {"id": i.id, "tiny": i.tiny, "loaded": loaded, "width": i.width, "height": i.height,
                      "frames": i.frames, "fps": i.fps,
                      "error": svc.redact(svc.pool.load_error) if svc.pool.load_error else None},
            "device": svc.pool.device_health(), "queue": svc.db.queue_counts(), "workers": svc.pool.workers_health(),
            "presets": PRESETS, "disk": svc.disk_health(),
            "step_s": svc.db.seconds_per_step(), "cluster": cluster}
