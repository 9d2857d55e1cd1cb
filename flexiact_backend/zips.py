"""Uploaded zip archives opened within bounds: entry count and directory size from the end record first.

Why: `zipfile.ZipFile` builds one object per entry of the central directory when it opens, so a small zip
that declares a million entries costs hundreds of megabytes and seconds before a single name is looked at.
The end-of-central-directory record (and its ZIP64 form) states both numbers in a few bytes at the file's end.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from .errors import MediaError, MediaTooLarge

MAX_ZIP_ENTRIES = 20_000
"""Default: most entries of an uploaded zip (frames of a sequence; a checkpoint has a few hundred)."""
_MAX_ENTRY_BYTES = 46 + 2 * 65_535  # a central directory entry: fixed part plus name and extra field
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_NAMED_METHODS = {9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard", 99: "AES encryption"}


def directory_size(path: Path) -> tuple[int, int]:
    """(entries, central directory bytes) as the archive's end record states them; MediaError if it has none."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - 65_535))
        tail = f.read()
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < 22:
            raise MediaError(f"{path.name}: not a complete zip archive (its end record is missing); zip it again.")
        entries, cd_bytes = struct.unpack("<HI", tail[at + 10:at + 16])
        locator = tail[at - 20:at] if at >= 20 else b""
        if locator[:4] == _ZIP64_LOCATOR:
            (offset,) = struct.unpack("<Q", locator[8:16])
            f.seek(offset)
            record = f.read(56)
            if record[:4] != _ZIP64_EOCD or len(record) < 56:
                raise MediaError(f"{path.name}: the zip's ZIP64 end record is damaged; zip it again.")
            entries, cd_bytes = struct.unpack("<QQ", record[32:48])
    return entries, cd_bytes


def open_zip(path: Path, max_entries: int = MAX_ZIP_ENTRIES) -> zipfile.ZipFile:
    """`zipfile.ZipFile(path)` once its end record says it is within `max_entries` (MediaTooLarge otherwise)."""
    entries, cd_bytes = directory_size(path)
    if entries > max_entries or cd_bytes > max_entries * _MAX_ENTRY_BYTES:
        raise MediaTooLarge(f"{path.name}: the zip holds {entries} entries in a {cd_bytes}-byte directory; the "
                            f"limit is {max_entries} entries. Split it, or upload the frames as a video.")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error) as exc:
        raise MediaError(f"{path.name}: the zip archive is damaged ({exc}); zip it again.") from None


def check_member(info: zipfile.ZipInfo, archive: str) -> None:
    """Refuse a member this service does not unpack: encrypted, or compressed other than stored or deflate."""
    name = info.filename[-80:]
    if info.compress_type in _NAMED_METHODS or info.compress_type not in _METHODS:
        method = _NAMED_METHODS.get(info.compress_type, f"method {info.compress_type}")
        raise MediaError(f"{archive}: {name} is compressed with {method}; only stored and deflate (the default "
                         "of every zip tool) are read. Zip it again without encryption or special compression.")
    if info.flag_bits & 0x1:
        raise MediaError(f"{archive}: {name} is encrypted; zip the frames again without a password.")


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> bytes:
    """A member's bytes (at most its declared size); a bad CRC or damaged data is a MediaError."""
    check_member(info, archive)
    try:
        return z.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        reason = "its checksum does not match" if "CRC" in str(exc) else f"damaged: {exc}"
        raise MediaError(f"{archive}: {info.filename[-80:]} cannot be unpacked ({reason}); zip it again.") from None
