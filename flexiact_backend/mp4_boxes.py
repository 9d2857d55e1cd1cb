"""Sample counts and edit lists of an MP4/QuickTime file, read from its boxes before FFmpeg opens it.

Why: FFmpeg's mov demuxer builds its whole packet index when it opens a file, from counts the file states:
a 2 KB file that declares 50 million samples (one `stsz` count) or repeats an edit list thousands of times
costs gigabytes and minutes before the first packet. These counts are a few bytes each, so they are read
here and compared with the limits first. Only box headers and the counting boxes are read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MAX_BOXES = 100_000
"""Most boxes looked at; a real file has a few hundred (a few per fragment when fragmented)."""
MAX_DEPTH = 12
"""Deepest nesting of container boxes looked at (moov/trak/mdia/minf/stbl is five)."""
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf", b"mvex"}
_COUNTED = {b"hdlr", b"stsz", b"stz2", b"stts", b"stco", b"co64", b"elst", b"trun"}


@dataclass
class Track:
    """What one `trak` states: its handler ('vide', 'soun' ...), samples, chunks and edit list entries."""

    handler: str = ""
    samples: int = 0
    constant_size: bool = False
    timed_samples: int = 0  # the sum of the `stts` counts
    chunks: int = 0
    edits: int = 0

    @property
    def index_entries(self) -> int:
        """The packets FFmpeg indexes for it: one per sample, one per chunk for constant-size audio."""
        if self.handler == "soun" and self.constant_size:
            return self.chunks
        return max(self.samples, self.timed_samples)


@dataclass
class Counts:
    tracks: list[Track] = field(default_factory=list)
    fragment_samples: int = 0  # the sum of every `trun` count (fragmented files)


class BoxError(ValueError):
    """The boxes cannot be walked: too many of them, or one that runs past its parent."""


def read_counts(path: Path, max_boxes: int = MAX_BOXES) -> Counts:
    """The counts of every track and fragment of an MP4/QuickTime file."""
    counts = Counts()
    seen = [0]
    with open(path, "rb") as f:
        _walk(f, 0, path.stat().st_size, counts, None, seen, max_boxes, 0)
    return counts


def _walk(f: IO[bytes], start: int, end: int, counts: Counts, track: Track | None, seen: list[int],
          max_boxes: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BoxError(f"boxes nested more than {MAX_DEPTH} deep")
    pos = start
    while pos + 8 <= end:
        seen[0] += 1
        if seen[0] > max_boxes:
            raise BoxError(f"more than {max_boxes} boxes")
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:
            raw = f.read(8)
            if len(raw) < 8:
                return
            (size,) = struct.unpack(">Q", raw)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise BoxError(f"a {kind!r} box of {size} bytes")
        box_end = min(pos + size, end)
        if kind == b"trak":
            track = Track()
            counts.tracks.append(track)
            _walk(f, pos + header, box_end, counts, track, seen, max_boxes, depth + 1)
            track = None
        elif kind in _CONTAINERS:
            _walk(f, pos + header, box_end, counts, track, seen, max_boxes, depth + 1)
        elif kind in _COUNTED:
            _count(kind, f.read(min(box_end - pos - header, 16)), counts, track)
            if kind == b"stts" and track is not None:
                track.timed_samples = _stts_total(f, pos + header, box_end)
        pos += size


def _count(kind: bytes, body: bytes, counts: Counts, track: Track | None) -> None:
    """One counting box's numbers, from its first bytes (after version and flags)."""
    if len(body) < 12 and kind in (b"hdlr", b"stsz", b"stz2"):
        return
    if len(body) < 8:
        return
    if kind == b"trun":
        counts.fragment_samples += struct.unpack(">I", body[4:8])[0]
    if track is None:
        return
    if kind == b"hdlr":
        track.handler = body[8:12].decode("latin-1")
    elif kind == b"stsz":
        size, track.samples = struct.unpack(">II", body[4:12])
        track.constant_size = size != 0
    elif kind == b"stz2":
        track.samples = struct.unpack(">I", body[8:12])[0]
    elif kind in (b"stco", b"co64"):
        track.chunks = struct.unpack(">I", body[4:8])[0]
    elif kind == b"elst":
        track.edits += struct.unpack(">I", body[4:8])[0]


def _stts_total(f: IO[bytes], start: int, end: int) -> int:
    """The sum of the sample counts of a `stts` box's entries (only the entries the box really holds)."""
    f.seek(start + 4)
    raw = f.read(4)
    if len(raw) < 4:
        return 0
    (entries,) = struct.unpack(">I", raw)
    entries = min(entries, max(0, (end - start - 8) // 8))
    total, left = 0, entries
    while left:
        chunk = min(left, 65_536)
        data = f.read(chunk * 8)
        if len(data) < chunk * 8:
            break
        total += sum(struct.unpack(f">{chunk * 2}I", data)[0::2])
        left -= chunk
    return total
