"""Durable service state in SQLite (WAL): uploaded files, actions and jobs.

Why: jobs run for hours and the server may be killed at any moment; every state change is one
committed transaction, so a restart finds exactly what was promised and re-queues what was running.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
#: disk space kept beside the database so that job outcomes can be recorded on a full disk
RESERVE_BYTES = 1024**2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, path TEXT NOT NULL,
    filename TEXT, meta TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS actions(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, caption TEXT NOT NULL, status TEXT NOT NULL,
    source TEXT NOT NULL, request_key TEXT UNIQUE, video TEXT, start_s REAL, end_s REAL,
    steps INTEGER, seed INTEGER, base_model TEXT NOT NULL, file TEXT, meta TEXT NOT NULL,
    job TEXT, error TEXT, created_at REAL NOT NULL, windows_per_step INTEGER);
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, phase TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL,
    eta_s REAL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT, result TEXT,
    params TEXT NOT NULL, action TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 0, worker TEXT,
    finish_requested INTEGER NOT NULL DEFAULT 0, step_s REAL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, kind, created_at);
CREATE TABLE IF NOT EXISTS previews(
    job TEXT NOT NULL, step INTEGER NOT NULL, file TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY(job, step));
"""
#: Columns added after a release: (table, column, declaration), added to databases that predate them.
_ADDED_COLUMNS = (("jobs", "worker", "TEXT"), ("jobs", "finish_requested", "INTEGER NOT NULL DEFAULT 0"),
                  ("jobs", "owner", "TEXT"), ("jobs", "step_s", "REAL"), ("actions", "windows_per_step", "INTEGER"))
#: The GPUs a job asks for, as SQL on its params (jobs queued before `gpus` existed ask for one).
_JOB_GPUS = "COALESCE(json_extract(params, '$.gpus'), 1)"
#: The order jobs leave the queue in: generations first, then the oldest.
_QUEUE_KEY = "CASE {t}kind WHEN 'generate' THEN 0 ELSE 1 END, {t}created_at, {t}rowid"


#: Every content id a record names: uploads and results, action files and source videos, job inputs and videos.
#: (An extraction job's `result.file` is its action's file: the action owns it, and deleting the action frees it.)
_REFERENCES = """SELECT ref FROM (
    SELECT id AS ref FROM files
    UNION SELECT file FROM actions WHERE file IS NOT NULL
    UNION SELECT video FROM actions WHERE video IS NOT NULL
    UNION SELECT json_extract(params, '$.image') FROM jobs WHERE json_extract(params, '$.image') IS NOT NULL
    UNION SELECT json_extract(params, '$.video') FROM jobs WHERE json_extract(params, '$.video') IS NOT NULL
    UNION SELECT json_extract(result, '$.video') FROM jobs WHERE json_extract(result, '$.video') IS NOT NULL
) {where}"""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GpuRoom:
    """A claiming worker's node: how many GPUs (workers) it has alive, and how many of them are idle now."""

    node: int
    idle: int


class Database:
    """One connection guarded by a lock: SQLite serialises writers anyway and every call is short."""

    def __init__(self, path: Path, redact: Callable[[str], str] = lambda text: text) -> None:
        self._redact = redact  # job errors are shown to clients: no server paths in them
        self._reserve_path = Path(f"{path}-reserve")
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._conn.executescript(_SCHEMA)
            for table, column, decl in _ADDED_COLUMNS:
                if column not in {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _tx(self, statements: list[tuple[str, tuple]], *, use_reserve: bool = False) -> list[int]:
        """One transaction; the rows each statement changed. With `use_reserve`, on a full disk the reserve is
        given up and it is tried once more."""
        with self._lock:
            try:
                return self._run_tx(statements)
            except sqlite3.OperationalError as exc:
                if not use_reserve or "full" not in str(exc) or not self._reserve_path.exists():
                    raise
                self._reserve_path.unlink()  # so that a job's failure can still be recorded
                return self._run_tx(statements)

    def _run_tx(self, statements: list[tuple[str, tuple]]) -> list[int]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            changed = [self._conn.execute(sql, args).rowcount for sql, args in statements]
            self._conn.execute("COMMIT")
            return changed
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def ensure_reserve(self) -> None:
        """Keep RESERVE_BYTES allocated beside the database: the space its writes get when the disk is full."""
        if self._reserve_path.exists():
            return
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:  # no room for it now; the next garbage collection tries again
            self._reserve_path.unlink(missing_ok=True)

    # ---- start-up recovery -------------------------------------------------------------------
    def recover(self, max_restarts: int = 3) -> int:
        """After a crash: jobs left running go back to the queue (or end, if a cancel was asked).

        `attempts` counts how often a job was running when the process died; past `max_restarts` the job
        fails instead, so that one input that kills the process cannot crash-loop the service forever.
        """
        now = time.time()
        err = _crash_loop_error(max_restarts)
        with self._lock:
            n = self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0]
            self._tx([
                ("UPDATE jobs SET status='cancelled', finished_at=?, phase='cancelled', version=version+1 "
                 "WHERE status IN ('running','queued') AND cancel_requested=1", (now,)),
                ("UPDATE actions SET status='cancelled' WHERE status='pending' AND job IN "
                 "(SELECT id FROM jobs WHERE status='cancelled')", ()),
                ("UPDATE jobs SET attempts=attempts+1 WHERE status='running'", ()),
                ("UPDATE jobs SET status='failed', phase='failed', eta_s=NULL, finished_at=?, error=?, "
                 "version=version+1 WHERE status='running' AND attempts>?", (now, err, max_restarts)),
                ("UPDATE actions SET status='failed', error=? WHERE status='pending' AND job IN "
                 "(SELECT id FROM jobs WHERE status='failed' AND finished_at=?)", (err, now)),
                ("UPDATE jobs SET status='queued', phase='requeued', version=version+1 WHERE status='running'", ()),
            ])
        return n

    # ---- files -------------------------------------------------------------------------------
    def get_file(self, file_id: str) -> dict | None:
        row = self._one("SELECT * FROM files WHERE id=?", (file_id,))
        return _file(row) if row else None

    def add_file(self, file_id: str, kind: str, size: int, path: str, filename: str | None, meta: dict) -> dict:
        """Insert a file record unless the same content is already known; returns the stored record."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO files(id,kind,size,path,filename,meta,created_at) VALUES(?,?,?,?,?,?,?)",
                (file_id, kind, size, path, filename, json.dumps(meta), time.time()))
            return self.get_file(file_id)  # type: ignore[return-value]

    def file_referenced(self, file_id: str) -> bool:
        """Whether any record names this content: an upload or result, an action, or a job's input or output."""
        return self._one(_REFERENCES.format(where="WHERE ref=?") + " LIMIT 1", (file_id,)) is not None

    def referenced_files(self) -> set[str]:
        """Every content id some record names (what garbage collection must keep)."""
        return {r[0] for r in self._all(_REFERENCES.format(where=""))}

    # ---- actions -----------------------------------------------------------------------------
    def get_action(self, action_id: str) -> dict | None:
        row = self._one("SELECT * FROM actions WHERE id=?", (action_id,))
        return _action(row) if row else None

    def action_by_key(self, key: str) -> dict | None:
        row = self._one("SELECT * FROM actions WHERE request_key=?", (key,))
        return _action(row) if row else None

    def list_actions(self) -> list[dict]:
        return [_action(r) for r in self._all("SELECT * FROM actions ORDER BY created_at, rowid")]

    def create_extraction(self, *, key: str, name: str, caption: str, video: str, start_s: float, end_s: float,
                          steps: int, seed: int, base_model: str, params: dict, owner: str | None = None
                          ) -> tuple[dict, dict, bool]:
        """Create (or reuse) the action for this exact request and queue its job; returns (action, job, created).

        A finished or in-progress action for the same request is returned as is; a failed or cancelled
        one gets a new job, which resumes from the checkpoints its earlier attempt left behind.
        """
        with self._lock:
            existing = self.action_by_key(key)
            if existing and existing["status"] in ("ready", "pending"):
                return existing, self.get_job(existing["job"]), False  # type: ignore[return-value]
            now = time.time()
            job_id = new_id()
            action_id = existing["id"] if existing else new_id()
            stmts: list[tuple[str, tuple]] = [(
                "INSERT INTO jobs(id,kind,status,phase,total_steps,created_at,params,action,owner) "
                "VALUES(?,?,?,?,?,?,?,?,?)",
                (job_id, "extract", "queued", "queued", steps, now, json.dumps(params), action_id, owner))]
            if existing:
                stmts.append(("UPDATE actions SET status='pending', job=?, error=NULL, name=? WHERE id=?",
                              (job_id, name, action_id)))
            else:
                stmts.append((
                    "INSERT INTO actions(id,name,caption,status,source,request_key,video,start_s,end_s,steps,seed,"
                    "windows_per_step,base_model,meta,job,created_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (action_id, name, caption, "pending", "extract", key, video, start_s, end_s, steps, seed,
                     params.get("windows_per_step", 1), base_model, "{}", job_id, now)))
            self._tx(stmts)
            return self.get_action(action_id), self.get_job(job_id), True  # type: ignore[return-value]

    def add_imported_action(self, *, name: str, caption: str, base_model: str, file_id: str, meta: dict) -> dict:
        action_id = new_id()
        self._tx([(
            "INSERT INTO actions(id,name,caption,status,source,base_model,file,meta,created_at) "
            "VALUES(?,?,?,?,?,?,?,?,?)",
            (action_id, name, caption, "ready", "import", base_model, file_id, json.dumps(meta), time.time()))])
        return self.get_action(action_id)  # type: ignore[return-value]

    def delete_action(self, action_id: str) -> dict | None:
        """Remove the action; a queued extraction of it is cancelled at once (the caller stops a running one)."""
        with self._lock:
            action = self.get_action(action_id)
            if action is None:
                return None
            stmts = [("DELETE FROM actions WHERE id=?", (action_id,))]
            if action["job"]:
                stmts += self._cancel_statements(action["job"])
            self._tx(stmts)
            return action

    # ---- jobs --------------------------------------------------------------------------------
    def create_generation(self, params: dict, total_steps: int, action_id: str | None, owner: str | None = None
                          ) -> dict:
        job_id = new_id()
        self._tx([(
            "INSERT INTO jobs(id,kind,status,phase,total_steps,created_at,params,action,owner) "
            "VALUES(?,?,?,?,?,?,?,?,?)",
            (job_id, "generate", "queued", "queued", total_steps, time.time(), json.dumps(params), action_id, owner))])
        return self.get_job(job_id)  # type: ignore[return-value]

    def get_job(self, job_id: str) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._with_position(_job(row)) if row else None

    def _with_position(self, job: dict) -> dict:
        """Add `queue_position`: 1 for the queued job that starts next, None once it left the queue."""
        job["queue_position"] = None
        if job["status"] == "queued":
            row = self._one(
                f"SELECT COUNT(*) FROM jobs q, jobs j WHERE j.id=? AND q.status='queued' AND "
                f"({_QUEUE_KEY.format(t='q.')}) < ({_QUEUE_KEY.format(t='j.')})", (job["id"],))
            job["queue_position"] = row[0] + 1  # type: ignore[index]
        return job

    def list_jobs(self, status: str | None, kind: str | None, limit: int) -> list[dict]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            sql, args = sql + " AND status=?", args + [status]
        if kind:
            sql, args = sql + " AND kind=?", args + [kind]
        rows = self._all(sql + " ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, limit))
        return [self._with_position(_job(r)) for r in rows]

    def queue_counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) FROM jobs WHERE status IN ('queued','running') GROUP BY status")
        counts = {"queued": 0, "running": 0}
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def seconds_per_step(self) -> dict[str, float | None]:
        """Per kind, the seconds per step measured inside the last succeeded job's step loop (training,
        denoising; loading, previews and encoding left out), for estimates."""
        out: dict[str, float | None] = {}
        for kind in ("extract", "generate"):
            row = self._one("SELECT step_s FROM jobs WHERE kind=? AND status='succeeded' AND step_s > 0 "
                            "ORDER BY finished_at DESC LIMIT 1", (kind,))
            out[kind] = float(row[0]) if row is not None else None
        return out

    def rename_action(self, action_id: str, name: str, key: str | None = None) -> dict | None:
        """Rename an action wherever its name is shown (its record, its metadata, its job's parameters) and give
        it the request key of its new name (unless another action holds that key); None if it is gone (a delete
        that came first: the two are serialised by the lock)."""
        with self._lock:
            changed = self._tx([
                ("UPDATE actions SET name=?, meta=CASE WHEN json_extract(meta, '$.name') IS NULL "
                 "THEN meta ELSE json_set(meta, '$.name', ?) END, request_key=CASE WHEN ? IS NULL OR EXISTS "
                 "(SELECT 1 FROM actions a WHERE a.request_key=? AND a.id!=actions.id) THEN NULL ELSE ? END "
                 "WHERE id=?", (name, name, key, key, key, action_id)),
                ("UPDATE jobs SET params=json_set(params, '$.name', ?), version=version+1 WHERE action=? AND "
                 "kind='extract' AND EXISTS (SELECT 1 FROM actions WHERE id=?)", (name, action_id, action_id))])
            return self.get_action(action_id) if changed[0] else None

    def queued_count(self, owner: str | None = None) -> int:
        """Jobs waiting in the queue, of one owner or of all."""
        if owner is None:
            return self._one("SELECT COUNT(*) FROM jobs WHERE status='queued'")[0]  # type: ignore[index]
        return self._one("SELECT COUNT(*) FROM jobs WHERE status='queued' AND owner=?", (owner,))[0]  # type: ignore[index]

    def queued_generation_gpus(self) -> int | None:
        """The GPUs the next queued generation asks for; None when no generation waits."""
        row = self._one(f"SELECT {_JOB_GPUS} FROM jobs WHERE status='queued' AND kind='generate' "
                        f"ORDER BY {_QUEUE_KEY.format(t='')} LIMIT 1")
        return None if row is None else int(row[0])

    def claim_next(self, worker: str, gpus: GpuRoom | None = None) -> dict | None:
        """Atomically take the next queued job for `worker`: generations first, then the oldest extraction.

        With `gpus` (a worker that lends its device to a job's gang): the first job in that order that its node
        can ever hold; None while that job needs more of the node's GPUs than are idle, so that later, smaller
        jobs do not keep overtaking it (the node's workers are held for it as they come free)."""
        fits, args = "", ()
        if gpus is not None:
            fits, args = f" AND {_JOB_GPUS} <= ?", (gpus.node,)
        with self._lock:
            row = self._one(f"SELECT id, {_JOB_GPUS} FROM jobs WHERE status='queued'{fits} "
                            f"ORDER BY {_QUEUE_KEY.format(t='')} LIMIT 1", args)
            if row is None or (gpus is not None and row[1] > gpus.idle):
                return None
            self._tx([("UPDATE jobs SET status='running', phase='starting', worker=?, "
                       "started_at=COALESCE(started_at, ?), version=version+1 WHERE id=?", (worker, time.time(), row[0]))])
            return self.get_job(row[0])

    def update_progress(self, job_id: str, *, phase: str, progress: float | None, step: int | None,
                        eta_s: float | None, step_s: float | None = None) -> None:
        """Record progress; progress and step only ever grow, so a resumed job never appears to go back.
        `step_s`: the seconds per step measured so far in the job's step loop (kept when None)."""
        eta = eta_s if eta_s is not None and math.isfinite(eta_s) and eta_s >= 0 else None
        p = min(max(progress, 0.0), 1.0) if progress is not None and math.isfinite(progress) else None
        self._tx([(
            "UPDATE jobs SET phase=?, progress=MAX(progress, COALESCE(?, progress)), "
            "step=MAX(step, COALESCE(?, step)), eta_s=?, step_s=COALESCE(?, step_s), version=version+1 "
            "WHERE id=? AND status='running'", (phase, p, step, eta, step_s, job_id))])

    def requeue(self, job_id: str, phase: str) -> None:
        """Put a running job back in the queue (an extraction that yielded to a generation)."""
        self._tx([("UPDATE jobs SET status='queued', phase=?, eta_s=NULL, version=version+1 "
                   "WHERE id=? AND status='running'", (phase, job_id))])

    def requeue_lost(self, job_id: str, max_restarts: int) -> None:
        """A job whose worker process died under it: back to the queue, or failed past `max_restarts` (as in
        `recover`, which counts the same deaths of the whole service)."""
        now, err = time.time(), _crash_loop_error(max_restarts)
        self._tx([
            ("UPDATE jobs SET attempts=attempts+1 WHERE id=? AND status='running'", (job_id,)),
            ("UPDATE jobs SET status='failed', phase='failed', eta_s=NULL, finished_at=?, error=?, "
             "version=version+1 WHERE id=? AND status='running' AND attempts>?", (now, err, job_id, max_restarts)),
            ("UPDATE actions SET status='failed', error=? WHERE job=? AND status='pending' AND "
             "(SELECT status FROM jobs WHERE id=?)='failed'", (err, job_id, job_id)),
            ("UPDATE jobs SET status='queued', phase='requeued', eta_s=NULL, version=version+1 "
             "WHERE id=? AND status='running'", (job_id,)),
        ])

    def finish_job(self, job_id: str, result: dict, action_update: dict | None = None, step: int | None = None) -> bool:
        """Record success; `step` is how far an extraction finished early got (default: all its steps).

        A cancel that was answered first wins: the job ends cancelled instead (returns False), never
        "succeeded" after its client was told it is being cancelled."""
        with self._lock:
            stmts = [("UPDATE jobs SET status='succeeded', phase='done', progress=1.0, step=COALESCE(?, total_steps), "
                      "eta_s=0, finished_at=?, result=?, version=version+1 WHERE id=? AND status='running' AND "
                      "cancel_requested=0", (step, time.time(), json.dumps(result), job_id))]
            if action_update:
                meta = json.dumps(action_update["meta"])  # its name is the action's now (a rename while it ran)
                stmts.append(("UPDATE actions SET status='ready', file=?, meta=CASE WHEN json_extract(?, '$.name') IS "
                              "NULL THEN ? ELSE json_set(?, '$.name', name) END, error=NULL WHERE job=? AND "
                              "(SELECT status FROM jobs WHERE id=?)='succeeded'",
                              (action_update["file"], meta, meta, meta, job_id, job_id)))
            if self._tx(stmts)[0]:
                return True
            self.fail_job(job_id, "cancelled", "cancelled", "cancelled by request")
            return False

    def fail_job(self, job_id: str, status: str, code: str, message: str) -> None:
        err = json.dumps({"code": code, "message": self._redact(message)})
        self._tx([
            ("UPDATE jobs SET status=?, phase=?, eta_s=NULL, finished_at=?, error=?, version=version+1 "
             "WHERE id=? AND status NOT IN ('succeeded','failed','cancelled')",
             (status, status, time.time(), err, job_id)),
            ("UPDATE actions SET status=?, error=? WHERE job=? AND status='pending'",
             ("cancelled" if status == "cancelled" else "failed", err, job_id)),
        ], use_reserve=True)  # a job's end must be recorded even on a full disk

    def request_finish(self, job_id: str) -> None:
        """Ask a running extraction to stop at its next step and keep the tokens it has."""
        self._tx([("UPDATE jobs SET finish_requested=1, version=version+1 WHERE id=? AND kind='extract' "
                   "AND status IN ('queued','running')", (job_id,))])

    def finish_requested(self, job_id: str) -> bool:
        row = self._one("SELECT finish_requested FROM jobs WHERE id=?", (job_id,))
        return bool(row and row[0])

    # ---- previews ----------------------------------------------------------------------------
    def add_preview(self, job_id: str, step: int, file_id: str) -> None:
        """Record an extraction's preview video; a step rendered again after a resume replaces its preview."""
        self._tx([("INSERT OR REPLACE INTO previews(job,step,file,created_at) VALUES(?,?,?,?)",
                   (job_id, step, file_id, time.time()))])

    def list_previews(self, job_id: str) -> list[dict]:
        return [dict(r) for r in self._all("SELECT * FROM previews WHERE job=? ORDER BY step", (job_id,))]

    def get_preview(self, job_id: str, step: int) -> dict | None:
        row = self._one("SELECT * FROM previews WHERE job=? AND step=?", (job_id, step))
        return dict(row) if row else None

    def cancel_requested(self, job_id: str) -> bool:
        row = self._one("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(row is None or row[0])

    def _cancel_statements(self, job_id: str) -> list[tuple[str, tuple]]:
        now = time.time()
        err = json.dumps({"code": "cancelled", "message": "cancelled by request"})
        return [
            ("UPDATE jobs SET cancel_requested=1, version=version+1 WHERE id=? AND status IN ('queued','running')",
             (job_id,)),
            ("UPDATE jobs SET status='cancelled', phase='cancelled', finished_at=?, error=? "
             "WHERE id=? AND status='queued'", (now, err, job_id)),
            ("UPDATE actions SET status='cancelled', error=? WHERE job=? AND status='pending' AND "
             "(SELECT status FROM jobs WHERE id=?)='cancelled'", (err, job_id, job_id)),
        ]

    def cancel_job(self, job_id: str) -> tuple[dict | None, bool]:
        """Cancel: a queued job ends now; a running one is flagged and stops at its next step.

        Returns (job, changed): changed is False for a job that had already finished.
        """
        with self._lock:
            job = self.get_job(job_id)
            if job is None or job["status"] in TERMINAL:
                return job, False
            self._tx(self._cancel_statements(job_id))
            return self.get_job(job_id), True


def _crash_loop_error(max_restarts: int) -> str:
    return json.dumps({"code": "crash_loop", "message": (
        f"this job was running each of the {max_restarts + 1} times its worker stopped unexpectedly (a crash "
        f"or a kill of the service or of a cluster worker); after {max_restarts} retries it is not run again. "
        "Check the server log, then submit it again, perhaps with a smaller input or fewer steps.")})


def _loads(value: str | None) -> Any:
    return json.loads(value) if value else None


def _file(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "kind": row["kind"], "size": row["size"], "filename": row["filename"],
            "meta": json.loads(row["meta"]), "path": row["path"], "created_at": row["created_at"]}


def _action(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["meta"] = json.loads(d["meta"])
    d["error"] = _loads(d["error"])
    del d["request_key"]
    return d


def _job(row: sqlite3.Row) -> dict:
    d = dict(row)
    for key in ("error", "result", "params"):
        d[key] = _loads(d[key])
    d["cancel_requested"] = bool(d["cancel_requested"])
    d["finish_requested"] = bool(d["finish_requested"])
    return d
