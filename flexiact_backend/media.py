"""Reference clips in, generated clips out: everything that touches video and image files.

Video is read with PyAV (FFmpeg's libraries): streams, timestamps, rotation, pixel aspect, colour tags and
alpha come from the demuxer and decoder, not from parsing a log. Only local files are opened, through
FFmpeg's `file` protocol alone, and only containers on an allow-list recognised from the file's first bytes
(never from its name): a playlist, a concat list, an image2 pattern or a URL is refused before FFmpeg sees it.
Writing stays with imageio-ffmpeg's bundled binary, the simplest H.264 writer.

What a decoded frame becomes (the same for every clip, so the model always sees display-referred BT.709 SDR):
the colour matrix and range the clip declares are honoured (an undeclared matrix is BT.709 from 720 lines up,
BT.601 below, as players assume); HLG and PQ are tone-mapped to BT.709 SDR (see `colour`); non-square pixels
are stretched to square; frames flagged interlaced are deinterlaced (bwdif); rotation metadata is applied;
alpha is composited over `BACKGROUND`. Decoding seeks to the keyframe before the trim and scales each chosen
frame down while converting it, so a trim at the end of a long 4K clip costs about what one at its start does.

Times are exact `Fraction`s of the stream time base so that a trim typed as ``0.3`` selects the frame at
exactly 0.3 s on a 10 fps clip instead of the one before it. Frame selection rule (see `trim_frame_indices`):
for a trim ``[start, end)`` resampled to ``N`` frames, output frame ``i`` shows the source frame that is on
screen at ``t_i = start + i * (end - start) / N``, i.e. the last frame whose presentation timestamp is
``<= t_i`` (the first frame if ``t_i`` lies before it). Times count from the video stream's first frame.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import io
import math
import os
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Sequence

import av
import imageio_ffmpeg
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from flexiact_backend import mp4_boxes
from flexiact_backend.colour import bt2100_to_sdr, composite, srgb_decode, srgb_encode, to_uint8
from flexiact_backend.errors import MediaError, MediaTooLarge

MIN_SEGMENT_S = 0.5
"""Shortest trim accepted: below this there is too little motion to learn an action from."""

END_TOLERANCE_S = 0.05
"""A trim end this far past the clip end is clamped to the end (players round the duration)."""

BACKGROUND = (0, 0, 0)
"""Colour that transparent pixels of videos, images and image sequences are composited over (black, like the
letterbox bars of `fit_target_image`)."""

_STANDARD_FPS = (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30),
                 Fraction(48), Fraction(50), Fraction(60000, 1001), Fraction(60))
"""A measured average snaps to the nearest of these within 0.3% (millisecond time bases blur them)."""

IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF")
"""Pillow decoders an image may be read with (EXR is read by FFmpeg); nothing that shells out (EPS)."""

_CONVERT_THREADS = min(4, os.cpu_count() or 1)
"""Threads scaling and converting chosen frames while the decoder (itself threaded) goes on."""

MAX_IMAGE_PIXELS = 178_956_970
"""Default pixel limit of one image (Pillow's own decompression-bomb limit); the service passes its own."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class VideoInfo:
    """What a user sees of a video file; width/height are after pixel aspect and rotation are applied."""

    width: int
    height: int
    fps: float  # average rate: frames / (span from first frame to end of last frame)
    duration_s: float  # end of the last frame, measured from the first frame
    frames: int
    rotation: int  # degrees (0/90/180/270) the stored picture is turned counter-clockwise for display
    has_audio: bool
    container: str = ""  # detected from the content: mp4, mov, mkv, webm, avi, ts, mpg, mxf, gif
    colour: str = "sdr"  # sdr, bt2020 (SDR, wide gamut), hlg or pq: all converted to BT.709 SDR when decoded
    alpha: bool = False  # transparent pixels are composited over BACKGROUND when decoded
    interlaced: bool = False  # deinterlaced when decoded

    def to_meta(self) -> dict:
        """The plain dict a service stores for an upload."""
        return asdict(self)


@dataclass(frozen=True)
class FitMapping:
    """How `fit_target_image` mapped the source image onto the model canvas, so it can be undone.

    A source pixel position ``(u, v)`` lands on the canvas at
    ``((u - box[0]) * scale_x + offset[0], (v - box[1]) * scale_y + offset[1])``.
    """

    fit: str
    src_size: tuple[int, int]  # (width, height) of the upright source image
    dst_size: tuple[int, int]  # (width, height) of the model canvas
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the source region used
    scale_x: float
    scale_y: float
    offset: tuple[int, int]  # canvas position of the box's top-left corner (letterbox bars)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def src_to_dst(self, u: float, v: float) -> tuple[float, float]:
        """Source pixel position -> canvas position."""
        return (
            (u - self.box[0]) * self.scale_x + self.offset[0],
            (v - self.box[1]) * self.scale_y + self.offset[1],
        )

    def dst_to_src(self, x: float, y: float) -> tuple[float, float]:
        """Canvas position -> source pixel position (inverse of `src_to_dst`)."""
        return (
            (x - self.offset[0]) / self.scale_x + self.box[0],
            (y - self.offset[1]) / self.scale_y + self.box[1],
        )


# --------------------------------------------------------------------------------------------
# Helpers


def _exact(x: float | Fraction) -> Fraction:
    """A float as the decimal the user typed (0.3 -> 3/10, not 0.29999...), Fractions unchanged."""
    if isinstance(x, Fraction):
        return x
    return Fraction(repr(float(x)))


def _existing_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{p.name}: no such file; check the path.")
    if p.stat().st_size == 0:
        raise MediaError(f"{p.name}: the file is empty (0 bytes); export or copy it again.")
    return p


def _av_reason(exc: av.FFmpegError) -> str:
    """FFmpeg's reason without the file name or path it quotes."""
    return (exc.strerror or type(exc).__name__).rstrip(".")


# --------------------------------------------------------------------------------------------
# What a file is, from its first bytes


def _mp4_suffix(head: bytes) -> str:
    brand = head[8:12]
    return "mov" if brand == b"qt  " or head[4:8] != b"ftyp" else ("3gp" if brand.startswith(b"3g") else "mp4")


def sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, format) of a file from its first 1 KiB: kind is video, image or zip; None when unknown.

    Video formats are the allow-listed FFmpeg demuxers (with the file suffix they are stored under); nothing
    that names other files (HLS/DASH playlists, concat lists, SDP) or reads a pattern is recognised.
    """
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "video", _mp4_suffix(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "webm" if b"webm" in head[:64] else "mkv"
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return "video", "avi"
    if len(head) >= 565 and all(head[i * 188] == 0x47 for i in range(3)):
        return "video", "ts"
    if len(head) >= 580 and all(head[4 + i * 192] == 0x47 for i in range(3)):
        return "video", "m2ts"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "video", "mpg"
    if head.startswith(b"\x06\x0e\x2b\x34\x02\x05\x01\x01\x0d\x01\x02\x01\x01\x02"):
        return "video", "mxf"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image", "gif"  # a GIF with more than one frame is a video: see `classify`
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpg"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image", "tif"
    if head.startswith(b"\x76\x2f\x31\x01"):
        return "image", "exr"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image", "webp"
    if head.startswith(b"BM"):
        return "image", "bmp"
    if head.startswith(b"PK\x03\x04"):
        return "zip", "zip"
    return None


_DEMUXERS = {"mp4": "mov", "mov": "mov", "3gp": "mov", "mkv": "matroska", "webm": "matroska", "avi": "avi",
             "ts": "mpegts", "m2ts": "mpegts", "mpg": "mpeg", "mxf": "mxf", "gif": "gif"}


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024)


def classify(path: PathLike) -> tuple[str, str] | None:
    """(kind, format) of a file judged by its content: kind is video, image or zip (an image sequence or a
    checkpoint); None for anything else. A GIF with more than one frame is a video."""
    p = _existing_file(path)
    found = sniff(_head(p))
    if found == ("image", "gif"):
        try:
            with Image.open(p, formats=["GIF"]) as img:
                frames = getattr(img, "n_frames", 1)
        except (OSError, Image.DecompressionBombError):
            return found
        return ("video", "gif") if frames > 1 else found
    return found


def _video_format(p: Path) -> str:
    """The allow-listed container of a video file, or a MediaError saying what the file is instead."""
    found = classify(p)
    if found is not None and found[0] == "video":
        return found[1]
    if found is not None and found[0] == "image":
        raise MediaError(f"{p.name}: this is a still image, not a video; choose a video clip "
                         "(or use it as the target image).")
    head = _head(p)
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head[:512]):
        raise MediaError(f"{p.name}: this is a text file, not a video (playlists and lists of files are not "
                         "accepted); choose a video clip.")
    raise MediaError(f"{p.name}: not a video file that can be read; use an mp4, mov, mkv, webm, avi, mxf, "
                     "MPEG-TS (mts/m2ts) or animated GIF file, or a folder of numbered frames.")


def _open(p: Path, fmt: str) -> av.container.InputContainer:
    """Open a local file with the detected demuxer, through the file protocol only."""
    try:
        return av.open("file:" + str(p.resolve()), format=_DEMUXERS[fmt],
                       options={"protocol_whitelist": "file", "enable_drefs": "0"})
    except av.FFmpegError as exc:
        raise MediaError(f"{p.name}: the file is incomplete or damaged ({_av_reason(exc)}); copy or export it "
                         "again.") from None


# --------------------------------------------------------------------------------------------
# Probing

_AVCOL_TO_SWS = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
                 7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}
_TRC_HLG, _TRC_PQ, _PRI_BT2020 = 18, 16, 9


@dataclass(frozen=True)
class _Probed:
    info: VideoInfo
    fmt: str
    end: Fraction  # exact end of the last frame, from the first frame
    origin: Fraction  # presentation time of the first frame, in stream seconds
    index: int  # of the video stream
    storage_size: tuple[int, int]  # (w, h) decoded frames are converted to: square pixels, before rotation


def _snap_fps(measured: Fraction) -> float:
    nearest = min(_STANDARD_FPS, key=lambda std: abs(measured - std))
    return float(nearest if abs(measured - nearest) <= nearest * Fraction(3, 1000) else measured)


def _video_stream(c: av.container.InputContainer, p: Path) -> av.VideoStream:
    streams = [s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if streams:
        return streams[0]
    if c.streams.audio:
        raise MediaError(f"{p.name}: the file has audio only (a picture in it is cover art, not video); choose "
                         "a file with video in it.")
    raise MediaError(f"{p.name}: the file has no video stream; choose a file with video in it.")


def _decoder(vs: av.VideoStream) -> av.codec.context.CodecContext:
    """The stream's decoder; VP9 with alpha (WebM alpha_mode=1) needs libvpx: FFmpeg's own VP9 decoder drops it."""
    if vs.codec_context.name == "vp9" and vs.metadata.get("alpha_mode") == "1":
        ctx = av.CodecContext.create("libvpx-vp9", "r")
        ctx.extradata = vs.codec_context.extradata
        return ctx
    return vs.codec_context


def _colour(frame: av.VideoFrame, cc: av.codec.context.CodecContext) -> str:
    trc = frame.color_trc if frame.color_trc not in (0, 2) else cc.color_trc
    if trc == _TRC_HLG:
        return "hlg"
    if trc == _TRC_PQ:
        return "pq"
    primaries = frame.color_primaries if frame.color_primaries not in (0, 2) else cc.color_primaries
    return "bt2020" if primaries == _PRI_BT2020 else "sdr"


def _has_alpha(frame: av.VideoFrame) -> bool:
    return any(c.is_alpha for c in frame.format.components) or (
        frame.format.name == "pal8")  # GIF/QuickTime palettes may hold transparent entries


@dataclass(frozen=True)
class VideoLimits:
    """A service's limits on one clip: pixels of a frame, seconds and frames."""

    pixels: int
    seconds: float
    frames: int


MAX_EDITS = 64
"""Most edit list entries of one MP4/QuickTime track (real files have one or two)."""
_PACKETS_PER_S = 200
"""Packets a second of a non-video track may hold (audio has about 50) when a header is checked."""


def _check_mp4_counts(p: Path, limits: VideoLimits) -> None:
    """Refuse an MP4/QuickTime file whose boxes declare more samples or edits than the limits allow, before
    FFmpeg builds its index from them (see `mp4_boxes`)."""
    try:
        counts = mp4_boxes.read_counts(p)
    except (mp4_boxes.BoxError, struct.error, OSError) as exc:
        raise MediaError(f"{p.name}: the file's structure is damaged ({exc}); export it again.") from None
    other_cap = max(limits.frames, int(limits.seconds * _PACKETS_PER_S))
    for track in counts.tracks:
        if track.edits > MAX_EDITS:
            raise MediaError(f"{p.name}: a track has an edit list of {track.edits} entries; at most {MAX_EDITS} are "
                             "read. Export or remux the clip again (e.g. ffmpeg -c copy).")
        cap = limits.frames if track.handler == "vide" else other_cap
        if track.index_entries > cap:
            raise MediaTooLarge(f"{p.name}: a {'video' if track.handler == 'vide' else 'non-video'} track declares "
                                f"{track.index_entries} samples; the limit is {cap}. Cut out the part with the action.")
    if counts.fragment_samples > limits.frames + other_cap:
        raise MediaTooLarge(f"{p.name}: the file's fragments declare {counts.fragment_samples} samples; the limit "
                            f"is {limits.frames + other_cap}. Cut out the part with the action.")


def probe_video(path: PathLike, limits: VideoLimits | None = None) -> VideoInfo:
    """Describe the first video stream: one pass over its packets and one decoded frame.

    Raises MediaError for a missing, empty, unreadable, incomplete or non-video file (saying what it is
    instead), for a video stream without frames and for a single-frame video (use it as the target image).
    With `limits`, MediaTooLarge as soon as the header or the packets read so far pass them.
    """
    info = _probe(path, limits).info
    if limits is not None:
        check_video_limits(info, limits)
    if info.frames == 1:
        raise MediaError(f"{Path(path).name}: the video has a single frame, too little to show an action; use it "
                         "as the target image instead, or choose a longer clip.")
    return info


def _probe(path: PathLike, limits: VideoLimits | None = None) -> _Probed:
    p = _existing_file(path)
    fmt = _video_format(p)
    size = p.stat().st_size
    if limits is not None and fmt in ("mp4", "mov", "3gp"):
        _check_mp4_counts(p, limits)
    with _open(p, fmt) as c:
        vs = _video_stream(c, p)
        tb = vs.time_base
        if limits is not None and vs.frames > limits.frames:
            raise MediaTooLarge(f"the video has {vs.frames} frames; the limit is {limits.frames}. Cut out the part "
                                "with the action.")
        pts: list[int] = []
        empty = 0  # packets without data: frames a writer dropped (shown as the frame before)
        last_dur = 0
        first: av.VideoFrame | None = None
        decoder = _decoder(vs)
        try:
            for pkt in c.demux(vs):
                if pkt.size == 0:
                    empty += 1
                    continue
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if t is None:
                    raise MediaError(f"{p.name}: the video has frames without timestamps; remux or re-export it "
                                     "(e.g. to mp4) and try again.")
                if pkt.pos is not None and pkt.pos + pkt.size > size:
                    raise MediaError(f"{p.name}: the file is incomplete (it ends inside its video data); copy or "
                                     "export it again.")
                pts.append(t)
                if limits is not None:
                    _check_read_so_far(p, pts, tb, limits)
                last_dur = pkt.duration or 0
                if first is None:
                    first = next(iter(decoder.decode(pkt)), None)
            if first is None and pts:
                first = next(iter(decoder.decode(None)), None)
        except av.FFmpegError as exc:
            raise MediaError(f"{p.name}: the file is incomplete or damaged ({_av_reason(exc)}); copy or export "
                             "it again.") from None
        if not pts or first is None:
            raise MediaError(f"{p.name}: the video stream has no frames that can be decoded; export the clip "
                             "again.")
        # the index lists frames whose data is not in the file; an AVI's frames a writer dropped (empty
        # chunks, or none) are counted there too, but leave no gap at its end
        listed = len(pts) + empty if fmt != "avi" else max(pts) - min(pts) + 1 if pts else 0
        if vs.frames and listed < vs.frames:
            raise MediaError(f"{p.name}: the file is incomplete ({len(pts)} of {vs.frames} frames are in it); copy "
                             "or export it again.")
        has_audio = bool(c.streams.audio)
        cc = vs.codec_context
        interlaced = first.interlaced_frame or (cc.field_order or 0) > 1
        sar = vs.sample_aspect_ratio or Fraction(1)
        index = vs.index
    pts.sort()
    if last_dur <= 0:
        deltas = np.diff(pts)
        last_dur = int(np.median(deltas)) if len(deltas) else 0
    origin = pts[0] * tb
    end = (pts[-1] + last_dur) * tb - origin
    w = max(1, round(first.width * sar)) if sar > 0 else first.width
    h = first.height
    rotation = _rotation(first)
    info = VideoInfo(
        width=h if rotation in (90, 270) else w,
        height=w if rotation in (90, 270) else h,
        fps=_snap_fps(Fraction(len(pts)) / end) if end > 0 else 0.0,
        duration_s=float(end),
        frames=len(pts),
        rotation=rotation,
        has_audio=has_audio,
        container=fmt,
        colour=_colour(first, cc),
        alpha=_has_alpha(first),
        interlaced=bool(interlaced),
    )
    return _Probed(info, fmt, end, origin, index, (w, h))


def _check_read_so_far(p: Path, pts: list[int], tb: Fraction, limits: VideoLimits) -> None:
    """Stop reading packets as soon as they pass the frame or duration limit (whatever the header said)."""
    if len(pts) > limits.frames:
        raise MediaTooLarge(f"{p.name}: the video has more than {limits.frames} frames; the limit is "
                            f"{limits.frames}. Cut out the part with the action.")
    if len(pts) % 256 == 0 and (max(pts[-1], pts[0]) - min(pts[-1], pts[0])) * tb > limits.seconds:
        raise MediaTooLarge(f"{p.name}: the video is longer than {limits.seconds:g} s; the limit is "
                            f"{limits.seconds:g} s. Cut out the part with the action.")


def _rotation(frame: av.VideoFrame) -> int:
    """Degrees (0/90/180/270) from the frame's display matrix; none for a missing, zero or non-finite matrix."""
    matrix = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if matrix is None or not any(bytes(matrix)):
        return 0
    angle = frame.rotation
    if not isinstance(angle, (int, float)) or not math.isfinite(angle):
        return 0
    return int(round(angle / 90)) * 90 % 360


def check_video_limits(info: VideoInfo, limits: VideoLimits) -> None:
    """Refuse a clip over the service's limits before anything of it is decoded (MediaTooLarge)."""
    max_pixels, max_seconds, max_frames = limits.pixels, limits.seconds, limits.frames
    if info.width * info.height > max_pixels:
        raise MediaTooLarge(f"the video is {info.width}x{info.height} = {info.width * info.height / 1e6:.1f} "
                            f"megapixels a frame; the limit is {max_pixels / 1e6:g} megapixels. Scale it down.")
    if info.duration_s > max_seconds:
        raise MediaTooLarge(f"the video is {info.duration_s:.1f} s long; the limit is {max_seconds:g} s. Cut out "
                            "the part with the action.")
    if info.frames > max_frames:
        raise MediaTooLarge(f"the video has {info.frames} frames; the limit is {max_frames}. Cut out the part "
                            "with the action.")


# --------------------------------------------------------------------------------------------
# Trim + temporal resampling


def check_trim(info: VideoInfo, start_s: float, end_s: float | None) -> tuple[Fraction, Fraction]:
    """Validate a trim against a probed clip; returns exact (start, end), end clamped to the clip.

    `end_s=None` means the end of the clip. Raises MediaError saying what is wrong and what to do.
    """
    return _check_trim(_exact(info.duration_s), start_s, end_s)


def _check_trim(duration: Fraction, start_s: float, end_s: float | None) -> tuple[Fraction, Fraction]:
    start = _exact(start_s)
    if start < 0:
        raise MediaError(f"Trim start {float(start_s):g} s is negative; use 0 or a later time.")
    if start >= duration:
        raise MediaError(
            f"Trim start {float(start_s):g} s is at or past the end of the clip "
            f"({float(duration):.3f} s long); choose a start before the end."
        )
    end = duration if end_s is None else _exact(end_s)
    if end <= start:
        raise MediaError(
            f"Trim end {float(end):g} s is not after the start {float(start):g} s; "
            "choose an end later than the start."
        )
    if end > duration:
        if end - duration > _exact(END_TOLERANCE_S):
            raise MediaError(
                f"Trim end {float(end):g} s is past the end of the clip ({float(duration):.3f} s "
                "long); choose an earlier end or leave it empty for the clip end."
            )
        end = duration
    if end - start < _exact(MIN_SEGMENT_S):
        raise MediaError(
            f"The trimmed segment is {float(end - start):.3f} s long; it must be at least "
            f"{MIN_SEGMENT_S} s. Widen the trim range."
        )
    return start, end


def _target_times(start: Fraction, end: Fraction, num_frames: int) -> list[Fraction]:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    step = (end - start) / num_frames
    return [start + i * step for i in range(num_frames)]


def trim_frame_indices(
    timestamps: Sequence[float | Fraction],
    start_s: float | Fraction,
    end_s: float | Fraction,
    num_frames: int,
) -> list[int]:
    """The selection rule of `read_clip`, pure: which source frames make up the resampled clip.

    `timestamps` are the presentation times (seconds, ascending) of the source frames. Output
    frame ``i`` is the frame on screen at ``t_i = start + i * (end - start) / num_frames``: the
    last frame with timestamp ``<= t_i``, or frame 0 if ``t_i`` precedes every frame. Frames
    repeat when the segment has fewer frames than requested and are skipped when it has more.
    Floats are read as the decimal they print as, so the rule is exact for typed trims.
    """
    if not timestamps:
        raise ValueError("timestamps is empty")
    ts = [_exact(t) for t in timestamps]
    return [max(bisect.bisect_right(ts, t) - 1, 0)
            for t in _target_times(_exact(start_s), _exact(end_s), num_frames)]


# --------------------------------------------------------------------------------------------
# Decoding


def _decode_size(p: _Probed, max_side: int | None) -> tuple[int, int]:
    """(w, h) before rotation that decoded frames are converted to: square pixels, within max_side."""
    w, h = p.storage_size
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2)


def _matrix(frame: av.VideoFrame) -> Colorspace:
    declared = _AVCOL_TO_SWS.get(frame.colorspace)
    if declared is not None:
        return declared
    return Colorspace.ITU709 if frame.height >= 720 else Colorspace.ITU601


def _range(frame: av.VideoFrame) -> ColorRange:
    if frame.color_range in (ColorRange.MPEG, ColorRange.JPEG):
        return ColorRange(frame.color_range)
    name = frame.format.name
    return ColorRange.JPEG if name.startswith("yuvj") or frame.format.is_rgb or "gray" in name else ColorRange.MPEG


def frame_to_rgb(frame: av.VideoFrame, size: tuple[int, int], colour: str, rotation: int,
                 background: tuple[int, int, int] = BACKGROUND, scaler: VideoReformatter | None = None) -> np.ndarray:
    """One decoded frame as upright uint8 RGB of `size` (w, h, before rotation): matrix, range, HDR, alpha.

    Pass one `scaler` for all frames of a clip: it keeps swscale's set-up between frames (one thread: the
    decoder's threads are busy meanwhile)."""
    scaler = scaler or VideoReformatter()
    kwargs = {"width": size[0], "height": size[1], "interpolation": Interpolation.AREA, "threads": 1,
              "src_colorspace": _matrix(frame), "src_color_range": _range(frame), "dst_color_range": ColorRange.JPEG}
    if colour != "sdr":
        rgb = bt2100_to_sdr(scaler.reformat(frame, format="rgb48le", **kwargs).to_ndarray() / 65535.0, colour)
    elif _has_alpha(frame):
        rgb = composite(scaler.reformat(frame, format="rgba", **kwargs).to_ndarray(), background)
    else:
        rgb = scaler.reformat(frame, format="rgb24", **kwargs).to_ndarray()
    return np.ascontiguousarray(np.rot90(rgb, rotation // 90)) if rotation else rgb


def _deinterlaced(frames: Iterator[av.VideoFrame], stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """bwdif over the frames flagged interlaced (one output frame per input frame, timestamps kept)."""
    graph = av.filter.Graph()
    src = graph.add_buffer(template=stream)
    bwdif = graph.add("bwdif", "mode=send_frame:parity=auto:deint=interlaced")
    sink = graph.add("buffersink")
    src.link_to(bwdif)
    bwdif.link_to(sink)
    graph.configure()

    def drain() -> Iterator[av.VideoFrame]:
        while True:
            try:
                yield graph.pull()
            except (BlockingIOError, av.EOFError):
                return

    for frame in frames:
        graph.push(frame)
        yield from drain()
    graph.push(None)
    yield from drain()


def _frames_from(p: Path, probed: _Probed, start: Fraction) -> Iterator[tuple[Fraction, av.VideoFrame]]:
    """(time from the first frame, frame) in presentation order, starting at the keyframe at or before `start`."""
    with _open(p, probed.fmt) as c:
        vs = c.streams[probed.index]
        vs.thread_type = "AUTO"
        tb = vs.time_base
        seeked = start > 0
        if seeked:
            c.seek(math.floor((probed.origin + start) / tb), stream=vs, backward=True, any_frame=False)
        decoder = _decoder(vs)
        frames: Iterator[av.VideoFrame] = (f for pkt in c.demux(vs) for f in decoder.decode(pkt))
        if probed.info.interlaced:
            frames = _deinterlaced(frames, vs)
        first = True
        for frame in frames:
            if frame.pts is None:
                raise MediaError(f"{p.name}: the video has frames without timestamps; remux or re-export it "
                                 "(e.g. to mp4) and try again.")
            t = frame.pts * tb - probed.origin
            if first and seeked and t > start:  # the seek overshot (a container without an index): from the top
                yield from _frames_from(p, probed, Fraction(0))
                return
            first = False
            yield t, frame
        if first and seeked:  # the seek went past every frame (short MPEG-TS files): from the top
            yield from _frames_from(p, probed, Fraction(0))


def read_clip(
    path: PathLike,
    start_s: float,
    end_s: float | None,
    num_frames: int,
    max_side: int | None = None,
) -> np.ndarray:
    """Decode the trim ``[start_s, end_s)`` of a clip resampled to `num_frames` upright RGB frames.

    Returns uint8 ``[num_frames, H, W, 3]``. Frames are chosen by their real timestamps with the rule of
    `trim_frame_indices` (so variable frame rate works). Decoding starts at the keyframe before the trim and
    stops after its last needed frame; only chosen frames are converted, straight to the output size.
    `max_side` optionally bounds that size (even sizes, aspect kept). `end_s=None` means the end of the clip.
    Raises MediaError for bad files and bad trims.
    """
    p = Path(path)
    probed = _probe(p)
    start, end = _check_trim(probed.end, start_s, end_s)
    targets = _target_times(start, end, num_frames)
    size = _decode_size(probed, max_side)
    info = probed.info
    local = threading.local()  # one swscale set-up per converting thread, kept between its frames

    def convert(frame: av.VideoFrame) -> np.ndarray:
        if not hasattr(local, "scaler"):
            local.scaler = VideoReformatter()
        return frame_to_rgb(frame, size, info.colour, info.rotation, scaler=local.scaler)

    cache: list = [None, None]  # the last frame submitted and its conversion, reused while it stays on screen
    chosen: list[Future] = []
    prev: av.VideoFrame | None = None
    with ThreadPoolExecutor(max_workers=_CONVERT_THREADS) as pool:  # swscale runs beside the decoder

        def rgb(frame: av.VideoFrame) -> Future:
            if cache[0] is not frame:
                cache[:] = [frame, pool.submit(convert, frame)]
            return cache[1]

        try:
            for t, frame in _frames_from(p, probed, start):
                on_screen = prev if prev is not None else frame  # times before the first frame take it
                while len(chosen) < num_frames and targets[len(chosen)] < t:
                    chosen.append(rgb(on_screen))
                if len(chosen) == num_frames:
                    break
                prev = frame
        except av.FFmpegError as exc:
            raise MediaError(f"{p.name}: decoding failed ({_av_reason(exc)}); the file may be incomplete or "
                             "damaged, export it again.") from None
        if prev is None:
            raise MediaError(f"{p.name}: no frame could be decoded; the file may be damaged, export it again.")
        if len(chosen) < num_frames:  # targets after the last frame's timestamp
            chosen += [rgb(prev)] * (num_frames - len(chosen))
        return np.stack([f.result() for f in chosen])


# --------------------------------------------------------------------------------------------
# Images


def _too_many_pixels(name: str, w: int, h: int, limit: int) -> MediaTooLarge:
    return MediaTooLarge(f"{name}: the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                         f"{limit / 1e6:g} megapixels. Scale it down.")


_EXR_MULTIPART, _EXR_DEEP = 0x1000, 0x800
_EXR_MAX_ATTRIBUTES = 1000


def _exr_size(f: IO[bytes], name: str) -> tuple[int, int]:
    """(width, height) of an OpenEXR image from its header's dataWindow: nothing of the pixels is read.

    Why by hand: FFmpeg's EXR decoder learns the size only while it decodes the whole image."""
    head = f.read(8)
    if len(head) < 8 or head[:4] != b"\x76\x2f\x31\x01":
        raise MediaError(f"{name}: not an OpenEXR file that can be read; save it again.")
    flags = int.from_bytes(head[4:8], "little")
    if flags & (_EXR_MULTIPART | _EXR_DEEP):
        raise MediaError(f"{name}: multi-part and deep OpenEXR files are not read; save a single-part "
                         "scanline or tiled EXR.")

    def cstring() -> bytes:
        out = bytearray()
        while len(out) <= 256:
            c = f.read(1)
            if not c:
                raise MediaError(f"{name}: the EXR header ends early; the file is incomplete, save it again.")
            if c == b"\0":
                return bytes(out)
            out += c
        raise MediaError(f"{name}: the EXR header is damaged (a name longer than 255 bytes); save it again.")

    for _ in range(_EXR_MAX_ATTRIBUTES):
        attr = cstring()
        if not attr:
            break
        cstring()  # the type name
        raw = f.read(4)
        size = int.from_bytes(raw, "little", signed=True) if len(raw) == 4 else -1
        if size < 0:
            raise MediaError(f"{name}: the EXR header is damaged; save it again.")
        if attr == b"dataWindow":
            box = f.read(16)
            if size != 16 or len(box) != 16:
                raise MediaError(f"{name}: the EXR header's data window is damaged; save it again.")
            x0, y0, x1, y1 = (int.from_bytes(box[i:i + 4], "little", signed=True) for i in range(0, 16, 4))
            if x1 < x0 or y1 < y0:
                raise MediaError(f"{name}: the EXR image is empty (its data window holds no pixel); save it again.")
            return x1 - x0 + 1, y1 - y0 + 1
        f.seek(size, io.SEEK_CUR)
    raise MediaError(f"{name}: the EXR header has no data window; save it again.")


def _exr_image(data: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """A scene-linear OpenEXR frame as display sRGB: linear values clipped to [0, 1], sRGB curve, alpha
    (premultiplied, as EXR stores it) composited over BACKGROUND in linear light. The size is checked from
    the header before FFmpeg decodes anything."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            w, h = _exr_size(f, name)
    else:
        w, h = _exr_size(io.BytesIO(data.getbuffer()), name)
    if w * h > max_pixels:
        raise _too_many_pixels(name, w, h, max_pixels)
    src = "file:" + str(Path(data).resolve()) if isinstance(data, Path) else data
    try:
        with av.open(src, format="exr_pipe", options={"protocol_whitelist": "file"}) as c:
            frame = next(c.decode(video=0))
    except (av.FFmpegError, StopIteration) as exc:
        reason = _av_reason(exc) if isinstance(exc, av.FFmpegError) else "no image in it"
        raise MediaError(f"{name}: the EXR file cannot be read ({reason}); save it again.") from None
    return Image.fromarray(_exr_to_srgb(frame), "RGB")


_EXR_STRIP_PIXELS = 1 << 20
"""Pixels converted at once: the float temporaries of a strip stay a few MiB whatever the image's size."""


def _exr_to_srgb(frame: av.VideoFrame) -> np.ndarray:
    """Planar float G, B, R (and A) read in place, converted to uint8 sRGB strip by strip: the decoded frame
    and the output are the only full-size arrays."""
    has_alpha = _has_alpha(frame)
    fmt = "gbrapf32le" if has_alpha else "gbrpf32le"
    if frame.format.name != fmt:
        frame = frame.reformat(format=fmt)
    h, w = frame.height, frame.width

    def plane(i: int) -> np.ndarray:
        p = frame.planes[i]
        return np.frombuffer(p, np.float32).reshape(h, p.line_size // 4)[:, :w]

    g, b, r = plane(0), plane(1), plane(2)
    alpha = plane(3) if has_alpha else None
    bg_linear = srgb_decode(np.asarray(BACKGROUND, np.float32) / 255.0)
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, _EXR_STRIP_PIXELS // w)
    for y in range(0, h, step):
        rows = slice(y, y + step)
        linear = np.stack([r[rows], g[rows], b[rows]], axis=-1)
        if alpha is not None:  # premultiplied, as EXR stores it: over BACKGROUND in linear light
            linear = linear + (1 - np.clip(alpha[rows][..., None], 0, 1)) * bg_linear
        out[rows] = to_uint8(srgb_encode(linear))
    return out


def _unreadable(label: str, exc: BaseException, max_pixels: int = MAX_IMAGE_PIXELS) -> MediaError:
    if isinstance(exc, Image.DecompressionBombError):  # over twice Pillow's own limit: it refuses to open it
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return MediaTooLarge(f"{label}: the image is {int(pixels[1]) / 1e6 if pixels else math.inf:.1f} "
                             f"megapixels; the limit is {max_pixels / 1e6:g} megapixels. Scale it down.")
    if isinstance(exc, UnidentifiedImageError):
        return MediaError(f"{label}: not an image file that can be read (not an image); use PNG, JPEG, TIFF or EXR.")
    # Pillow raises many types on malformed headers and metadata (SyntaxError on bad EXIF, struct.error ...)
    return MediaError(f"{label}: not an image file that can be read (incomplete or damaged: {type(exc).__name__}); "
                      "save it again as PNG, JPEG, TIFF or EXR.")


def image_header_size(src: PathLike | IO[bytes], name: str | None = None) -> tuple[int, int]:
    """(width, height) as stored, read from the image's header alone (EXR, PNG, JPEG, TIFF, WebP, BMP, GIF);
    MediaError when it is not a readable image. Nothing is decoded: this is the check before decoding."""
    label = name or (Path(src).name if not hasattr(src, "read") else "image")
    f = open(src, "rb") if not hasattr(src, "read") else src  # type: ignore[arg-type]
    try:
        head = f.read(1024)
        f.seek(0)
        found = sniff(head)
        if found == ("image", "exr"):
            return _exr_size(f, label)
        if found is None or found[0] != "image":
            raise MediaError(f"{label}: not an image file that can be read; use PNG, JPEG, TIFF or EXR.")
        try:
            with Image.open(f, formats=list(IMAGE_FORMATS)) as img:
                return img.size
        except Exception as exc:
            raise _unreadable(label, exc) from None
    finally:
        if f is not src:
            f.close()


def open_image(path: PathLike | io.BytesIO, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """An image file (PNG, JPEG, TIFF, WebP, BMP, GIF or OpenEXR, judged by content) loaded in full.

    Over `max_pixels` it is refused with MediaTooLarge from its header, before it is decoded (the default is
    Pillow's own bomb limit; the service passes its configured one). The one image opener of the backend:
    uploads, sequences, generation and previews all read images through it.
    """
    if isinstance(path, io.BytesIO):
        label, head = name or "image", path.getvalue()[:1024]
    else:
        p = _existing_file(path)
        label, head = name or p.name, _head(p)
    found = sniff(head)
    if found == ("image", "exr"):
        return _exr_image(path if isinstance(path, io.BytesIO) else p, label, max_pixels)
    if found is not None and found[0] == "video":
        raise MediaError(f"{label}: this is a video, not an image; choose a still image (PNG or JPEG).")
    try:
        img = Image.open(path if isinstance(path, io.BytesIO) else p, formats=list(IMAGE_FORMATS))
        w, h = img.size
        if w * h > max_pixels:
            raise _too_many_pixels(label, w, h, max_pixels)
        img.load()
        img.getexif()  # malformed EXIF fails here, not later in a job
    except MediaError:
        raise
    except Exception as exc:
        raise _unreadable(label, exc, max_pixels) from None
    return img


def read_image_info(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied). MediaError if not an image,
    MediaTooLarge over `max_pixels`."""
    img = open_image(path, max_pixels)
    return ImageOps.exif_transpose(img).size


_SRGB = ImageCms.createProfile("sRGB")


def _to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Upright RGB: EXIF orientation, embedded ICC profile (CMYK, Display P3 ...) to sRGB, 16-bit and float
    grey scaled to 8 bits, transparency (RGBA, LA, PA, palette) composited over `background`."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow raises many types on malformed EXIF
        raise MediaError(f"the image's EXIF metadata is damaged ({type(exc).__name__}); save it again without "
                         "EXIF, as PNG or JPEG.") from None
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA", "CMYK"):
        try:
            out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
            image = ImageCms.profileToProfile(image, io.BytesIO(icc), _SRGB, outputMode=out_mode)
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the pixels are used as they are, like browsers do
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode != "I" or grey.max() > 255 else 1.0
        return Image.fromarray(to_uint8(grey / scale / 255.0)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(to_uint8(np.asarray(image, dtype=np.float32))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        return Image.fromarray(composite(np.asarray(image.convert("RGBA")), background), "RGB")
    return image.convert("RGB")


def image_rgb(path: PathLike | io.BytesIO, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """An image file as upright uint8 RGB ``[H, W, 3]`` (see `open_image` and `_to_rgb`)."""
    return np.asarray(_to_rgb(open_image(path, max_pixels, name)))


def fit_target_image(
    image: Image.Image, size: tuple[int, int], fit: str = "crop"
) -> tuple[Image.Image, FitMapping]:
    """Fit a target image to the model canvas `size` (w, h) and say how, so it can be undone.

    ``fit="crop"``: centre crop to the model aspect, then resize (nothing of the canvas is empty).
    ``fit="pad"``: resize to fit inside, then letterbox with black bars (nothing of the image is lost).
    Converts to RGB (RGBA/LA/P transparency over black, L, CMYK...) and applies EXIF orientation.
    """
    if fit not in ("crop", "pad"):
        raise MediaError(f"Unknown fit {fit!r}; use 'crop' or 'pad'.")
    img = _to_rgb(image)
    sw, sh = img.size
    dw, dh = size
    if fit == "crop":
        if sw * dh > dw * sh:  # source wider than model: cut the sides
            cw = sh * dw / dh
            box = ((sw - cw) / 2, 0.0, (sw + cw) / 2, float(sh))
        else:
            ch = sw * dh / dw
            box = (0.0, (sh - ch) / 2, float(sw), (sh + ch) / 2)
        out = img.resize((dw, dh), Image.LANCZOS, box=box)
        mapping = FitMapping("crop", (sw, sh), (dw, dh), box,
                             dw / (box[2] - box[0]), dh / (box[3] - box[1]), (0, 0))
        return out, mapping
    scale = min(dw / sw, dh / sh)
    rw, rh = max(1, min(dw, round(sw * scale))), max(1, min(dh, round(sh * scale)))
    off = ((dw - rw) // 2, (dh - rh) // 2)
    canvas = Image.new("RGB", (dw, dh), (0, 0, 0))
    canvas.paste(img.resize((rw, rh), Image.LANCZOS), off)
    mapping = FitMapping("pad", (sw, sh), (dw, dh), (0.0, 0.0, float(sw), float(sh)),
                         rw / sw, rh / sh, off)
    return canvas, mapping


# --------------------------------------------------------------------------------------------
# Writing and retiming


def _fps_fraction(fps: float) -> Fraction:
    """Exact rate for ffmpeg: NTSC rates (23.976, 29.97, 59.94 ...) become N*1000/1001."""
    f = Fraction(repr(float(fps)))
    ntsc = round(float(fps) * 1.001)
    if f.denominator != 1 and ntsc > 0 and abs(float(fps) - ntsc * 1000 / 1001) < 5e-3:
        return Fraction(ntsc * 1000, 1001)
    return f.limit_denominator(1_000_000)


def write_mp4(path: PathLike, frames: np.ndarray, fps: float) -> None:
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 yuv420p mp4, atomically.

    Encodes to a temporary file in the destination directory, checks its frame count and
    `os.replace`s it, so readers never see a half-written video and a failure (OSError) leaves
    nothing behind. Odd widths/heights are
    padded by one replicated edge pixel (yuv420p needs even sizes).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    dest = Path(path)
    tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex}.tmp.mp4")
    try:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (frames.shape[2], frames.shape[1]), fps=_fps_fraction(fps),
            codec="libx264", quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", "18", "-preset", "medium", "-movflags", "+faststart"],
        )
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
        # imageio-ffmpeg does not always report a failed encoder (e.g. an unwritable folder),
        # so check what landed on disk before it replaces anything
        try:
            written = _probe(tmp).info.frames
        except MediaError:
            written = 0
        if written != len(frames):
            raise OSError(f"ffmpeg could not write {dest} ({written} of {len(frames)} frames written); "
                          "check that the folder exists, is writable and has free space.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def retime_frames(frames: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """Resample frames to another rate keeping the clip's duration (49 @ 8 fps -> 147 @ 24 fps).

    ``n_out = round(T * dst / src)``; output frame ``j`` (time ``j / dst``) shows the source frame
    on screen then, ``floor(j * src / dst)`` computed exactly, clipped to the last frame.
    """
    if not (src_fps > 0 and dst_fps > 0):
        raise ValueError(f"fps must be positive, got {src_fps} -> {dst_fps}")
    src, dst = _exact(src_fps), _exact(dst_fps)
    t = len(frames)
    n_out = max(1, round(t * dst / src)) if t else 0
    idx = [min(t - 1, math.floor(j * src / dst)) for j in range(n_out)]
    return frames[idx]
