"""Generations and jobs: queue a generation, list and follow jobs, cancel or finish early, download videos
(each take of a generation, each preview of an extraction)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from ..context import Requester, Svc
from ..db import TERMINAL
from ..api_errors import APIError
from ..schemas import (MAX_TAKES, GenerationCreate, Job, JobAccepted, JobList, JobStatus, ObjectId, Preview,
                       job_out)

SSE_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0

router = APIRouter(tags=["jobs"])


@router.post("/generations", status_code=202, response_model=JobAccepted)
def create_generation(svc: Svc, who: Requester, body: GenerationCreate) -> dict:
    """Queue a generation of the target image performing the action, returned at the requested fps."""
    svc.file_of_kind(body.image, "image")
    if body.action is not None:
        action = svc.action_or_404(body.action)
        if action["status"] != "ready":
            raise APIError(409, "action_not_ready", f"action {body.action} is {action['status']}; wait until "
                           "its extraction succeeds")
    return {"job": job_out(svc.queue_generation(body, who)), "note": svc.pool.queue_note()}


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


@router.post("/jobs/{job_id}/finish", response_model=JobAccepted)
def finish_job(svc: Svc, job_id: ObjectId) -> dict:
    """A running extraction stops at its next step and its action becomes ready from the tokens so far."""
    job = svc.job_or_404(job_id)
    if job["kind"] != "extract":
        raise APIError(409, "not_an_extraction", f"job {job_id} is a generation; only an extraction can be "
                       "finished early (cancel a generation instead)")
    if job["status"] in TERMINAL:
        raise APIError(409, "not_running", f"job {job_id} already ended ({job['status']}); there is nothing to "
                       "finish")
    if job["step"] == 0:
        raise APIError(409, "not_started", f"job {job_id} has not trained a step yet, so there are no tokens to "
                       "keep; wait until it trains, or cancel it")
    svc.db.request_finish(job_id)
    return {"job": job_out(svc.job_or_404(job_id))}


@router.get("/jobs/{job_id}/video", response_class=FileResponse, responses={
    200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the generated video (of one take: `take`, from 0)"}})
def job_video(svc: Svc, job_id: ObjectId, take: Annotated[int, Query(ge=0, lt=MAX_TAKES)] = 0) -> FileResponse:
    job = svc.job_or_404(job_id)
    if job["kind"] != "generate":
        raise APIError(404, "not_found", f"job {job_id} is an extraction; it has no video")
    if job["status"] != "succeeded":
        raise APIError(409, "not_ready", f"job {job_id} is {job['status']}; the video exists once it succeeds")
    takes = job["result"].get("takes") or [job["result"]]
    if take >= len(takes):
        raise APIError(404, "not_found", f"job {job_id} made {len(takes)} take(s); ask for take 0 to {len(takes) - 1}")
    what = f"the video of job {job_id}" + (f" (take {take})" if len(takes) > 1 else "")
    return svc.video_response(takes[take]["video"], what, f"flexiact-{job_id}-take{take}.mp4")


@router.get("/jobs/{job_id}/previews", response_model=list[Preview])
def list_previews(svc: Svc, job_id: ObjectId) -> list[dict]:
    """An extraction's preview videos so far, oldest first, each rendered at a training step."""
    job = svc.job_or_404(job_id)
    if job["kind"] != "extract":
        raise APIError(404, "not_found", f"job {job_id} is a generation; only extractions have previews")
    out = []
    for preview in svc.db.list_previews(job_id):
        rec = svc.db.get_file(preview["file"])
        if rec is not None:
            meta = {k: rec["meta"][k] for k in ("frames", "fps", "duration_s", "width", "height")}
            out.append({"step": preview["step"], "url": f"/v1/jobs/{job_id}/previews/{preview['step']}",
                        "created_at": preview["created_at"], **meta})
    return out


@router.get("/jobs/{job_id}/previews/{step}", response_class=FileResponse, responses={
    200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the preview rendered at that training step"}})
def preview_video(svc: Svc, job_id: ObjectId, step: Annotated[int, PathParam(ge=0, le=100_000)]) -> FileResponse:
    svc.job_or_404(job_id)
    preview = svc.db.get_preview(job_id, step)
    if preview is None:
        steps = ", ".join(str(p["step"]) for p in svc.db.list_previews(job_id)) or "none yet"
        raise APIError(404, "not_found", f"job {job_id} has no preview at step {step}; its previews: {steps}")
    return svc.video_response(preview["file"], f"the preview of job {job_id} at step {step}",
                              f"flexiact-{job_id}-step{step}.mp4")


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
