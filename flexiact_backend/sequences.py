"""Image sequences (``shot_0001.png …``, what Blender renders) as reference clips.

A sequence is named by a folder, a pattern (``shot_####.png`` or ``shot_%04d.png``), one of its numbered files,
or a zip of numbered frames (the API's upload). Frames must be numbered without gaps; a gap is an error that
names the missing frame. PNG, JPEG, TIFF and OpenEXR frames are read like target images (`media.open_image`:
every Pillow mode, EXR scene-linear to display sRGB, alpha over `media.BACKGROUND`), then written once, at the
frame rate the caller gives, to a lossless FFV1 AVI file (exact 1/fps timestamps, unlike Matroska's
milliseconds) that every other step reads as an ordinary clip.
Nothing here parses a name as a path for FFmpeg: files are listed by Python and read one at a time.
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
from .media import MAX_IMAGE_PIXELS, PathLike, VideoInfo, _fps_fraction, _probe, image_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr")
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)(?P<suffix>\.[A-Za-z]+)$")
_HASHES = re.compile(r"#+")
_PRINTF = re.compile(r"%0?(\d*)d")


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
        m = _NUMBERED.match(name)
        if m and m["suffix"].lower() in FRAME_SUFFIXES and not name.startswith("."):
            groups.setdefault((m["prefix"], m["suffix"]), {})[int(m["number"])] = name
    return groups


def _ordered(group: dict[int, str], where: str) -> tuple[tuple[str, ...], int]:
    numbers = sorted(group)
    for a, b in zip(numbers, numbers[1:]):
        if b != a + 1:
            m = _NUMBERED.match(group[a])
            assert m is not None
            missing = f"{m['prefix']}{str(a + 1).zfill(len(m['number']))}{m['suffix']}"
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
            m = _NUMBERED.match(path.name)
            key = (m["prefix"], m["suffix"]) if m else ("", "")
            if key not in groups:
                raise MediaError(f"{path.name}: not a numbered frame (like shot_0001.png); choose one frame of the "
                                 "sequence, its folder, or a pattern.")
        else:
            m = re.match(r"^(.*?)(?:#+|%0?\d*d)(\.[A-Za-z]+)$", path.name)
            if not m:
                raise MediaError(f"{path.name}: no such file or sequence; name a folder, a frame, or a pattern such "
                                 "as shot_####.png.")
            key = (m[1], m[2])
            if key not in groups:
                raise MediaError(f"{path.name}: no frames match this pattern in {folder.name}; check the name.")
    names, first = _ordered(groups[key], path.name)
    return Frames(names, first, folder)


def zip_holds_frames(archive: PathLike) -> bool:
    """Whether a zip holds numbered image frames (then it is an image sequence, not a checkpoint)."""
    try:
        with zipfile.ZipFile(archive) as z:
            return bool(_numbered([os.path.basename(n) for n in z.namelist()]))
    except zipfile.BadZipFile:
        return False


def _zip_frames(archive: Path) -> Frames:
    with zipfile.ZipFile(archive) as z:
        members = [i for i in z.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    folders = {os.path.dirname(i.filename) for i in members if _NUMBERED.match(os.path.basename(i.filename))}
    if len(folders) > 1:
        raise MediaError(f"{archive.name}: numbered frames in more than one folder of the zip; put one sequence "
                         "in it.")
    groups = _numbered([i.filename for i in members if os.path.dirname(i.filename) in folders])
    names, first = _ordered(groups[_pick_group(groups, archive.name)], archive.name)
    return Frames(names, first, None, archive)


def _read_frames(frames: Frames, max_pixels: int) -> Iterator[tuple[str, np.ndarray]]:
    if frames.archive is None:
        assert frames.folder is not None
        for name in frames.names:
            yield name, image_rgb(frames.folder / name, max_pixels)
        return
    with zipfile.ZipFile(frames.archive) as z:
        for name in frames.names:
            info = z.getinfo(name)
            if info.file_size > 8 * max_pixels + (64 << 20):  # bigger than any frame within the pixel limit
                raise MediaTooLarge(f"{os.path.basename(name)}: {info.file_size} bytes unpacked, too big for a "
                                    f"frame of at most {max_pixels / 1e6:g} megapixels.")
            yield name, image_rgb(io.BytesIO(z.read(info)), max_pixels, os.path.basename(name))


def encode_sequence(spec: PathLike, fps: float, dest: PathLike, max_pixels: int = MAX_IMAGE_PIXELS,
                    max_frames: int | None = None) -> VideoInfo:
    """Write the sequence `spec` names as a lossless FFV1 AVI clip at `fps` to `dest` (atomically); its VideoInfo.

    Every frame must have the first frame's size. Raises MediaError saying which frame is wrong.
    """
    if not fps > 0:
        raise MediaError(f"frame rate {fps!r} is not positive; give the rate the frames were rendered at "
                         "(e.g. 24).")
    frames = find_frames(spec)
    if max_frames is not None and len(frames.names) > max_frames:
        raise MediaTooLarge(f"the sequence has {len(frames.names)} frames; the limit is {max_frames}.")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex}.tmp.avi")
    rate = _fps_fraction(fps)
    try:
        with av.open(str(tmp), "w", format="avi") as out:
            stream = None
            size = None
            for i, (name, rgb) in enumerate(_read_frames(frames, max_pixels)):
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
