"""Reference clips in, generated clips out: everything that touches video and image files.

All video work goes through imageio-ffmpeg's bundled ffmpeg binary (no ffprobe is shipped, so
`probe_video` reads ffmpeg's own stream listing and a stream-copy packet dump, which costs no
decoding). Times are handled as exact `Fraction`s of the stream time base so that a trim typed
as ``0.3`` selects the frame at exactly 0.3 s on a 10 fps clip instead of the one before it.

Frame selection rule (see `trim_frame_indices`): for a trim ``[start, end)`` resampled to ``N``
frames, output frame ``i`` shows the source frame that is on screen at time
``t_i = start + i * (end - start) / N``, i.e. the last frame whose presentation timestamp is
``<= t_i`` (the first frame if ``t_i`` lies before it). On a constant-rate clip at ``fps`` whose
first frame is at 0 this is ``floor(t_i * fps)``; on a variable-rate clip it follows the real
timestamps.
"""

from __future__ import annotations

import bisect
import math
import os
import queue
import re
import subprocess
import threading
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flexiact_backend.errors import MediaError

MIN_SEGMENT_S = 0.5
"""Shortest trim accepted: below this there is too little motion to learn an action from."""

END_TOLERANCE_S = 0.05
"""A trim end this far past the clip end is clamped to the end (players round the duration)."""

_STANDARD_FPS = (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30),
                 Fraction(48), Fraction(50), Fraction(60000, 1001), Fraction(60))
"""A measured average snaps to the nearest of these within 0.3% (millisecond time bases blur them)."""

_IMAGE_DEMUXERS = ("image2", "_pipe", "apng")  # ffmpeg demuxers that read still images
_TEXT_DEMUXERS = ("tty",)  # ffmpeg renders any text file as "ANSI art" video; that is not a clip

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class VideoInfo:
    """What a user sees of a video file; width/height are after the rotation is applied."""

    width: int
    height: int
    fps: float  # average rate: frames / (span from first frame to end of last frame)
    duration_s: float  # end of the last frame, measured from the start of the file
    frames: int
    rotation: int  # degrees (0/90/180/270) the stored picture is turned counter-clockwise for display
    has_audio: bool


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


def _ffmpeg() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def _exact(x: float | Fraction) -> Fraction:
    """A float as the decimal the user typed (0.3 -> 3/10, not 0.29999...), Fractions unchanged."""
    if isinstance(x, Fraction):
        return x
    return Fraction(repr(float(x)))


def _existing_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{p}: no such file; check the path.")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: the file is empty (0 bytes); export or copy it again.")
    return p


def _last_lines(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# Probing


_STREAM_RE = re.compile(r"^\s*Stream #\d+:(\d+)\S*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")
_SIZE_RE = re.compile(r"(?:^|[ ,])(\d{1,5})x(\d{1,5})(?=[ ,\[]|$)")
_ROT_RE = re.compile(r"(?:display ?matrix): rotation of (-?[\d.]+) degrees", re.IGNORECASE)
_INPUT_RE = re.compile(r"^Input #0, ([^ ]+), from")
_TB_RE = re.compile(r"^#tb 0: (\d+)/(\d+)")


def _snap_fps(measured: Fraction) -> float:
    nearest = min(_STANDARD_FPS, key=lambda std: abs(measured - std))
    return float(nearest if abs(measured - nearest) <= nearest * Fraction(3, 1000) else measured)


def probe_video(path: PathLike) -> VideoInfo:
    """Describe the first video stream without decoding it (one stream-copy pass over packets).

    Raises MediaError for a missing, empty, unreadable or non-video file and for a video stream
    without frames.
    """
    return _probe(path)[0]


def _probe(path: PathLike) -> tuple[VideoInfo, Fraction]:
    """`probe_video` plus the exact end time, which trims must be compared against."""
    p = _existing_file(path)
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-nostats", "-i", str(p),
           "-map", "0:v:0?", "-c", "copy", "-f", "framemd5", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    err = proc.stderr
    demuxer = None
    for line in err.splitlines():
        m = _INPUT_RE.match(line)
        if m:
            demuxer = m.group(1)
            break
    if demuxer is None:
        raise MediaError(
            f"{p.name}: not a video file ffmpeg can read ({_last_lines(err, 1)}); "
            "use an mp4, mov, webm, mkv or avi file."
        )
    if demuxer in _TEXT_DEMUXERS:
        raise MediaError(f"{p.name}: this is a text file, not a video; choose a video clip.")
    if any(d in demuxer for d in _IMAGE_DEMUXERS):
        raise MediaError(f"{p.name}: this is a still image, not a video; choose a video clip.")

    width = height = None
    rotation = 0
    has_audio = False
    in_video = False
    for line in err.splitlines():
        m = _STREAM_RE.match(line)
        if m:
            kind = m.group(2)
            has_audio = has_audio or kind == "Audio"
            in_video = kind == "Video" and width is None
            if in_video:
                size = _SIZE_RE.search(m.group(3))
                if size:
                    width, height = int(size.group(1)), int(size.group(2))
            continue
        if line.startswith(("Output #", "Stream mapping")):
            in_video = False
        rot = _ROT_RE.search(line)
        if rot and in_video:
            rotation = round(float(rot.group(1))) % 360
    if width is None or height is None:
        raise MediaError(f"{p.name}: the file has no video stream; choose a file with video in it.")

    tb = None
    pts: list[int] = []
    durs: list[int] = []
    for line in proc.stdout.splitlines():
        m = _TB_RE.match(line)
        if m:
            tb = Fraction(int(m.group(1)), int(m.group(2)))
        elif line.startswith("0,"):
            fields = [f.strip() for f in line.split(",")]
            pts.append(int(fields[2]))
            durs.append(int(fields[3]))
    if proc.returncode != 0 and not pts:
        raise MediaError(f"{p.name}: the video could not be read ({_last_lines(err)}).")
    if tb is None or not pts:
        raise MediaError(f"{p.name}: the video stream has no frames; export the clip again.")
    order = sorted(range(len(pts)), key=pts.__getitem__)
    spts = [pts[i] for i in order]
    last_dur = durs[order[-1]]
    if last_dur <= 0:
        deltas = np.diff(spts)
        last_dur = int(np.median(deltas)) if len(deltas) else 0
    end = (spts[-1] + last_dur) * tb
    span = end - spts[0] * tb
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        width=width,
        height=height,
        fps=_snap_fps(Fraction(len(spts)) / span) if span > 0 else 0.0,
        duration_s=float(end),
        frames=len(spts),
        rotation=rotation,
        has_audio=has_audio,
    ), end


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


_SHOWINFO_TB_RE = re.compile(r"config in time_base: (\d+)/(\d+)")
_SHOWINFO_PTS_RE = re.compile(r"\] n: *\d+ pts: *(\S+) ")


def _stderr_reader(stream: Iterable[str], out: queue.Queue, log: list[str]) -> None:
    """Turn showinfo's per-frame lines into exact timestamps, in frame order; keep the rest.

    A frame without a timestamp (NOPTS) is queued as None so the reader stays in step with the
    frames and the decoder can refuse the clip; the end of the stream is queued as EOFError.
    """
    tb: Fraction | None = None
    for line in stream:
        m = _SHOWINFO_PTS_RE.search(line)
        if m and tb is not None:
            raw = m.group(1)
            out.put(int(raw) * tb if raw.lstrip("-").isdigit() else None)
            continue
        m = _SHOWINFO_TB_RE.search(line)
        if m:
            tb = Fraction(int(m.group(1)), int(m.group(2)))
            continue
        log.append(line)
    out.put(EOFError)


def _decode_size(info: VideoInfo, max_side: int | None) -> tuple[int, int]:
    w, h = info.width, info.height
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2)


def read_clip(
    path: PathLike,
    start_s: float,
    end_s: float | None,
    num_frames: int,
    max_side: int | None = None,
) -> np.ndarray:
    """Decode the trim ``[start_s, end_s)`` of a clip resampled to `num_frames` upright RGB frames.

    Returns uint8 ``[num_frames, H, W, 3]``. Frames are chosen by their real timestamps with the
    rule of `trim_frame_indices` (so variable frame rate works), rotation metadata is applied
    (ffmpeg autorotate), and decoding streams: only the previous frame and the chosen ones are
    kept, and ffmpeg is stopped once the last needed frame is in. `max_side` optionally
    downscales (even sizes, aspect kept) so that long 4K clips do not fill memory.
    `end_s=None` means the end of the clip. Raises MediaError for bad files and bad trims.
    """
    info, duration = _probe(path)
    start, end = _check_trim(duration, start_s, end_s)
    targets = _target_times(start, end, num_frames)
    w, h = _decode_size(info, max_side)
    vf = "showinfo" if (w, h) == (info.width, info.height) else f"scale={w}:{h}:flags=area,showinfo"
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info",
           "-i", str(path), "-map", "0:v:0", "-an", "-sn", "-dn", "-vf", vf,
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame_bytes = w * h * 3
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stamps: queue.Queue = queue.Queue()
    log: list[str] = []
    reader = threading.Thread(
        target=_stderr_reader,
        args=((ln.decode("utf-8", "replace") for ln in iter(proc.stderr.readline, b"")),  # type: ignore[union-attr]
              stamps, log),
        daemon=True,
    )
    reader.start()
    chosen: list[np.ndarray | None] = [None] * num_frames
    nxt = 0
    prev: np.ndarray | None = None
    decoded = 0
    stopped_early = False
    try:
        while nxt < num_frames:
            buf = proc.stdout.read(frame_bytes)  # type: ignore[union-attr]
            if len(buf) < frame_bytes:
                break
            pts = stamps.get(timeout=60)
            if pts is EOFError:
                raise MediaError(f"{Path(path).name}: lost track of frame timestamps while decoding.")
            if pts is None:
                raise MediaError(
                    f"{Path(path).name}: the video has frames without timestamps; "
                    "remux or re-export it (e.g. to mp4) and try again."
                )
            frame = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)
            decoded += 1
            on_screen = frame if prev is None else prev  # times before the first frame take it
            while nxt < num_frames and targets[nxt] < pts:
                chosen[nxt] = on_screen
                nxt += 1
            prev = frame
        else:
            stopped_early = True
        if nxt < num_frames and prev is not None:
            chosen[nxt:] = [prev] * (num_frames - nxt)  # targets after the last frame's timestamp
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
        rc = proc.wait()
        reader.join(timeout=10)
        proc.stderr.close()  # type: ignore[union-attr]
    if decoded == 0:
        raise MediaError(
            f"{Path(path).name}: no frame could be decoded ({_last_lines(''.join(log))}); "
            "the file may be damaged, export it again."
        )
    if rc != 0 and not stopped_early:
        raise MediaError(
            f"{Path(path).name}: decoding failed ({_last_lines(''.join(log))}); "
            "the file may be damaged, export it again."
        )
    return np.stack(chosen)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Images


def open_image(path: PathLike) -> Image.Image:
    p = _existing_file(path)
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{p.name}: not an image file that can be read ({exc}); use PNG or JPEG.") from exc
    return img


def read_image_info(path: PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied). MediaError if not an image."""
    img = open_image(path)
    return ImageOps.exif_transpose(img).size


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto black, so alpha renders look like the letterbox bars."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


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
    if f.denominator != 1 and abs(float(fps) - ntsc * 1000 / 1001) < 5e-3:
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
            written = probe_video(tmp).frames
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
