"""Image sequences (``shot_0001.png …``, what Blender renders) as reference clips.

A sequence is named by a folder, a pattern (``shot_####.png`` or ``shot_%04d.png``), one of its numbered files,
or a zip of numbered frames (the API's upload). Frames must be numbered without gaps; a gap is an error that
names the missing frame. PNG, JPEG, TIFF and OpenEXR frames are read like target images (`media.open_image`:
every Pillow mode, EXR scene-linear to display sRGB, alpha over `media.BACKGROUND`), then written once, at the
frame rate the caller gives, to a lossless FFV1 AVI file (exact 1/fps timestamps, unlike Matroska's
milliseconds) that every other step reads as an ordinary clip.
Nothing here parses a name as a path for FFmpeg: files are listed by Python and read one at a time.
Untrusted names (a zip's) are split in one pass, never by a backtracking pattern; every frame's size comes from
its header and a zip's sizes from its directory, checked against `SequenceLimits` before any frame is decoded.
"""

from __future__ import annotations

import io
import os
import re
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import MediaError, MediaTooLarge
from . import zips
from .media import MAX_IMAGE_PIXELS, PathLike, VideoInfo, _fps_fraction, _probe, image_header_size, image_rgb
from .zips import MAX_ZIP_ENTRIES

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr")
_HASHES = re.compile(r"#+")
_PRINTF = re.compile(r"%0?(\d*)d")
MAX_FRAME_NAME_CHARS = 1024
"""Longest frame name (a zip member's path included) that is looked at; a longer one is refused."""
MAX_FRAME_DIGITS = 9
"""Most digits of a frame number (a billion frames); more is no render's numbering and is refused."""


@dataclass(frozen=True)
class FrameName:
    """``shot_0001.png`` split as prefix ``shot_``, number ``0001`` and suffix ``.png``."""

    prefix: str
    number: str
    suffix: str

    @property
    def value(self) -> int:
        return int(self.number)


def split_frame_name(name: str) -> FrameName | None:
    """The numbered parts of a frame's name, or None when it has none: one pass from the end of the name.

    Why not a regular expression: ``(.*?)(\\d+)`` backtracks quadratically on a long run of digits, and the
    names come from uploaded zips. Raises MediaError for a name too long or a frame number of absurd length.
    """
    if len(name) > MAX_FRAME_NAME_CHARS:
        raise MediaError(f"a file name in the sequence is {len(name)} characters long; the limit is "
                         f"{MAX_FRAME_NAME_CHARS}. Rename the frames (like shot_0001.png).")
    dot = name.rfind(".")
    suffix = name[dot:] if dot >= 0 else ""
    if len(suffix) < 2 or not (suffix[1:].isascii() and suffix[1:].isalpha()):
        return None
    end = i = dot
    while i > 0 and "0" <= name[i - 1] <= "9":
        i -= 1
    if i == end:
        return None
    if end - i > MAX_FRAME_DIGITS:
        raise MediaError(f"{name[:40]}…: its frame number has {end - i} digits; the limit is {MAX_FRAME_DIGITS}. "
                         "Renumber the frames (like shot_0001.png).")
    return FrameName(name[:i], name[i:end], suffix)


@dataclass(frozen=True)
class Frames:
    """The numbered frames of one sequence, in order: `names[i]` holds frame number `first + i`."""

    names: tuple[str, ...]
    first: int
    folder: Path | None  # None for a zip
    archive: Path | None = None


def looks_like_sequence(path: PathLike) -> bool:
    """A folder or a pattern: what only a sequence can be (a single numbered file may be a still image)."""
    text = os.fspath(path)
    return Path(text).is_dir() or bool(_HASHES.search(Path(text).name) or _PRINTF.search(Path(text).name))


def _numbered(names: list[str]) -> dict[tuple[str, str], dict[int, str]]:
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for name in names:
        m = split_frame_name(name)
        if m and m.suffix.lower() in FRAME_SUFFIXES and not name.startswith("."):
            groups.setdefault((m.prefix, m.suffix), {})[m.value] = name
    return groups


def _ordered(group: dict[int, str], where: str) -> tuple[tuple[str, ...], int]:
    numbers = sorted(group)
    for a, b in zip(numbers, numbers[1:]):
        if b != a + 1:
            m = split_frame_name(group[a])
            assert m is not None
            missing = f"{m.prefix}{str(a + 1).zfill(len(m.number))}{m.suffix}"
            raise MediaError(f"{where}: frame {a + 1} ({missing}) is missing between {group[a]} and {group[b]}; "
                             "render or copy it again, or renumber the frames.")
    if len(numbers) < 2:
        raise MediaError(f"{where}: one frame is not a clip; use it as the target image, or add the other frames.")
    return tuple(group[n] for n in numbers), numbers[0]


def _pick_group(groups: dict[tuple[str, str], dict[int, str]], where: str) -> tuple[str, str]:
    if not groups:
        raise MediaError(f"{where}: no numbered frames (like shot_0001.png) in it; PNG, JPEG, TIFF and EXR "
                         "frames are read.")
    if len(groups) > 1:
        found = ", ".join(sorted(f"{p}####{s}" for p, s in groups))
        raise MediaError(f"{where}: holds more than one sequence ({found}); choose one with a pattern such as "
                         f"{sorted(groups)[0][0]}####{sorted(groups)[0][1]}.")
    return next(iter(groups))


def find_frames(spec: PathLike) -> Frames:
    """The frames a folder, a pattern (``####`` or ``%04d``), a numbered file or a zip names."""
    path = Path(spec)
    if path.is_file() and zipfile.is_zipfile(path):
        return _zip_frames(path)
    if path.is_dir():
        folder, groups = path, _numbered(os.listdir(path))
        key = _pick_group(groups, path.name)
    else:
        folder = path.parent
        if not folder.is_dir():
            raise MediaError(f"{folder.name or folder}: no such folder; check the path.")
        groups = _numbered(os.listdir(folder))
        if path.is_file():
            m = split_frame_name(path.name)
            key = (m.prefix, m.suffix) if m else ("", "")
            if key not in groups:
                raise MediaError(f"{path.name}: not a numbered frame (like shot_0001.png); choose one frame of the "
                                 "sequence, its folder, or a pattern.")
        else:
            m = re.match(r"^(.*?)(?:#+|%0?\d*d)(\.[A-Za-z]+)$", path.name[:MAX_FRAME_NAME_CHARS])
            if not m:
                raise MediaError(f"{path.name}: no such file or sequence; name a folder, a frame, or a pattern such "
                                 "as shot_####.png.")
            key = (m[1], m[2])
            if key not in groups:
                raise MediaError(f"{path.name}: no frames match this pattern in {folder.name}; check the name.")
    names, first = _ordered(groups[key], path.name)
    return Frames(names, first, folder)


@dataclass(frozen=True)
class SequenceLimits:
    """What one sequence may cost, all checked from file headers and the zip's directory before any frame is
    decoded: pixels of a frame, frames, pixels of all frames together, zip entries and unpacked bytes."""

    frame_pixels: int = MAX_IMAGE_PIXELS
    frames: int | None = None
    seconds: float | None = None
    fps: float | None = None  # with `seconds`: frames / fps must stay within it
    total_pixels: int | None = None
    zip_entries: int = MAX_ZIP_ENTRIES
    unpacked_bytes: int | None = None


def zip_holds_frames_named(names: list[str]) -> bool:
    """Whether a zip with these member names holds numbered image frames (an image sequence, not a checkpoint)."""
    return bool(_numbered([os.path.basename(n) for n in names]))


def _zip_frames(archive: Path, max_entries: int = MAX_ZIP_ENTRIES) -> Frames:
    with zips.open_zip(archive, max_entries) as z:
        members = [i for i in z.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    folders = {os.path.dirname(i.filename) for i in members if split_frame_name(os.path.basename(i.filename))}
    if len(folders) > 1:
        raise MediaError(f"{archive.name}: numbered frames in more than one folder of the zip; put one sequence "
                         "in it.")
    groups = _numbered([i.filename for i in members if os.path.dirname(i.filename) in folders])
    names, first = _ordered(groups[_pick_group(groups, archive.name)], archive.name)
    return Frames(names, first, None, archive)


def _check_budget(frames: Frames, limits: SequenceLimits) -> None:
    """Every frame's size from its header (and, in a zip, its method and unpacked size from the directory):
    within the limits, all alike. Raises before a single frame is decoded."""
    if limits.frames is not None and len(frames.names) > limits.frames:
        raise MediaTooLarge(f"the sequence has {len(frames.names)} frames; the limit is {limits.frames}.")
    if limits.seconds is not None and limits.fps and len(frames.names) / limits.fps > limits.seconds:
        raise MediaTooLarge(f"the sequence is {len(frames.names)} frames at {limits.fps:g} fps = "
                            f"{len(frames.names) / limits.fps:.1f} s; the limit is {limits.seconds:g} s.")
    size: tuple[int, int] | None = None

    def check(name: str, wh: tuple[int, int]) -> None:
        nonlocal size
        w, h = wh
        base = os.path.basename(name)
        if w * h > limits.frame_pixels:
            raise MediaTooLarge(f"{base}: the frame is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                                f"{limits.frame_pixels / 1e6:g} megapixels. Render smaller frames.")
        if size is None:
            size = wh
            total = w * h * len(frames.names)
            if limits.total_pixels is not None and total > limits.total_pixels:
                raise MediaTooLarge(f"the sequence is {len(frames.names)} frames of {w}x{h} = {total:,} pixels in "
                                    f"all; the limit is {limits.total_pixels:,} pixels. Send fewer or smaller frames.")
        elif wh != size:
            raise MediaError(f"{base} is {w}x{h}, the first frame {size[0]}x{size[1]}; every frame of a sequence "
                             "must have the same size.")

    if frames.archive is None:
        assert frames.folder is not None
        for name in frames.names:
            check(name, image_header_size(frames.folder / name))
        return
    with zips.open_zip(frames.archive, limits.zip_entries) as z:
        infos = [z.getinfo(n) for n in frames.names]
        unpacked = sum(i.file_size for i in infos)
        if limits.unpacked_bytes is not None and unpacked > limits.unpacked_bytes:
            raise MediaTooLarge(f"{frames.archive.name}: the frames unpack to {unpacked:,} bytes; the limit is "
                                f"{limits.unpacked_bytes:,} bytes.")
        for info in infos:
            zips.check_member(info, frames.archive.name)
            try:
                with z.open(info) as member:
                    check(info.filename, image_header_size(member, os.path.basename(info.filename)))
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise MediaError(f"{frames.archive.name}: {info.filename[-80:]} cannot be unpacked ({exc}); zip "
                                 "it again.") from None


def _read_frames(frames: Frames, max_pixels: int) -> Iterator[tuple[str, np.ndarray]]:
    if frames.archive is None:
        assert frames.folder is not None
        for name in frames.names:
            yield name, image_rgb(frames.folder / name, max_pixels)
        return
    with zipfile.ZipFile(frames.archive) as z:  # its directory was bounded by `_check_budget`
        for name in frames.names:
            data = zips.read_member(z, z.getinfo(name), frames.archive.name)
            yield name, image_rgb(io.BytesIO(data), max_pixels, os.path.basename(name))


def encode_sequence(spec: PathLike, fps: float, dest: PathLike, limits: SequenceLimits = SequenceLimits()
                    ) -> VideoInfo:
    """Write the sequence `spec` names as a lossless FFV1 AVI clip at `fps` to `dest` (atomically); its VideoInfo.

    Every frame must have the first frame's size. Raises MediaError saying which frame is wrong, MediaTooLarge
    past `limits` (from the headers, before decoding).
    """
    if not fps > 0:
        raise MediaError(f"frame rate {fps!r} is not positive; give the rate the frames were rendered at "
                         "(e.g. 24).")
    path = Path(spec)
    frames = _zip_frames(path, limits.zip_entries) if path.is_file() and zipfile.is_zipfile(path) else find_frames(spec)
    _check_budget(frames, limits)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex}.tmp.avi")
    rate = _fps_fraction(fps)
    try:
        with av.open(str(tmp), "w", format="avi") as out:
            stream = None
            size = None
            for i, (name, rgb) in enumerate(_read_frames(frames, limits.frame_pixels)):
                if stream is None:
                    size = rgb.shape[:2]
                    stream = out.add_stream("ffv1", rate=rate)
                    stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "bgr0"
                    stream.codec_context.time_base = Fraction(1) / rate
                elif rgb.shape[:2] != size:
                    raise MediaError(f"{os.path.basename(name)} is {rgb.shape[1]}x{rgb.shape[0]}, the first frame "
                                     f"{size[1]}x{size[0]}; every frame of a sequence must have the same size.")
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1) / rate
                out.mux(stream.encode(frame))
            assert stream is not None
            out.mux(stream.encode(None))
        info = _probe(tmp).info
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return info
