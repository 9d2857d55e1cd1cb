"""Actions: extraction from an uploaded clip, import of a published checkpoint, listing, download, delete."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from ... import media
from ...actions import expected_action_shapes, import_published_action
from ...errors import CheckpointError
from ..context import Requester, Svc
from ..api_errors import APIError
from ..schemas import (Action, ActionAccepted, ActionCreate, ActionImport, ActionList, ActionRename, ObjectId,
                       job_out)

router = APIRouter(tags=["actions"])


@router.post("/actions", status_code=202, response_model=ActionAccepted)
def create_action(svc: Svc, who: Requester, body: ActionCreate) -> dict:
    """Queue an extraction; the same request for the same model returns the existing action instead."""
    video = svc.file_of_kind(body.video, "video")
    media.check_trim(media.VideoInfo(**video["meta"]), body.start_s, body.end_s)
    if body.preview_image is not None:
        svc.file_of_kind(body.preview_image, "image")
    action, job = svc.queue_extraction(body, who)
    return {"action": action, "job": job_out(job), "note": svc.pool.queue_note()}


@router.api_route("/actions/import", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def import_wrong_method() -> None:
    """Without this, GET /v1/actions/import would read 'import' as a malformed action id (a 422)."""
    raise APIError(405, "method_not_allowed", "use POST to import an action", headers={"Allow": "POST"})


@router.post("/actions/import", status_code=201, response_model=Action)
def import_action(svc: Svc, body: ActionImport) -> dict:
    """Turn an uploaded published `.pt` (or a project safetensors) into a ready action, no training."""
    src = svc.file_of_kind(body.file, "checkpoint")
    svc.require_free()
    i = svc.info
    out = svc.store.tmp_path(".safetensors")
    try:
        meta = import_published_action(svc.store.path(src["path"]), name=body.name, caption=body.caption,
                                       base_model=i.id, out=out, model_duration_s=i.duration_s,
                                       expected=expected_action_shapes(i.num_layers, i.num_motion_tokens, i.inner_dim))
        sha, _rel, _size = svc.store.adopt(out)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. This server's model ({i.id}) uses {i.num_layers} layers of motion tokens "
                              f"shaped [1, {i.num_motion_tokens}, {i.inner_dim}], float32/16/bf16, finite.") from None
    finally:
        out.unlink(missing_ok=True)
    return svc.db.add_imported_action(name=body.name, caption=body.caption, base_model=svc.info.id,
                                      file_id=sha, meta=meta)


@router.get("/actions", response_model=ActionList)
def list_actions(svc: Svc) -> dict:
    return {"actions": svc.db.list_actions()}


@router.get("/actions/{action_id}", response_model=Action)
def get_action(svc: Svc, action_id: ObjectId) -> dict:
    return svc.action_or_404(action_id)


@router.patch("/actions/{action_id}", response_model=Action)
def rename_action(svc: Svc, action_id: ObjectId, body: ActionRename) -> dict:
    """Give an action a new name (what the add-on's library shows)."""
    return svc.rename_action(action_id, body.name)


@router.delete("/actions/{action_id}", status_code=204)
def delete_action(svc: Svc, action_id: ObjectId) -> Response:
    """Delete an action and its file; an extraction still running for it is cancelled."""
    svc.delete_action(action_id)
    return Response(status_code=204)


@router.get("/actions/{action_id}/file", response_class=FileResponse, responses={
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the action as safetensors"}})
def action_file(svc: Svc, action_id: ObjectId) -> FileResponse:
    action = svc.action_or_404(action_id)
    if action["status"] != "ready":
        raise APIError(409, "not_ready", f"action {action_id} is {action['status']}, not ready")
    return FileResponse(svc.present(svc.action_path(action), f"the file of action {action_id}"),
                        media_type="application/octet-stream",
                        filename=f"{action_id}.safetensors")
