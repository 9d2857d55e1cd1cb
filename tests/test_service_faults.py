"""kill -9 of the server mid-extraction and mid-generation: after a restart both complete, nothing is lost."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from service_helpers import (Client, ServerProcess, assert_monotonic, clip_bytes, decode_mp4, png_bytes, read_only,
                             small_disk, upload, wait_job)

EXTRACT_STEPS = 60
GENERATE_STEPS = 40


def test_kill_minus_9_mid_extraction_and_mid_generation(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, extra_args=("--checkpoint-every", "5")).start()
    try:
        client = Client(server.url)
        clip = upload(client, clip_bytes(tmp_path / "clip.mp4"), "video/mp4", "clip.mp4")
        image = upload(client, png_bytes(2, (80, 60)), "image/png", "target.png")
        # a finished generation before any crash: it must survive both crashes intact
        status, body = client.request("POST", "/v1/generations",
                                      json_body={"image": image["id"], "prompt": "p", "steps": 2, "fps": 24})
        first = wait_job(client, body["job"]["id"])
        assert first["status"] == "succeeded"

        status, body = client.request("POST", "/v1/actions", json_body={
            "name": "slide", "caption": "a square slides", "video": clip["id"], "start_s": 0, "end_s": 2,
            "steps": EXTRACT_STEPS})
        assert status == 202
        action, extraction = body["action"], body["job"]
        history: list[dict] = []
        before = wait_job(client, extraction["id"], ("running",), min_step=12, history=history)
        assert before["step"] < EXTRACT_STEPS
        checkpoints = list((data_dir / "work" / action["id"]).rglob("*"))
        server.kill()
        assert any(p.is_file() and "checkpoint" in p.name for p in checkpoints), checkpoints

        server = ServerProcess(data_dir, port=server.port, extra_args=("--checkpoint-every", "5")).start()
        client = Client(server.url)
        done = wait_job(client, extraction["id"], history=history)
        assert done["status"] == "succeeded", done
        assert_monotonic(history)  # across the crash too
        action = client.request("GET", f"/v1/actions/{action['id']}")[1]
        assert action["status"] == "ready" and action["meta"]["steps"] == EXTRACT_STEPS
        status, raw = client.request("GET", f"/v1/actions/{action['id']}/file")
        assert status == 200 and hashlib.sha256(raw).hexdigest() == action["file"]

        status, body = client.request("POST", "/v1/generations", json_body={
            "image": image["id"], "action": action["id"], "prompt": "p", "steps": GENERATE_STEPS, "fps": 29.97})
        generation = body["job"]
        wait_job(client, generation["id"], ("running",), min_step=2)
        server.kill()

        server = ServerProcess(data_dir, port=server.port, extra_args=("--checkpoint-every", "5")).start()
        client = Client(server.url)
        done = wait_job(client, generation["id"])
        assert done["status"] == "succeeded", done
        status, mp4 = client.request("GET", f"/v1/jobs/{generation['id']}/video")
        assert status == 200
        (tmp_path / "out.mp4").write_bytes(mp4)
        health = client.request("GET", "/v1/health")[1]
        m = health["model"]
        assert decode_mp4(tmp_path / "out.mp4")[0] == round(m["frames"] / m["fps"] * 29.97)
        assert health["queue"] == {"queued": 0, "running": 0}  # nothing left running forever

        # nothing lost: uploads, the earlier video and the action are all still served, byte for byte
        for f in (clip, image):
            assert client.request("HEAD", f"/v1/files/{f['id']}")[0] == 200
        status, old = client.request("GET", f"/v1/jobs/{first['id']}/video")
        assert status == 200 and hashlib.sha256(old).hexdigest() == first["result"]["video"]
        assert client.request("GET", f"/v1/actions/{action['id']}")[1]["file"] == action["file"]
    finally:
        server.stop()


def _integrity(data_dir: Path) -> str:
    with sqlite3.connect(data_dir / "state.sqlite3") as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def test_a_job_that_kills_the_service_every_time_ends_failed(tmp_path: Path) -> None:
    """Retried --max-job-restarts times, then failed with a message; the database is sound after every kill -9."""
    data_dir, args = tmp_path / "data", ("--max-job-restarts", "2")
    server = ServerProcess(data_dir, extra_args=args).start()
    try:
        client = Client(server.url)
        image = upload(client, png_bytes(9, (80, 60)), "image/png", "target.png")
        status, body = client.request("POST", "/v1/generations",
                                      json_body={"image": image["id"], "prompt": "p", "steps": 1000})
        job_id = body["job"]["id"]
        for _ in range(3):  # the job "kills" the process each time it runs: two retries, then it must stop
            wait_job(client, job_id, ("running",), min_step=1)
            server.kill()
            assert _integrity(data_dir) == "ok"
            server = ServerProcess(data_dir, port=server.port, extra_args=args).start()
            client = Client(server.url)
        job = client.request("GET", f"/v1/jobs/{job_id}")[1]
        assert job["status"] == "failed" and job["error"]["code"] == "crash_loop", job
        assert "3 times" in job["error"]["message"] and "2 retries" in job["error"]["message"]
        assert client.request("GET", "/v1/health")[1]["queue"] == {"queued": 0, "running": 0}
    finally:
        server.stop()
    assert _integrity(data_dir) == "ok"


def test_read_only_data_dir_is_a_clear_start_up_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "ro"
    data_dir.mkdir()
    with read_only(data_dir):
        cmd = [sys.executable, "-m", "flexiact_backend", "serve", "--tiny", "--data-dir", str(data_dir),
               "--port", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "cannot write to the data dir" in run.stderr and "Traceback" not in run.stderr, run.stderr


def _fill(path: Path, leave: int) -> Path:
    """A filler file that takes all free space on `path`'s disk but about `leave` bytes.

    A disk that the running job has already filled cannot even create it: then it is full already, as wanted.
    """
    filler = path / "filler"
    try:
        f = open(filler, "wb", buffering=0)  # unbuffered: closing must not flush a write the full disk refused
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        return filler
    with f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _partial_files(data_dir: Path) -> list[str]:
    """Files in the temp dir, and stored files whose bytes do not hash to their name."""
    bad = [p.name for p in (data_dir / "tmp").rglob("*") if p.is_file()]
    for p in (data_dir / "files").rglob("*"):
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() != p.name.split(".")[0]:
            bad.append(p.name)
    return bad


def test_disk_full_mid_upload_and_mid_result_write(tmp_path: Path) -> None:
    """On a 24 MB tmpfs: each failure is a clear error, no partial file stays, and the server serves on.

    The database's reserve (db.RESERVE_BYTES) is what lets the job's failure be recorded on the full disk.
    """
    with small_disk(tmp_path / "disk", "24m") as disk:
        server = ServerProcess(disk / "data", extra_args=("--min-free-mb", "0")).start()
        try:
            client = Client(server.url)
            image = upload(client, png_bytes(12, (80, 60)), "image/png", "target.png")
            free = shutil.disk_usage(disk).free

            def chunks():  # no Content-Length: the disk fills while the body streams in
                for _ in range(free // 65536 + 64):
                    yield os.urandom(65536)

            r = httpx.post(f"{server.url}/v1/files", content=chunks(), timeout=120,
                           headers={"Content-Type": "video/mp4", "X-Filename": "huge.mp4"})
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
            assert "disk is full" in r.json()["error"]["message"]
            status, body = client.upload(b"\0" * 10, "video/mp4", "x.mp4")  # declared size checked up front too
            assert _partial_files(server.data_dir) == []

            status, body = client.request("POST", "/v1/generations", json_body={
                "image": image["id"], "prompt": "p", "steps": 30, "fps": 240})
            assert status == 202, body
            wait_job(client, body["job"]["id"], ("running",), min_step=1)
            filler = _fill(disk, leave=16 * 1024)  # less than the result needs
            job = wait_job(client, body["job"]["id"])
            assert job["status"] == "failed" and job["error"]["code"] == "insufficient_storage", job
            assert "disk is full" in job["error"]["message"] and str(disk) not in job["error"]["message"]
            assert _partial_files(server.data_dir) == []
            filler.unlink(missing_ok=True)

            assert client.request("GET", "/v1/health")[1]["disk"]["free_bytes"] > 1024**2  # it serves on
            upload(client, png_bytes(13), "image/png", "after.png")
            status, body = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p",
                                                                                 "steps": 1})
            assert wait_job(client, body["job"]["id"])["status"] == "succeeded"
        finally:
            server.stop()


def test_free_disk_floor_is_a_507_before_anything_is_written(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", extra_args=("--min-free-mb", str(10**9))).start()  # 1 PB floor
    try:
        client = Client(server.url)
        disk = client.request("GET", "/v1/health")[1]["disk"]
        assert disk["low"] is True and disk["min_free_bytes"] == 10**9 * 1024**2 and disk["data_bytes"] > 0
        status, body = client.upload(png_bytes(14), "image/png", "a.png")
        assert status == 507 and body["error"]["code"] == "insufficient_storage" and "free" in body["error"]["message"]
        status, body = client.request("POST", "/v1/generations", json_body={"image": "0" * 64, "prompt": "p"})
        assert status in (404, 507)  # the image is unknown; a known one would get the 507 below
        assert list((server.data_dir / "files").rglob("*.png")) == [] and _partial_files(server.data_dir) == []
    finally:
        server.stop()
