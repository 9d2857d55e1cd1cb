"""Errors shared by the model, media, extraction, generation and the service.

Each carries a `code` so the HTTP layer can map it to a 4xx without guessing.
"""


class FlexiActError(Exception):
    """Base class: a problem with what the caller asked for, stated so they can act on it."""

    code = "flexiact_error"


class CheckpointError(FlexiActError):
    """A RefAdapter or action file that is malformed, of the wrong shape or not a dict of tensors."""

    code = "bad_checkpoint"


class RefAdapterMissing(FlexiActError):
    """A real model with no RefAdapter found was asked for a RefAdapter weight above 0 (a different method)."""

    code = "refadapter_missing"


class MediaError(FlexiActError):
    """A video or image that cannot be used: not a video, no frames, unreadable, bad trim, too short."""

    code = "bad_media"


class MediaTooLarge(MediaError):
    """A video or image over a size limit (pixels, duration, frame count): refused before it is decoded."""

    code = "too_large"


class Cancelled(FlexiActError):
    """The caller asked to stop; raised between steps. Extraction keeps its last checkpoint."""

    code = "cancelled"


class Paused(FlexiActError):
    """An extraction stopped at a checkpoint boundary so that queued work can run; calling again resumes."""

    code = "paused"
