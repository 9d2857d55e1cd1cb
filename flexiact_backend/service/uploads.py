"""The upload policy: which kind a file is, how large it may be, and the check each kind passes before it is stored.

The kind is judged from the content (`media.classify`), never from the name or the Content-Type: video (an
allow-listed container; a GIF with more than one frame), image, a zip of numbered frames (an image sequence,
stored as a lossless video at the `fps` the client gives) or a checkpoint. What the client declares only picks
the byte limit while the body streams and the wording of the error when the content is none of these. The
stored file's extension comes from the detected format. Video limits (frame size, duration, frame count) and
image pixels are checked from headers, before anything is decoded (see `media`, `mp4_boxes`, `zips`).

Cost: each upload holds a slot while it streams and is checked (a bounded number per token and in all; past
them the answer is 429 or 503 with Retry-After at once, never a wait), and the checking runs on the service's
small media pool, off the event loop, so the other requests (and /v1/health) stay quick.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from fastapi import Request
from starlette.requests import ClientDisconnect

from .. import media, sequences, zips
from ..model.checkpoints import check_torch_archive
from ..errors import CheckpointError, FlexiActError, MediaError
from .config import Limits
from .context import Service, requester
from .api_errors import APIError
from .storage import TooLarge, safe_suffix, sha256_file

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".mxf", ".mts", ".m2ts",
                  ".ts", ".3gp", ".gif", ".zip"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr"}
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}


def claimed_kind(content_type: str, filename: str | None) -> str | None:
    """What the client says it sends (Content-Type, else the file name): used for the streaming byte limit and
    for the error message only."""
    major = content_type.split(";", 1)[0].strip().lower().split("/", 1)[0]
    if major in ("video", "image"):
        return major
    suffix = safe_suffix(filename)
    for kind, suffixes in (("video", VIDEO_SUFFIXES), ("image", IMAGE_SUFFIXES), ("checkpoint", CHECKPOINT_SUFFIXES)):
        if suffix in suffixes:
            return kind
    return None


def checkpoint_format(path: Path) -> str:
    """'torch' (a torch.save zip) or 'safetensors', judged from the first bytes; nothing is unpickled here."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= 100 * 1024**2 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError("not a checkpoint: expected a published FlexiAct .pt file or a project .safetensors action")


def _zip_kind(path: Path, limits: Limits) -> str:
    """'sequence' (numbered frames) or 'checkpoint' (a torch.save archive) from the zip's names alone."""
    with zips.open_zip(path, limits.zip_entries) as z:
        names = z.namelist()
    if sequences.zip_holds_frames_named(names):
        return "sequence"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "checkpoint"
    raise MediaError(f"{path.name}: the zip holds no numbered image frames (like shot_0001.png) and is not an "
                     "action checkpoint; for an image sequence, zip the numbered PNG, JPEG, TIFF or EXR frames.")


def classify(path: Path, claimed: str | None, limits: Limits) -> str:
    """video, image, sequence or checkpoint, from the content; else the error for what the client claimed."""
    found = media.classify(path)
    if found is not None and found[0] in ("video", "image"):
        return found[0]
    if found == ("zip", "zip"):
        return _zip_kind(path, limits)
    try:
        checkpoint_format(path)
        return "checkpoint"
    except CheckpointError:
        if claimed == "checkpoint":
            raise
    if claimed == "video":
        media.probe_video(path, _video_limits(limits))  # raises, saying what the file is instead
    if claimed == "image":
        media.image_header_size(path)
    raise APIError(415, "unsupported_media_type", "the file is not a video, an image, a zip of numbered frames or "
                   "an action checkpoint that the service can read")


def inspect(path: Path, filename: str | None, claimed: str | None, fps: float | None, limits: Limits
            ) -> tuple[str, dict, Path, str | None]:
    """Check an upload; returns its kind, meta, (renamed or converted) path and its new sha256 if converted."""
    try:
        return _inspect(path, claimed, fps, limits)
    except FlexiActError as exc:  # name the file as the client knows it, never by its temp name (or its variants)
        own = Path(filename or "upload").name
        raise type(exc)(re.sub(r"[^\s'\"():,;]*" + re.escape(path.stem) + r"[^\s'\"():,;]*", lambda _m: own, str(exc))
                        ) from None


def _video_limits(limits: Limits) -> media.VideoLimits:
    return media.VideoLimits(limits.video_pixels, limits.video_seconds, limits.video_frames)


def _sequence_limits(limits: Limits, fps: float) -> sequences.SequenceLimits:
    return sequences.SequenceLimits(
        frame_pixels=min(limits.image_pixels, limits.video_pixels), frames=limits.video_frames,
        seconds=limits.video_seconds, fps=fps, total_pixels=limits.sequence_pixels, zip_entries=limits.zip_entries,
        unpacked_bytes=limits.zip_unpacked_bytes)


def _inspect(path: Path, claimed: str | None, fps: float | None, limits: Limits
             ) -> tuple[str, dict, Path, str | None]:
    kind = classify(path, claimed, limits)
    if kind == "video":
        info = media.probe_video(path, _video_limits(limits))
        return kind, info.to_meta(), _renamed(path, info.container), None
    if kind == "image":
        w, h = media.read_image_info(path, max_pixels=limits.image_pixels)
        return kind, {"width": w, "height": h}, _renamed(path, media.classify(path)[1]), None  # type: ignore[index]
    if kind == "sequence":
        if fps is None:
            raise MediaError(f"{path.name}: a zip of numbered frames needs the frame rate it was rendered at; "
                             "send it as ?fps=24 (for example).")
        out = path.with_name(path.stem + ".avi")
        try:
            info = sequences.encode_sequence(path, fps, out, _sequence_limits(limits, fps))
            media.check_video_limits(info, _video_limits(limits))
            return "video", info.to_meta(), out, sha256_file(out)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    fmt = checkpoint_format(path)
    if fmt == "torch":  # unpickling reads every entry: refuse a bomb from the archive's directory alone
        check_torch_archive(path, limits.checkpoint_bytes)
    return kind, {"format": fmt}, _renamed(path, "pt" if fmt == "torch" else "safetensors"), None


def _renamed(path: Path, fmt: str) -> Path:
    """The temp file under the suffix of its detected format (the client's name never picks it)."""
    renamed = path.with_suffix("." + fmt)
    path.rename(renamed)
    return renamed


async def receive_upload(svc: Service, request: Request, filename: str | None, fps: float | None = None) -> dict:
    """Stream an upload to disk within a byte limit, classify and check it, store it under its sha256."""
    with svc.upload_slots.take(requester(request)):
        return await _receive(svc, request, filename, fps)


async def _receive(svc: Service, request: Request, filename: str | None, fps: float | None) -> dict:
    limits = svc.config.limits
    claimed = claimed_kind(request.headers.get("content-type", ""), filename)
    limit = limits.bytes_for(claimed) if claimed else max(limits.bytes_for(k) for k in ("video", "image", "checkpoint"))
    too_large = APIError(413, "too_large", f"{claimed or 'uploaded'} files are limited to {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    svc.require_free(int(declared) if declared.isdigit() else 0)
    try:
        tmp, sha, size = await svc.store.receive(request.stream(), limit, "")
    except TooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise APIError(400, "incomplete_upload", "the upload was interrupted; send it again") from None
    stored = tmp
    try:
        if size == 0:
            raise APIError(422, "empty_file", "the file is empty (0 bytes)")
        existing = svc.db.get_file(sha)
        if existing is not None:  # the same bytes again: they restore the stored copy if it went missing
            svc.store.restore(tmp, existing["path"])
            return {**existing, "filename": filename}  # this uploader's name, not the first one's
        loop = asyncio.get_running_loop()
        kind, meta, stored, converted_sha = await loop.run_in_executor(svc.media_pool, inspect, tmp, filename,
                                                                       claimed, fps, limits)
        if size > limits.bytes_for(kind):
            raise APIError(413, "too_large", f"{kind} files are limited to {limits.bytes_for(kind)} bytes")
        if converted_sha is not None:  # an image sequence: stored as the clip made from it, under that clip's id
            sha = converted_sha
            existing = svc.db.get_file(sha)
            if existing is not None:
                svc.store.restore(stored, existing["path"])
                return {**existing, "filename": filename}
        _sha, rel, size = svc.store.adopt(stored, sha)
    finally:
        tmp.unlink(missing_ok=True)
        stored.unlink(missing_ok=True)
    return {**svc.db.add_file(sha, kind, size, rel, filename, meta), "filename": filename}
