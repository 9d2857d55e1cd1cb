"""The FastAPI application: the HTTP contract the Blender add-on relies on (issue 4, section 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from .. import __version__
from .config import ServiceConfig
from .context import Service
from .api_errors import ERROR_RESPONSES, install_error_handlers
from .guard import RequestGuard
from .routes import actions, files, health, jobs


def create_app(config: ServiceConfig, *, memory_saving: bool = False, refadapter: Path | None = None) -> FastAPI:
    """Build the app; its workers start with the server and stop with it."""
    svc = Service(config, memory_saving=memory_saving, refadapter=refadapter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        yield
        svc.stop()

    app = FastAPI(title="FlexiAct backend", version=__version__, lifespan=lifespan,
                  description="Action extraction and generation for the FlexiAct Blender add-on.")
    app.state.service = svc
    install_error_handlers(app, svc.redact)
    # no CORS middleware on purpose: a browser page of another origin gets no Access-Control-Allow-* header
    app.add_middleware(RequestGuard, token=config.token, allowed_hosts=config.host_names(),
                       public_docs=config.public_docs, json_body_bytes=config.json_body_bytes,
                       body_timeout_s=config.body_timeout_s)
    app.include_router(health.router, prefix="/v1")
    for router in (files.router, actions.router, jobs.router):
        app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
    return app
