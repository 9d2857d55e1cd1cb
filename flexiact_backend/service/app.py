"""The FastAPI application: the HTTP contract the Blender add-on relies on (issue 4, section 2)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path as PathParam, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from PIL import Image
from starlette.requests import ClientDisconnect

from .. import __version__, media
from ..actions import import_published_action
from ..errors import CheckpointError, MediaError
from ..model_info import read_model_info
from ..tiny import ensure_tiny_model
from .auth import make_token_check
from .config import ServiceConfig
from .db import TERMINAL, Database
from .errors import APIError, install_error_handlers
from .schemas import (SHA256_PATTERN, UUID_PATTERN, Action, ActionAccepted, ActionCreate, ActionImport, ActionList,
                      ErrorResponse, FileInfo, GenerationCreate, Health, Job, JobAccepted, JobList, JobStatus, job_out)
from .storage import FileStore, TooLarge, safe_suffix
from .worker import WorkerPool, work_dir

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}
SSE_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0

FileId = Annotated[str, PathParam(pattern=SHA256_PATTERN, description="sha256 of the file's content")]
ObjectId = Annotated[str, PathParam(pattern=UUID_PATTERN, description="32 hex digits")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": desc} for status, desc in (
        (400, "bad request (e.g. malformed JSON)"), (401, "missing or wrong token"), (404, "unknown id"),
        (409, "not possible in the current state"), (413, "over a size limit"),
        (415, "unsupported file type"), (422, "invalid field or unusable media"))}


def classify_upload(content_type: str, filename: str | None) -> str:
    """video, image or checkpoint from the Content-Type, else from the file name's extension."""
    major = content_type.split(";", 1)[0].strip().lower().split("/", 1)[0]
    if major in ("video", "image"):
        return major
    suffix = safe_suffix(filename)
    for kind, suffixes in (("video", VIDEO_SUFFIXES), ("image", IMAGE_SUFFIXES), ("checkpoint", CHECKPOINT_SUFFIXES)):
        if suffix in suffixes:
            return kind
    raise APIError(415, "unsupported_media_type",
                   "send Content-Type video/* or image/*, or an X-Filename ending in .pt or .safetensors")


def _checkpoint_format(path: Path) -> str:
    """'torch' (a torch.save zip) or 'safetensors', judged from the first bytes; nothing is unpickled here."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= 100 * 1024**2 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError("not a checkpoint: expected a published FlexiAct .pt file or a project .safetensors action")


class Service:
    """Everything a request needs: config, database, file store and the worker pool."""

    def __init__(self, config: ServiceConfig, *, memory_saving: bool = False, refadapter: Path | None = None) -> None:
        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(data_dir / "state.sqlite3")
        self.db.recover()
        self.store = FileStore(data_dir)
        model_dir = ensure_tiny_model(data_dir) if config.tiny else Path(config.model_dir)  # type: ignore[arg-type]
        self.info = read_model_info(model_dir)
        self.pool = WorkerPool(config, self.db, self.store, model_dir, self.info,
                               memory_saving=memory_saving, refadapter=refadapter)

    # ---- uploads -----------------------------------------------------------------------------
    def inspect(self, kind: str, path: Path, filename: str | None) -> tuple[dict, Path]:
        """Check an uploaded file is what it claims; returns its meta and its (possibly renamed) path."""
        try:
            return self._inspect(kind, path)
        except MediaError as exc:  # name the file as the client knows it, not by its temp name
            raise MediaError(str(exc).replace(path.name, Path(filename or "upload").name)) from None

    def _inspect(self, kind: str, path: Path) -> tuple[dict, Path]:
        if kind == "video":
            info = media.probe_video(path)
            return {"width": info.width, "height": info.height, "fps": info.fps, "duration_s": info.duration_s,
                    "frames": info.frames, "rotation": info.rotation, "has_audio": info.has_audio}, path
        if kind == "image":
            try:
                with Image.open(path) as img:
                    w, h = img.size
            except Exception:  # not an image: read_image_info below says so in the user's terms
                w = h = 0
            if w * h > self.config.limits.image_pixels:
                raise APIError(413, "too_large", f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit "
                               f"is {self.config.limits.image_pixels / 1e6:g} megapixels. Scale it down.")
            w, h = media.read_image_info(path)
            return {"width": w, "height": h}, path
        fmt = _checkpoint_format(path)
        renamed = path.with_suffix(".pt" if fmt == "torch" else ".safetensors")
        path.rename(renamed)
        return {"format": fmt}, renamed

    def file_of_kind(self, file_id: str, kind: str) -> dict:
        rec = self.db.get_file(file_id)
        if rec is None:
            raise APIError(404, "not_found", f"no uploaded file {file_id}; upload it with POST /v1/files")
        if rec["kind"] != kind:
            raise APIError(422, "wrong_file_kind", f"file {file_id} is a {rec['kind']}, not a {kind}")
        return rec

    def job_or_404(self, job_id: str) -> dict:
        job = self.db.get_job(job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id}")
        return job

    def action_or_404(self, action_id: str) -> dict:
        action = self.db.get_action(action_id)
        if action is None:
            raise APIError(404, "not_found", f"no action {action_id}")
        return action

    def action_path(self, action: dict) -> Path:
        return self.store.path(self.store.relpath(action["file"], ".safetensors"))


def create_app(config: ServiceConfig, *, memory_saving: bool = False, refadapter: Path | None = None) -> FastAPI:
    """Build the app; its workers start with the server and stop with it."""
    svc = Service(config, memory_saving=memory_saving, refadapter=refadapter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.pool.start()
        yield
        svc.pool.stop()
        svc.db.close()

    app = FastAPI(title="FlexiAct backend", version=__version__, lifespan=lifespan,
                  description="Action extraction and generation for the FlexiAct Blender add-on.")
    app.state.service = svc
    install_error_handlers(app)
    api = APIRouter(prefix="/v1", dependencies=[Depends(make_token_check(config.token))], responses=_ERRORS)

    @app.get("/v1/health", response_model=Health, tags=["service"], responses={422: _ERRORS[422]})
    def health() -> dict:
        """Open without a token: is the server up, which model, which device, how busy."""
        loaded = svc.pool.loaded.is_set()
        status = "ok" if loaded else ("error" if svc.pool.load_error else "loading")
        i = svc.info
        return {"status": status, "version": __version__,
                "model": {"id": i.id, "tiny": i.tiny, "loaded": loaded, "width": i.width, "height": i.height,
                          "frames": i.frames, "fps": i.fps, "error": svc.pool.load_error},
                "device": svc.pool.device_health(), "queue": svc.db.queue_counts()}

    # ---- files -------------------------------------------------------------------------------
    @api.post("/files", status_code=201, response_model=FileInfo, tags=["files"], openapi_extra={"requestBody": {
        "required": True, "description": "the raw file; Content-Type video/* or image/*, or a checkpoint",
        "content": {t: {"schema": {"type": "string", "format": "binary"}}
                    for t in ("video/mp4", "image/png", "image/jpeg", "application/octet-stream")}}})
    async def upload_file(request: Request, x_filename: Annotated[str | None, Header(max_length=255)] = None) -> dict:
        """Stream an upload to disk, check it, store it under its sha256."""
        kind = classify_upload(request.headers.get("content-type", ""), x_filename)
        limit = config.limits.bytes_for(kind)
        too_large = APIError(413, "too_large", f"{kind} files are limited to {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        try:
            tmp, sha, size = await svc.store.receive(request.stream(), limit, safe_suffix(x_filename))
        except TooLarge:
            raise too_large from None
        except ClientDisconnect:
            raise APIError(400, "incomplete_upload", "the upload was interrupted; send it again") from None
        try:
            if size == 0:
                raise APIError(422, "empty_file", "the file is empty (0 bytes)")
            existing = svc.db.get_file(sha)
            if existing is not None:
                return existing
            meta, tmp = await run_in_threadpool(svc.inspect, kind, tmp, x_filename)
            _sha, rel, size = svc.store.adopt(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return svc.db.add_file(sha, kind, size, rel, x_filename, meta)

    @api.api_route("/files/{file_id}", methods=["GET", "HEAD"], response_model=FileInfo, tags=["files"])
    def get_file(file_id: FileId) -> dict:
        """The file's record; HEAD answers 200 or 404 without a body, so a client can skip re-uploading."""
        rec = svc.db.get_file(file_id)
        if rec is None:
            raise APIError(404, "not_found", f"no uploaded file {file_id}")
        return rec

    # ---- actions -----------------------------------------------------------------------------
    @api.post("/actions", status_code=202, response_model=ActionAccepted, tags=["actions"])
    def create_action(body: ActionCreate) -> dict:
        """Queue an extraction; the same request for the same model returns the existing action instead."""
        video = svc.file_of_kind(body.video, "video")
        media.check_trim(media.VideoInfo(**video["meta"]), body.start_s, body.end_s)
        key_fields = [svc.info.id, body.video, body.start_s, body.end_s, body.steps, body.seed, body.caption]
        key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()
        action, job, _created = svc.db.create_extraction(
            key=key, name=body.name, caption=body.caption, video=body.video, start_s=body.start_s, end_s=body.end_s,
            steps=body.steps, seed=body.seed, base_model=svc.info.id, params=body.model_dump())
        svc.pool.wake()
        return {"action": action, "job": job_out(job)}

    @api.api_route("/actions/import", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def import_wrong_method() -> None:
        """Without this, GET /v1/actions/import would read 'import' as a malformed action id (a 422)."""
        raise APIError(405, "method_not_allowed", "use POST to import an action", headers={"Allow": "POST"})

    @api.post("/actions/import", status_code=201, response_model=Action, tags=["actions"])
    def import_action(body: ActionImport) -> dict:
        """Turn an uploaded published `.pt` (or a project safetensors) into a ready action, no training."""
        src = svc.file_of_kind(body.file, "checkpoint")
        out = svc.store.tmp_path(".safetensors")
        try:
            meta = import_published_action(svc.store.path(src["path"]), name=body.name, caption=body.caption,
                                           base_model=svc.info.id, out=out)
            sha, _rel, _size = svc.store.adopt(out)
        finally:
            out.unlink(missing_ok=True)
        return svc.db.add_imported_action(name=body.name, caption=body.caption, base_model=svc.info.id,
                                          file_id=sha, meta=meta)

    @api.get("/actions", response_model=ActionList, tags=["actions"])
    def list_actions() -> dict:
        return {"actions": svc.db.list_actions()}

    @api.get("/actions/{action_id}", response_model=Action, tags=["actions"])
    def get_action(action_id: ObjectId) -> dict:
        return svc.action_or_404(action_id)

    @api.delete("/actions/{action_id}", status_code=204, tags=["actions"])
    def delete_action(action_id: ObjectId) -> Response:
        """Delete an action and its file; an extraction still running for it is cancelled."""
        action = svc.db.delete_action(action_id)
        if action is None:
            raise APIError(404, "not_found", f"no action {action_id}")
        if action["file"] and not svc.db.file_in_use(action["file"]):
            svc.action_path(action).unlink(missing_ok=True)
        job = svc.db.get_job(action["job"]) if action["job"] else None
        if job is None or job["status"] != "running":  # a running job's worker removes its work dir itself
            shutil.rmtree(work_dir(config.data_dir, action_id), ignore_errors=True)
        return Response(status_code=204)

    @api.get("/actions/{action_id}/file", tags=["actions"], response_class=FileResponse, responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the action as safetensors"}})
    def action_file(action_id: ObjectId) -> FileResponse:
        action = svc.action_or_404(action_id)
        if action["status"] != "ready":
            raise APIError(409, "not_ready", f"action {action_id} is {action['status']}, not ready")
        return FileResponse(svc.action_path(action), media_type="application/octet-stream",
                            filename=f"{action_id}.safetensors")

    # ---- generations and jobs ----------------------------------------------------------------
    @api.post("/generations", status_code=202, response_model=JobAccepted, tags=["jobs"])
    def create_generation(body: GenerationCreate) -> dict:
        """Queue a generation of the target image performing the action, returned at the requested fps."""
        svc.file_of_kind(body.image, "image")
        if body.action is not None:
            action = svc.action_or_404(body.action)
            if action["status"] != "ready":
                raise APIError(409, "action_not_ready", f"action {body.action} is {action['status']}; wait until "
                               "its extraction succeeds")
        params = body.model_dump()
        params["transition"] = body.high_timesteps if body.high_timesteps <= 1 else body.high_timesteps / 1000
        job = svc.db.create_generation(params, body.steps, body.action)
        svc.pool.wake()
        return {"job": job_out(job)}

    @api.get("/jobs", response_model=JobList, tags=["jobs"])
    def list_jobs(status: JobStatus | None = None, kind: Literal["extract", "generate"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        """Newest first, optionally only one status or kind."""
        return {"jobs": [job_out(j) for j in svc.db.list_jobs(status, kind, limit)]}

    @api.get("/jobs/{job_id}", response_model=Job, tags=["jobs"])
    def get_job(job_id: ObjectId) -> dict:
        return job_out(svc.job_or_404(job_id))

    @api.post("/jobs/{job_id}/cancel", response_model=JobAccepted, tags=["jobs"])
    def cancel_job(job_id: ObjectId) -> dict:
        """A queued job is cancelled at once; a running one stops within one step."""
        job = svc.db.cancel_job(job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id}")
        return {"job": job_out(job)}

    @api.get("/jobs/{job_id}/video", tags=["jobs"], response_class=FileResponse, responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the generated video"}})
    def job_video(job_id: ObjectId) -> FileResponse:
        job = svc.job_or_404(job_id)
        if job["kind"] != "generate":
            raise APIError(404, "not_found", f"job {job_id} is an extraction; it has no video")
        if job["status"] != "succeeded":
            raise APIError(409, "not_ready", f"job {job_id} is {job['status']}; the video exists once it succeeds")
        rec = svc.db.get_file(job["result"]["video"])
        if rec is None:
            raise APIError(404, "not_found", f"the video of job {job_id} is gone")
        return FileResponse(svc.store.path(rec["path"]), media_type="video/mp4", filename=f"flexiact-{job_id}.mp4")

    @api.get("/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {"schema": {
            "type": "object", "description": "one server-sent event; `data` is the job's JSON",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}}},
              "description": "server-sent events: `event: job` with the job JSON on every change; ends when the "
                             "job finishes"}})
    async def job_events(job_id: ObjectId, request: Request) -> StreamingResponse:
        await run_in_threadpool(svc.job_or_404, job_id)

        async def stream() -> AsyncIterator[str]:
            seen, last_sent = None, time.monotonic()
            while True:
                job = await run_in_threadpool(svc.db.get_job, job_id)
                if job is None:
                    yield "event: gone\ndata: {}\n\n"
                    return
                if job["version"] != seen:
                    seen, last_sent = job["version"], time.monotonic()
                    yield f"id: {seen}\nevent: job\ndata: {json.dumps(job_out(job))}\n\n"
                elif time.monotonic() - last_sent > SSE_HEARTBEAT_S:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                if job["status"] in TERMINAL or await request.is_disconnected():
                    return
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    return app
