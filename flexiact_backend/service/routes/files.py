"""Uploads: POST /v1/files stores a video, image or checkpoint under its sha256."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from ..context import Svc
from ..schemas import FileId, FileInfo
from ..uploads import receive_upload

router = APIRouter(tags=["files"])


@router.post("/files", status_code=201, response_model=FileInfo, openapi_extra={"requestBody": {
    "required": True, "description": "the raw file, classified by its content: a video, an image, a zip of "
    "numbered frames (PNG, JPEG, TIFF or EXR; with `fps`) or an action checkpoint",
    "content": {t: {"schema": {"type": "string", "format": "binary"}}
                for t in ("video/mp4", "image/png", "image/jpeg", "application/octet-stream")}}})
async def upload_file(svc: Svc, request: Request,
                      x_filename: Annotated[str | None, Header(max_length=255)] = None,
                      fps: Annotated[float | None, Query(ge=1, le=240, description="frame rate of a zip of "
                                                         "numbered frames (an image sequence)")] = None) -> dict:
    """Stream an upload to disk, check it, store it under its sha256 (a sequence: as the clip made from it)."""
    return await receive_upload(svc, request, x_filename, fps)


@router.get("/files/{file_id}", response_model=FileInfo)
@router.head("/files/{file_id}", response_model=FileInfo, operation_id="head_file")  # one id per method
def get_file(svc: Svc, file_id: FileId) -> dict:
    """The file's record; HEAD answers 200 or 404 without a body, so a client can skip re-uploading.

    A record whose bytes are gone from disk is a 404 too: the client uploads again, which restores them.
    No file name: the same bytes may have been uploaded by others, under names that are theirs.
    """
    return {**svc.stored_file(file_id), "filename": None}
