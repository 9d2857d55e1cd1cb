"""Garbage collection and retention on a real data dir: only what nothing needs goes, in a dry run nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service_helpers import Client, ServerProcess, clip_bytes, png_bytes, upload, wait_job

DAY = 86400.0


def _gc(data_dir: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "flexiact_backend", "gc", "--data-dir", str(data_dir), "--json", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _age(data_dir: Path, sql: str, args: tuple) -> None:
    with sqlite3.connect(data_dir / "state.sqlite3") as db:
        db.execute(sql, args)


def _old(path: Path, days: float) -> Path:
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def test_gc_frees_only_what_nothing_needs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess(data_dir) as server:
        client = Client(server.url)
        clip = upload(client, clip_bytes(tmp_path / "clip.mp4"), "video/mp4", "clip.mp4")
        status, body = client.request("POST", "/v1/actions", json_body={
            "name": "a", "caption": "c", "video": clip["id"], "start_s": 0, "end_s": 2, "steps": 2})
        assert wait_job(client, body["job"]["id"])["status"] == "succeeded"
        action = client.request("GET", f"/v1/actions/{body['action']['id']}")[1]
        image_old, image_recent, unused_old, unused_new = (
            upload(client, png_bytes(40 + i), "image/png", f"{i}.png") for i in range(4))
        jobs = {}
        for name, image in (("old", image_old), ("recent", image_recent)):
            status, body = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p",
                                                                                 "steps": 1, "action": action["id"]})
            jobs[name] = wait_job(client, body["job"]["id"])
        queued_image = upload(client, png_bytes(50), "image/png", "q.png")

        # age everything but the recent job and the new upload by 40 days (default retention: 30)
        for table, col in (("files", "created_at"), ("actions", "created_at")):
            _age(data_dir, f"UPDATE {table} SET {col}={col}-? WHERE id NOT IN (?, ?)",
                 (40 * DAY, unused_new["id"], queued_image["id"]))
        _age(data_dir, "UPDATE jobs SET finished_at=finished_at-? WHERE id!=?", (40 * DAY, jobs["recent"]["id"]))
        # a queued job (never run: inserted as the API would) names an old upload: it must stay
        _age(data_dir, "UPDATE files SET created_at=created_at-? WHERE id=?", (40 * DAY, queued_image["id"]))
        _age(data_dir, "INSERT INTO jobs(id,kind,status,phase,total_steps,created_at,params) "
             "VALUES('f'||hex(randomblob(15)),'generate','queued','queued',1,?,?)",
             (time.time(), json.dumps({"image": queued_image["id"]})))
        for p in (data_dir / "files").rglob("*"):
            if p.is_file():
                _old(p, 40)
        (data_dir / "files" / "ab").mkdir(exist_ok=True)
        orphan_old = data_dir / "files" / "ab" / ("ab" + "1" * 62 + ".mp4")  # bytes no record names
        orphan_old.write_bytes(b"x" * 1000)
        _old(orphan_old, 2)
        orphan_new = data_dir / "files" / "ab" / ("ab" + "2" * 62 + ".png")  # within the grace period
        orphan_new.write_bytes(b"y" * 10)
        stale_tmp = data_dir / "tmp" / "crashed-upload.mp4"
        stale_tmp.write_bytes(b"z" * 500)
        _old(stale_tmp, 2)
        stale_work = data_dir / "work" / ("d" * 32)  # an extraction whose action was deleted
        (stale_work / "train").mkdir(parents=True)
        (stale_work / "train" / "checkpoint-1.pt").write_bytes(b"c" * 300)
        _old(stale_work, 2)

        def stored(file_id: str) -> Path:
            return next((data_dir / "files" / file_id[:2]).glob(file_id + "*"))

        must_stay = [stored(f) for f in (clip["id"], action["file"], image_recent["id"], unused_new["id"],
                                         queued_image["id"], jobs["recent"]["result"]["video"])] + [orphan_new]
        must_go = [stored(f) for f in (image_old["id"], unused_old["id"], jobs["old"]["result"]["video"])] + [
            orphan_old, stale_tmp, stale_work]

        dry = _gc(data_dir, "--dry-run")
        assert all(p.exists() for p in must_stay + must_go)  # a dry run only reports
        assert dry["jobs"] == [jobs["old"]["id"]]
        done = _gc(data_dir)
        assert done == dry
        assert [p.name for p in must_go if p.exists()] == []
        assert [p.name for p in must_stay if not p.exists()] == []
        assert done["freed_bytes"] >= 1000 + 500 + 300

        # the server serves on: what stayed is whole, what went is a clear 404
        assert client.request("GET", f"/v1/jobs/{jobs['recent']['id']}/video")[0] == 200
        assert client.request("GET", f"/v1/actions/{action['id']}/file")[0] == 200
        assert client.request("GET", f"/v1/jobs/{jobs['old']['id']}")[0] == 404
        assert client.request("HEAD", f"/v1/files/{unused_old['id']}")[0] == 404
        assert _gc(data_dir)["freed_bytes"] == 0  # nothing left to collect


def test_size_cap_removes_oldest_unneeded_first(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess(data_dir) as server:
        client = Client(server.url)
        images = [upload(client, png_bytes(60 + i, (200, 200)), "image/png", f"{i}.png") for i in range(4)]
        for i, image in enumerate(images):  # oldest first: 0
            _age(data_dir, "UPDATE files SET created_at=? WHERE id=?", (time.time() - (10 - i) * DAY, image["id"]))
    for p in (data_dir / "files").rglob("*"):
        if p.is_file():
            _old(p, 1)
    size = _gc(data_dir, "--dry-run", "--keep-results-days", "0")["data_bytes_before"]
    one = len(png_bytes(60, (200, 200)))
    report = _gc(data_dir, "--keep-results-days", "0", "--max-data-bytes", str(size - int(1.5 * one)))
    assert report["file_records"] == [images[0]["id"], images[1]["id"]]
