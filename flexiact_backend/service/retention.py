"""Garbage collection and retention of the data dir: what nothing needs goes, oldest first.

Why: a studio backend runs for months; without this every upload, result and work dir stays forever and
the disk fills. The rule that makes it safe: a file is removed only when no record needs it, and never
one that a queued, running or recent job names; files not yet recorded get a grace period.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

#: files and temp files younger than this are left alone (an upload or result between write and record)
GRACE_S = 3600.0
#: jobs finished within this window keep their inputs and results even under the size cap
RECENT_S = 24 * 3600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class RetentionPolicy:
    """`keep_results_days`: finished generations and unused uploads older than this go (None: keep).
    `max_data_bytes`: past this the oldest unneeded files go first (None: no cap)."""

    keep_results_days: float | None = 30.0
    max_data_bytes: int | None = None


@dataclass
class Collection:
    """What one collection removed (or, in a dry run, would remove)."""

    files: list[tuple[str, int]] = field(default_factory=list)  # (path relative to the data dir, bytes)
    jobs: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)  # file ids whose records go
    dirs: list[tuple[str, int]] = field(default_factory=list)
    data_bytes_before: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(n for _, n in self.files) + sum(n for _, n in self.dirs)

    def report(self) -> dict:
        return {"freed_bytes": self.freed_bytes, "files": [p for p, _ in self.files], "jobs": self.jobs,
                "file_records": self.records, "dirs": [p for p, _ in self.dirs],
                "data_bytes_before": self.data_bytes_before}


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under `path`."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:  # removed while walking
            pass
    return total


def collect(data_dir: Path, policy: RetentionPolicy, *, dry_run: bool = False, now: float | None = None) -> Collection:
    """Plan and (unless `dry_run`) apply one collection of `data_dir`; safe while the server runs."""
    data_dir = Path(data_dir)
    now = time.time() if now is None else now
    out = Collection(data_bytes_before=tree_bytes(data_dir))
    db = sqlite3.connect(str(data_dir / "state.sqlite3"), timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        db.execute("BEGIN IMMEDIATE")  # the plan and the record deletions see one state of the database
        try:
            doomed_paths = _plan(db, data_dir, policy, now, out)
            if dry_run:
                db.execute("ROLLBACK")
            else:
                db.executemany("DELETE FROM jobs WHERE id=?", [(j,) for j in out.jobs])
                db.executemany("DELETE FROM files WHERE id=?", [(f,) for f in out.records])
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        db.close()
    if not dry_run:  # records first, bytes second: a crash in between leaves orphans, collected next time
        for path in doomed_paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return out


def _plan(db: sqlite3.Connection, data_dir: Path, policy: RetentionPolicy, now: float, out: Collection) -> list[Path]:
    jobs = [dict(r) for r in db.execute("SELECT id, kind, status, finished_at, params, result FROM jobs")]
    actions = [dict(r) for r in db.execute("SELECT id, status, file, video, created_at FROM actions")]
    files = {r["id"]: dict(r) for r in db.execute("SELECT id, path, size, created_at FROM files ORDER BY created_at")}
    keep_s = policy.keep_results_days * DAY_S if policy.keep_results_days is not None else None

    finished = lambda j: j["status"] in ("succeeded", "failed", "cancelled")  # noqa: E731
    old_jobs = {j["id"] for j in jobs if keep_s is not None and j["kind"] == "generate" and finished(j)
                and (j["finished_at"] or 0) < now - keep_s}
    out.jobs = sorted(old_jobs)
    kept_jobs = [j for j in jobs if j["id"] not in old_jobs]

    action_refs = {a[k] for a in actions for k in ("file", "video") if a[k]}
    job_refs: dict[str, bool] = {}  # id -> named by a queued, running or recent job
    for j in kept_jobs:
        params, result = json.loads(j["params"] or "{}"), json.loads(j["result"] or "{}")
        protected = not finished(j) or (j["finished_at"] or 0) >= now - RECENT_S
        for ref in (params.get("image"), params.get("video"), result.get("video")):
            if ref:
                job_refs[ref] = job_refs.get(ref, False) or protected

    doomed: list[Path] = []

    def forget(file_id: str) -> None:
        rec = files.pop(file_id)
        out.records.append(file_id)
        path = data_dir / rec["path"]
        if path.is_file() and file_id not in action_refs:
            doomed.append(path)
            out.files.append((rec["path"], path.stat().st_size))

    # uploads and results past retention that no action or kept job names
    if keep_s is not None:
        for file_id, rec in list(files.items()):
            if rec["created_at"] < now - keep_s and file_id not in action_refs and file_id not in job_refs:
                forget(file_id)

    # orphans: stored bytes no record names, and temp files, past the grace period
    named = set(files) | action_refs | set(job_refs)
    for sub in ("files", "tmp"):
        for path in sorted((data_dir / sub).rglob("*")) if (data_dir / sub).is_dir() else []:
            if path.is_file() and path.stat().st_mtime < now - GRACE_S and (
                    sub == "tmp" or path.name.split(".", 1)[0] not in named):
                doomed.append(path)
                out.files.append((str(path.relative_to(data_dir)), path.stat().st_size))

    # work dirs of finished or deleted extractions (failed/cancelled ones keep theirs for a resume, within retention)
    by_id = {a["id"]: a for a in actions}
    work = data_dir / "work"
    for wd in sorted(work.iterdir()) if work.is_dir() else []:
        action = by_id.get(wd.name)
        stale = action is None or action["status"] == "ready" or (
            action["status"] in ("failed", "cancelled") and keep_s is not None
            and action["created_at"] < now - keep_s)
        if stale and wd.stat().st_mtime < now - GRACE_S:
            doomed.append(wd)
            out.dirs.append((str(wd.relative_to(data_dir)), tree_bytes(wd)))

    # the size cap: oldest unneeded uploads and results first, never what an action or a recent job names
    if policy.max_data_bytes is not None:
        remaining = out.data_bytes_before - out.freed_bytes
        for file_id, rec in list(files.items()):
            if remaining <= policy.max_data_bytes:
                break
            if file_id in action_refs or job_refs.get(file_id, False):
                continue
            before = out.freed_bytes
            forget(file_id)
            remaining -= out.freed_bytes - before
    return doomed
