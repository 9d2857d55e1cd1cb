"""Content-addressed file store: every file lives under its sha256, written to a temp file then renamed.

Why: a crash mid-write must never leave a half file under a valid id, and the same bytes uploaded twice
are stored once. No client-supplied name ever becomes part of a path: ids are validated hex digests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,12}$")
_CHUNK = 1 << 20


class TooLarge(Exception):
    """The stream went past the byte limit; the partial temp file has been removed."""


def safe_suffix(filename: str | None) -> str:
    """A lower-case extension like '.mp4' taken from a client file name, or '' when it is not plain."""
    if not filename:
        return ""
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if _SUFFIX_RE.match(suffix) else ""


class FileStore:
    """Files under `root/files/<aa>/<sha256><suffix>`; temp files under `root/tmp` (cleared at start)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def tmp_path(self, suffix: str = "") -> Path:
        """A fresh path in the store's temp dir (same filesystem, so a later rename is atomic)."""
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def relpath(self, sha: str, suffix: str) -> str:
        if not SHA256_RE.match(sha) or not (suffix == "" or _SUFFIX_RE.match(suffix)):
            raise ValueError(f"not a file id: {sha!r}{suffix!r}")
        return f"files/{sha[:2]}/{sha}{suffix}"

    def path(self, relpath: str) -> Path:
        """The absolute path of a stored file from its relative path as recorded in the database."""
        return self.root / relpath

    async def receive(self, chunks: AsyncIterator[bytes], limit: int, suffix: str) -> tuple[Path, str, int]:
        """Stream `chunks` to a temp file, hashing on the way; raise TooLarge past `limit` bytes."""
        tmp = self.tmp_path(suffix)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge()
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def adopt(self, tmp: Path, sha: str | None = None) -> tuple[str, str, int]:
        """Move a finished temp file into place under its sha256; returns (sha, relpath, size)."""
        if sha is None:
            sha = sha256_file(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        rel = self.relpath(sha, safe_suffix(tmp.name))
        size = tmp.stat().st_size
        self.restore(tmp, rel)
        return sha, rel, size

    def restore(self, tmp: Path, relpath: str) -> None:
        """Put the finished temp file at `relpath` unless that file is already there (same bytes, same name)."""
        dest = self.path(relpath)
        if dest.is_file():
            tmp.unlink()
            return
        os.chmod(tmp, 0o600)  # stored files are the service user's alone
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable across a power loss, not only a process crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
