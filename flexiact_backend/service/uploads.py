"""The upload policy: which kind a file is, how large it may be, and the check each kind passes before it is stored."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.requests import ClientDisconnect

from .. import media
from ..errors import CheckpointError, MediaError
from .config import Limits
from .context import Service
from .errors import APIError
from .storage import TooLarge, safe_suffix

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}


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


def checkpoint_format(path: Path) -> str:
    """'torch' (a torch.save zip) or 'safetensors', judged from the first bytes; nothing is unpickled here."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= 100 * 1024**2 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError("not a checkpoint: expected a published FlexiAct .pt file or a project .safetensors action")


def inspect(kind: str, path: Path, filename: str | None, limits: Limits) -> tuple[dict, Path]:
    """Check an uploaded file is what it claims; returns its meta and its (possibly renamed) path."""
    try:
        return _inspect(kind, path, limits)
    except MediaError as exc:  # name the file as the client knows it, not by its temp name
        raise MediaError(str(exc).replace(path.name, Path(filename or "upload").name)) from None


def _inspect(kind: str, path: Path, limits: Limits) -> tuple[dict, Path]:
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
        if w * h > limits.image_pixels:
            raise APIError(413, "too_large", f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit "
                           f"is {limits.image_pixels / 1e6:g} megapixels. Scale it down.")
        w, h = media.read_image_info(path)
        return {"width": w, "height": h}, path
    fmt = checkpoint_format(path)
    renamed = path.with_suffix(".pt" if fmt == "torch" else ".safetensors")
    path.rename(renamed)
    return {"format": fmt}, renamed


async def receive_upload(svc: Service, request: Request, filename: str | None) -> dict:
    """Stream an upload to disk within its kind's byte limit, check it, store it under its sha256."""
    kind = classify_upload(request.headers.get("content-type", ""), filename)
    limit = svc.config.limits.bytes_for(kind)
    too_large = APIError(413, "too_large", f"{kind} files are limited to {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    try:
        tmp, sha, size = await svc.store.receive(request.stream(), limit, safe_suffix(filename))
    except TooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise APIError(400, "incomplete_upload", "the upload was interrupted; send it again") from None
    try:
        if size == 0:
            raise APIError(422, "empty_file", "the file is empty (0 bytes)")
        existing = svc.db.get_file(sha)
        if existing is not None:  # the same bytes again: they restore the stored copy if it went missing
            svc.store.restore(tmp, existing["path"])
            return existing
        meta, tmp = await run_in_threadpool(inspect, kind, tmp, filename, svc.config.limits)
        _sha, rel, size = svc.store.adopt(tmp, sha)
    finally:
        tmp.unlink(missing_ok=True)
    return svc.db.add_file(sha, kind, size, rel, filename, meta)
