"""Service settings: where state lives, which model, the token and the upload limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .retention import RetentionPolicy

#: Where the service keeps its database, uploads, actions and results unless told otherwise.
DEFAULT_DATA_DIR = Path(os.environ.get("FLEXIACT_DATA_DIR", Path.home() / ".local" / "share" / "flexiact-backend"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass(frozen=True)
class Limits:
    """Upload limits; defaults from the brief, each overridable by a CLI flag or a FLEXIACT_* variable."""

    video_bytes: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_VIDEO_BYTES", 2 * 1024**3))
    image_bytes: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_IMAGE_BYTES", 64 * 1024**2))
    checkpoint_bytes: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_CHECKPOINT_BYTES", 1024**3))
    image_pixels: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_IMAGE_PIXELS", 50_000_000))
    #: frame size of a video (after pixel aspect); the default admits 8K UHD (7680x4320)
    video_pixels: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_VIDEO_PIXELS", 7680 * 4320))
    video_seconds: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_VIDEO_SECONDS", 3600))
    video_frames: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_VIDEO_FRAMES", 3600 * 60))
    #: all frames of an image sequence together (the default: 2,000 frames of 1920x1080)
    sequence_pixels: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_SEQUENCE_PIXELS", 4_147_200_000))
    #: entries of an uploaded zip, counted from its end record before it is opened
    zip_entries: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_ZIP_ENTRIES", 20_000))
    #: bytes the frames of a zip unpack to, from its central directory
    zip_unpacked_bytes: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_ZIP_UNPACKED_BYTES", 8 * 1024**3))
    #: uploads received and checked at once: per token (each client without a token counts as one) and in all
    uploads_per_token: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_UPLOADS_PER_TOKEN", 4))
    uploads: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_UPLOADS", 8))
    #: threads that probe and decode uploads (off the event loop): the most decoding at once
    media_workers: int = field(default_factory=lambda: _env_int("FLEXIACT_MEDIA_WORKERS", 2))
    #: jobs waiting in the queue: per token and in all
    queued_jobs_per_token: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_QUEUED_PER_TOKEN", 100))
    queued_jobs: int = field(default_factory=lambda: _env_int("FLEXIACT_MAX_QUEUED_JOBS", 500))

    def bytes_for(self, kind: str) -> int:
        return {"video": self.video_bytes, "image": self.image_bytes, "checkpoint": self.checkpoint_bytes}[kind]


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: Path
    model_dir: Path | None = None
    tiny: bool = False
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    devices: tuple[str, ...] = ()
    checkpoint_every: int = 500
    #: a job running when the process died is retried this often, then fails (no crash loop)
    max_job_restarts: int = 3
    #: uploads and jobs are refused (507) when the data dir's disk has less free space than this
    min_free_bytes: int = 1024**3
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    #: the bound address; it and the loopback names are the Host headers answered, plus `allowed_hosts`
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    #: /openapi.json and /docs without the token
    public_docs: bool = False
    #: JSON request bodies (everything but uploads) are refused past this size
    json_body_bytes: int = 64 * 1024
    #: a connection that sends no complete request head, or stalls mid-body, this long is closed
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    #: Studio mode: the Ray cluster's address (workers become Ray actors) and, on a cluster without GPUs,
    #: how many CPU actors to start; None: one machine, one worker thread per local device.
    ray_address: str | None = None
    ray_workers: int | None = None
    #: Studio mode: use a Ray cluster without token authentication (refused otherwise)
    ray_allow_no_auth: bool = False
    #: compile the transformer blocks and warm them up at load
    compile: bool = False

    def host_names(self) -> frozenset[str]:
        """The Host header names this server answers to (lower case, IPv6 without brackets)."""
        names = {"localhost", "127.0.0.1", "::1", *(h.strip("[]").lower() for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):  # a wildcard bind is no name a client uses
            names.add(self.host.strip("[]").lower())
        return frozenset(names)

    def __post_init__(self) -> None:
        if self.tiny == (self.model_dir is not None):
            raise ValueError("give exactly one of a model directory or the tiny model")
