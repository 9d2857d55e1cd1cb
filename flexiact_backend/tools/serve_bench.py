"""Concurrency benchmark of the service: many clients poll a running job and upload images at once.

Why: an animator's add-on polls every second while others upload; the HTTP side must stay quick while
the worker computes. The p95 poll latency is reported here, never asserted in a test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
import io
import json
import math
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from ..service.process import ServerProcess

TERMINAL = ("succeeded", "failed", "cancelled")


class Client:
    """A tiny JSON-over-HTTP client on the standard library (the package ships no HTTP client dependency)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url, self.token = url.rstrip("/"), token

    def request(self, method: str, path: str, *, json_body: dict | None = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, object]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
        return status, (json.loads(raw) if ctype.startswith("application/json") and raw else raw)

    def upload(self, data: bytes, content_type: str, filename: str, *, retries: int = 0) -> tuple[int, object]:
        """POST /v1/files; with `retries`, a 429/503 (too many uploads at once) is sent again after a short wait."""
        headers = {"Content-Type": content_type, "X-Filename": filename}
        status, body = self.request("POST", "/v1/files", data=data, headers=headers)
        for attempt in range(retries):
            if status not in (429, 503):
                break
            time.sleep(0.2 * (attempt + 1))
            status, body = self.request("POST", "/v1/files", data=data, headers=headers)
        return status, body


def png_bytes(seed: int, size: tuple[int, int] = (48, 32)) -> bytes:
    """A small random PNG, different for every seed (so every upload is new content)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    s = sorted(values)
    pick = lambda q: round(s[max(0, math.ceil(q * len(s)) - 1)] * 1000, 2)  # noqa: E731
    return {"n": len(s), "p50": pick(0.5), "p95": pick(0.95), "max": round(s[-1] * 1000, 2)}


def run_load(client: Client, current_job: Callable[[], str], *, clients: int = 20, rounds: int = 50,
             upload_every: int = 5) -> dict:
    """`clients` threads each poll `current_job()` `rounds` times and upload a fresh image every few polls."""
    lock = threading.Lock()
    polls: list[float] = []
    uploads: list[float] = []
    errors: list[str] = []
    statuses: dict[str, int] = {}

    def one_client(c: int) -> None:
        for r in range(rounds):
            job_id = current_job()
            t0 = time.perf_counter()
            try:
                status, body = client.request("GET", f"/v1/jobs/{job_id}")
                ok = status == 200 and isinstance(body, dict) and body.get("id") == job_id
                err = None if ok else f"poll: {status} {str(body)[:200]}"
            except Exception as exc:  # a refused or reset connection is exactly what this counts
                body, err = None, f"poll: {type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            with lock:
                polls.append(dt)
                if err:
                    errors.append(err)
                elif isinstance(body, dict):
                    statuses[body["status"]] = statuses.get(body["status"], 0) + 1
            if upload_every and r % upload_every == 0:
                data = png_bytes(c * 100_003 + r + int(time.time_ns() % 1_000_000_007))
                t0 = time.perf_counter()
                try:
                    status, body = client.upload(data, "image/png", f"bench-{c}-{r}.png", retries=20)
                    ok = status == 201 and isinstance(body, dict) and body.get("id") == hashlib.sha256(data).hexdigest()
                    err = None if ok else f"upload: {status} {str(body)[:200]}"
                except Exception as exc:
                    err = f"upload: {type(exc).__name__}: {exc}"
                with lock:
                    uploads.append(time.perf_counter() - t0)
                    if err:
                        errors.append(err)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "rounds": rounds, "seconds": round(time.perf_counter() - started, 3),
            "poll_ms": _percentiles(polls), "upload_ms": _percentiles(uploads), "errors": len(errors),
            "error_samples": errors[:5], "job_status_seen": statuses}


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def queue_memory(client: Client, pid: int | None, *, queued: int = 200, pollers: int = 30, rounds: int = 20) -> dict:
    """Queue `queued` generations behind a running one, let `pollers` clients poll them and the job list;
    server RSS before and after.

    Why: a studio's queue grows and every add-on polls; the server's memory must not grow with either.
    """
    status, image = client.upload(png_bytes(int(time.time_ns() % 1_000_003)), "image/png", "queue.png")
    if status != 201:
        raise RuntimeError(f"upload failed: {status} {image}")
    s, r = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "b", "steps": 1000})
    if s != 202:
        raise RuntimeError(f"generation refused: {s} {r}")
    blocker = r["job"]["id"]  # keeps the worker on one warm job, so the queue stays queued while measured
    deadline = time.monotonic() + 600
    while client.request("GET", f"/v1/jobs/{blocker}")[1]["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    before = rss_mib(pid) if pid else None
    ids = []
    for _ in range(queued):
        s, r = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "q", "steps": 1})
        if s != 202:
            raise RuntimeError(f"generation refused: {s} {r}")
        ids.append(r["job"]["id"])
    after_queue = rss_mib(pid) if pid else None
    errors: list[str] = []

    def poll(c: int) -> None:
        for r in range(rounds):
            path = "/v1/jobs?limit=200" if r % 5 == 0 else f"/v1/jobs/{ids[(c * rounds + r) % len(ids)]}"
            s, body = client.request("GET", path)
            if s != 200:
                errors.append(f"{path}: {s}")

    threads = [threading.Thread(target=poll, args=(c,)) for c in range(pollers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after_polls = rss_mib(pid) if pid else None
    for job_id in [*ids, blocker]:
        client.request("POST", f"/v1/jobs/{job_id}/cancel")
    return {"queued": queued, "pollers": pollers, "polls": pollers * rounds, "errors": len(errors),
            "rss_mib": {"before": before, "after_queue": after_queue, "after_polls": after_polls,
                        "growth": round(after_polls - before, 1) if pid else None}}


def bench_serve(*, url: str | None = None, token: str | None = None, clients: int = 20, rounds: int = 50,
                upload_every: int = 5, queued: int = 200, pollers: int = 30) -> dict:
    """Run the load against `url`, or against a tiny server started for the purpose (then RSS is measured too)."""
    if url is not None:
        client = Client(url, token)
        report = _bench(client, clients, rounds, upload_every)
        report["queue"] = queue_memory(client, None, queued=queued, pollers=pollers)
        return report
    with tempfile.TemporaryDirectory(prefix="flexiact-bench-") as d, ServerProcess(Path(d)) as server:
        client = Client(server.url)
        report = _bench(client, clients, rounds, upload_every)
        report["queue"] = queue_memory(client, server.proc.pid, queued=queued, pollers=pollers)
        return report


def _bench(client: Client, clients: int, rounds: int, upload_every: int) -> dict:
    """Keep a generation running (a new one whenever the last ends) while the clients hammer the server."""
    status, health = client.request("GET", "/v1/health")
    if status != 200:
        raise RuntimeError(f"health check failed: {status} {health}")
    status, image = client.upload(png_bytes(0), "image/png", "bench-target.png")
    if status != 201:
        raise RuntimeError(f"upload failed: {status} {image}")
    body = {"image": image["id"], "prompt": "a figure waves", "steps": 50}
    job = {"id": None}
    done = threading.Event()

    def submit() -> None:
        s, r = client.request("POST", "/v1/generations", json_body=body)
        if s != 202:
            raise RuntimeError(f"generation refused: {s} {r}")
        job["id"] = r["job"]["id"]

    def feeder() -> None:
        while not done.wait(0.5):
            s, r = client.request("GET", f"/v1/jobs/{job['id']}")
            if s == 200 and r["status"] in TERMINAL:
                submit()

    submit()
    feed = threading.Thread(target=feeder, daemon=True)
    feed.start()
    try:
        report = run_load(client, lambda: job["id"], clients=clients, rounds=rounds, upload_every=upload_every)
    finally:
        done.set()
        feed.join()
        client.request("POST", f"/v1/jobs/{job['id']}/cancel")
    report["device"] = health["device"]
    report["model"] = health["model"]["id"]
    return report


def format_table(report: dict) -> str:
    rows = [("polls", report["poll_ms"]), ("uploads", report["upload_ms"])]
    lines = [f"{'request':<10}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"]
    for name, p in rows:
        lines.append(f"{name:<10}{p['n']:>7}{p['p50'] or 0:>10.1f}{p['p95'] or 0:>10.1f}{p['max'] or 0:>10.1f}")
    lines.append(f"errors: {report['errors']}   clients: {report['clients']}   wall: {report['seconds']} s")
    if "queue" in report:
        q, m = report["queue"], report["queue"]["rss_mib"]
        lines.append(f"{q['queued']} queued jobs, {q['pollers']} pollers ({q['polls']} polls, {q['errors']} errors): "
                     f"server RSS {m['before']} -> {m['after_queue']} -> {m['after_polls']} MiB "
                     f"(growth {m['growth']} MiB)")
    return "\n".join(lines)


def bench_cluster(*, address: str | None = None, workers: int = 2, jobs: int = 8, steps: int = 4) -> dict:
    """Studio mode's throughput: a queue of `jobs` tiny generations drained by 1 worker, then by `workers`.

    Each variant is a fresh tiny server on the same Ray cluster (`address`, or a one-node local cluster with
    `workers` CPUs started here), its actors loaded before the clock starts; the clock runs from the first
    submission to the last job's end.
    """
    from ..service.process import LocalRayCluster

    cluster = None
    if address is None:
        cluster = LocalRayCluster()
        cluster.add_node(num_cpus=workers)
        address = cluster.address
    try:
        env = cluster.env if cluster is not None else None
        rows = [_drain_queue(address, n, jobs, steps, env) for n in sorted({1, workers})]
    finally:
        if cluster is not None:
            cluster.stop()
    base = rows[0]["jobs_per_min"]
    for row in rows:
        row["speedup"] = round(row["jobs_per_min"] / base, 2) if base else None
    return {"bench": "serve --ray", "jobs": jobs, "steps": steps, "address": address, "results": rows}


def _drain_queue(address: str, workers: int, jobs: int, steps: int, env: dict[str, str] | None) -> dict:
    extra = ("--ray", address, "--ray-workers", str(workers))
    with tempfile.TemporaryDirectory(prefix="flexiact-bench-") as d, \
            ServerProcess(Path(d), extra_args=extra, env=env) as s:
        client = Client(s.url)
        deadline = time.monotonic() + 600
        while sum(w["state"] == "idle" for w in client.request("GET", "/v1/health")[1]["workers"]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} Ray workers not ready after 600 s; see {s.log_path}")
            time.sleep(0.2)
        status, image = client.upload(png_bytes(0), "image/png", "bench-target.png")
        if status != 201:
            raise RuntimeError(f"upload failed: {status} {image}")
        started = time.perf_counter()
        ids = []
        for i in range(jobs):
            status, r = client.request("POST", "/v1/generations",
                                       json_body={"image": image["id"], "prompt": "a figure waves", "steps": steps,
                                                  "seed": i})
            if status != 202:
                raise RuntimeError(f"generation refused: {status} {r}")
            ids.append(r["job"]["id"])
        finished: dict[str, dict] = {}
        while len(finished) < jobs:
            if time.perf_counter() - started > 1800:
                raise RuntimeError(f"the queue was not drained after 1800 s; see {s.log_path}")
            for job_id in ids:
                if job_id not in finished:
                    status, j = client.request("GET", f"/v1/jobs/{job_id}")
                    if status == 200 and j["status"] in TERMINAL:
                        finished[job_id] = j
            time.sleep(0.1)
        wall = time.perf_counter() - started
        failed = [j["error"] for j in finished.values() if j["status"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0]}")
        return {"workers": workers, "wall_s": round(wall, 2), "jobs_per_min": round(jobs / wall * 60, 2),
                "workers_used": len({j["worker"] for j in finished.values()})}


def format_cluster_table(report: dict) -> str:
    lines = [f"{report['jobs']} generations of {report['steps']} steps on the Ray cluster at {report['address']}",
             f"{'workers':>8}{'used':>6}{'wall s':>10}{'jobs/min':>10}{'speedup':>9}"]
    for r in report["results"]:
        lines.append(f"{r['workers']:>8}{r['workers_used']:>6}{r['wall_s']:>10.2f}{r['jobs_per_min']:>10.2f}"
                     f"{r['speedup']:>9.2f}")
    return "\n".join(lines)
