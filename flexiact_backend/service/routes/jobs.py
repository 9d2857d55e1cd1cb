"""Generations and jobs: queue a generation, list and follow jobs, cancel, download the video."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from ..context import Svc
from ..db import TERMINAL
from ..errors import APIError
from ..schemas import GenerationCreate, Job, JobAccepted, JobList, JobStatus, ObjectId, job_out

SSE_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0

router = APIRouter(tags=["jobs"])


@router.post("/generations", status_code=202, response_model=JobAccepted)
def create_generation(svc: Svc, body: GenerationCreate) -> dict:
    """Queue a generation of the target image performing the action, returned at the requested fps."""
    svc.file_of_kind(body.image, "image")
    if body.action is not None:
        action = svc.action_or_404(body.action)
        if action["status"] != "ready":
            raise APIError(409, "action_not_ready", f"action {body.action} is {action['status']}; wait until "
                           "its extraction succeeds")
    return {"job": job_out(svc.queue_generation(body))}


@router.get("/jobs", response_model=JobList)
def list_jobs(svc: Svc, status: JobStatus | None = None, kind: Literal["extract", "generate"] | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """Newest first, optionally only one status or kind."""
    return {"jobs": [job_out(j) for j in svc.db.list_jobs(status, kind, limit)]}


@router.get("/jobs/{job_id}", response_model=Job)
def get_job(svc: Svc, job_id: ObjectId) -> dict:
    return job_out(svc.job_or_404(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobAccepted)
def cancel_job(svc: Svc, job_id: ObjectId) -> dict:
    """A queued job is cancelled at once; a running one stops within one step; a finished one is a 409."""
    job, changed = svc.db.cancel_job(job_id)
    if job is None:
        raise APIError(404, "not_found", f"no job {job_id}")
    if not changed:
        raise APIError(409, "already_finished", f"job {job_id} already ended ({job['status']}); nothing to cancel")
    return {"job": job_out(job)}


@router.get("/jobs/{job_id}/video", response_class=FileResponse, responses={
    200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the generated video"}})
def job_video(svc: Svc, job_id: ObjectId) -> FileResponse:
    job = svc.job_or_404(job_id)
    if job["kind"] != "generate":
        raise APIError(404, "not_found", f"job {job_id} is an extraction; it has no video")
    if job["status"] != "succeeded":
        raise APIError(409, "not_ready", f"job {job_id} is {job['status']}; the video exists once it succeeds")
    rec = svc.db.get_file(job["result"]["video"])
    if rec is None:
        raise APIError(410, "gone", f"the video of job {job_id} was removed by retention; generate it again")
    return FileResponse(svc.present(svc.store.path(rec["path"]), f"the video of job {job_id}"),
                        media_type="video/mp4", filename=f"flexiact-{job_id}.mp4")


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "description": "one server-sent event; `data` is the job's JSON",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}}},
          "description": "server-sent events: `event: job` with the job JSON on every change; ends when the "
                         "job finishes"}})
async def job_events(svc: Svc, job_id: ObjectId, request: Request) -> StreamingResponse:
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
