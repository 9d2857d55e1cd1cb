"""GET /v1/health: open without a token, so the add-on can tell "down" from "wrong token"."""

from __future__ import annotations

from fastapi import APIRouter

from ... import __version__
from ...presets import PRESETS
from ..context import Svc
from ..api_errors import ERROR_RESPONSES
from ..schemas import Health

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, responses={422: ERROR_RESPONSES[422]})
def health(svc: Svc) -> dict:
    """Open without a token: is the server up, which model, which device, how busy."""
    loaded = svc.pool.loaded.is_set()
    status = "ok" if loaded else ("error" if svc.pool.load_error else "loading")
    cluster = svc.pool.cluster_health()
    if cluster is not None and cluster["status"] == "degraded":
        status = "degraded"
    i = svc.info
    return {"status": status, "version": __version__,
            "model": {"id": i.id, "tiny": i.tiny, "loaded": loaded, "width": i.width, "height": i.height,
                      "frames": i.frames, "fps": i.fps,
                      "error": svc.redact(svc.pool.load_error) if svc.pool.load_error else None},
            "device": svc.pool.device_health(), "queue": svc.db.queue_counts(), "workers": svc.pool.workers_health(),
            "presets": PRESETS, "disk": svc.disk_health(),
            "step_s": svc.db.seconds_per_step(), "cluster": cluster}
