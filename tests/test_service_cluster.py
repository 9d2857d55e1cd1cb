"""Studio mode on a real two-node Ray cluster (loopback): workers as actors, a killed actor, a node that leaves,
the head lost and back, and a cluster without token authentication refused.

Ray's GCS reconnect timeout is shortened to GCS_TIMEOUT_S for these clusters (RAY_gcs_rpc_server_reconnect_
timeout_s, default 60 s), so that "the head stays down longer than Ray waits for it" takes seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexiact_backend.service.actor import SCRATCH_PREFIX
from flexiact_backend.service.process import LocalRayCluster
from service_helpers import (Client, ServerProcess, assert_monotonic, clip_bytes, png_bytes, upload, wait_job,
                             STATE_WAIT_S, wait_until, wait_workers, workers)

pytestmark = pytest.mark.cluster

CHECKPOINT_EVERY = 5
EXTRACT_STEPS = 150
PREVIEW_EVERY = 75
#: Ray's GCS reconnect timeout in these tests (its default is 60 s).
GCS_TIMEOUT_S = 8
RAY_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": str(GCS_TIMEOUT_S)}
#: The issue's bound for /v1/health to report a lost head.
DEGRADED_WITHIN_S = 10.0


def test_a_cluster_without_token_auth_is_refused_unless_allowed(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="studio mode needs the [cluster] extra (make setup installs it)")
    with LocalRayCluster(auth=False, ray_env=RAY_ENV) as open_cluster:
        open_cluster.add_node()
        run = subprocess.run([sys.executable, "-m", "flexiact_backend", "serve", "--tiny", "--data-dir",
                              str(tmp_path / "refused"), "--ray", open_cluster.address, "--ray-workers", "1"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, **open_cluster.env})
        assert run.returncode != 0, run.stderr
        assert "does not require token authentication" in run.stderr and "RAY_AUTH_MODE=token" in run.stderr, run.stderr
        assert "--ray-allow-no-auth" in run.stderr and not (tmp_path / "refused" / "state.sqlite3").exists()
        allowed = ServerProcess(tmp_path / "allowed", env=open_cluster.env, extra_args=(
            "--ray", open_cluster.address, "--ray-workers", "1", "--ray-allow-no-auth"))
        try:  # connected is enough: the model's loading on an actor is what the other tests wait for
            allowed.start(loaded=False)
            health = wait_until(allowed.health, lambda h: h and h["cluster"]["status"] == "ok", "connected")
            assert health["cluster"]["auth"] == "open", health
            assert "does not require token authentication" in health["cluster"]["warning"], health
            assert "does not require token authentication" in allowed.log_path.read_text()
        finally:
            allowed.stop()


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="studio mode needs the [cluster] extra (make setup installs it)")
    with LocalRayCluster(ray_env=RAY_ENV) as c:
        c.add_node()
        c.add_node()
        yield c


@pytest.fixture(scope="module")
def server(cluster: LocalRayCluster, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tmp_path_factory.mktemp("studio"), env=cluster.env, extra_args=(
            "--ray", cluster.address, "--ray-workers", "2", "--checkpoint-every", str(CHECKPOINT_EVERY))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    return Client(server.url)


@pytest.mark.parametrize("args, message", [
    (("--ray-workers", "2"), "--ray-workers needs --ray ADDRESS"),
    (("--ray", "127.0.0.2:1", "--device", "cpu"), "--device chooses local devices"),
    (("--ray", "127.0.0.2:1", "--ray-workers", "0"), "--ray-workers must be at least 1, not 0"),
])
def test_studio_flags_that_cannot_work_are_refused_before_anything_starts(
        args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "flexiact_backend", "serve", "--tiny", "--data-dir",
                          str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr
    assert not (tmp_path / "state.sqlite3").exists()


def test_more_gpus_per_job_than_any_node_holds_are_refused(client: Client) -> None:
    """A job's GPUs share one node; each node here holds one worker: `gpus: 2` is a 422 naming the limit."""
    wait_workers(client, lambda ws: len(ws) == 2 and all(w["state"] == "idle" for w in ws), "both idle")
    image = upload(client, png_bytes(9, (80, 60)), "image/png", "target-gpus.png")
    status, body = client.request("POST", "/v1/generations",
                                  json_body={"image": image["id"], "prompt": "p", "gpus": 2})
    assert status == 422 and body["error"]["code"] == "too_many_gpus", body  # type: ignore[index]
    assert "largest node of the Ray cluster has 1" in body["error"]["message"], body  # type: ignore[index]
    assert client.request("GET", "/v1/jobs")[1]["jobs"] == []  # type: ignore[index]  (nothing queued)


def test_two_actors_then_kill_minus_9_mid_extraction_resumes_from_checkpoint(
        client: Client, server: ServerProcess, tmp_path: Path) -> None:
    ws = wait_workers(client, lambda ws: [w["state"] for w in ws] == ["idle", "idle"], "both idle")
    assert len({w["node"] for w in ws}) == 2, ws  # one actor per node (SPREAD, one CPU each)
    assert server.proc.pid not in {w["pid"] for w in ws}  # the workers are other processes
    clip = upload(client, clip_bytes(tmp_path / "clip.mp4"), "video/mp4", "clip.mp4")
    image = upload(client, png_bytes(3, (80, 60)), "image/png", "target.png")
    status, body = client.request("POST", "/v1/actions", json_body={
        "name": "slide", "caption": "a square slides", "video": clip["id"], "start_s": 0, "end_s": 2,
        "steps": EXTRACT_STEPS, "preview_every": PREVIEW_EVERY})
    assert status == 202, body
    action, extraction = body["action"], body["job"]
    history: list[dict] = []
    wait_job(client, extraction["id"], ("running",), min_step=1, history=history)

    # a generation runs beside the extraction, on the other actor: the extraction does not pause for it
    status, body = client.request("POST", "/v1/generations",
                                  json_body={"image": image["id"], "prompt": "p", "steps": 20})
    generation = body["job"]
    both = wait_workers(client, lambda ws: {w["job"] for w in ws} == {extraction["id"], generation["id"]},
                        "busy with both jobs at once")
    assert [w["state"] for w in both] == ["busy", "busy"]
    done = wait_job(client, generation["id"])
    assert done["status"] == "succeeded", done
    ext = client.request("GET", f"/v1/jobs/{extraction['id']}")[1]
    assert done["worker"] != ext["worker"] and ext["status"] == "running", (done, ext)

    # kill -9 the actor process running the extraction once a checkpoint has reached the service
    checkpoint = server.data_dir / "work" / action["id"] / "train" / "checkpoint.pt"
    before = wait_job(client, extraction["id"], ("running",), min_step=2 * CHECKPOINT_EVERY + 1, history=history)
    assert before["step"] < EXTRACT_STEPS and checkpoint.is_file()
    victim = next(w for w in workers(client) if w["job"] == extraction["id"])
    os.kill(victim["pid"], signal.SIGKILL)

    final = wait_job(client, extraction["id"], history=history)
    assert final["status"] == "succeeded", final
    assert_monotonic(history)
    resumed_from = final["result"]["resumed_from"]
    assert resumed_from >= 2 * CHECKPOINT_EVERY and resumed_from % CHECKPOINT_EVERY == 0, final["result"]
    action = client.request("GET", f"/v1/actions/{action['id']}")[1]
    assert action["status"] == "ready" and action["meta"]["steps"] == EXTRACT_STEPS
    status, raw = client.request("GET", f"/v1/actions/{action['id']}/file")
    assert status == 200 and hashlib.sha256(raw).hexdigest() == action["file"]
    # the previews rendered in the actors came back with the work files, one per preview step
    previews = client.request("GET", f"/v1/jobs/{extraction['id']}/previews")[1]
    assert [p["step"] for p in previews] == [75, 150], previews  # type: ignore[union-attr]
    # Ray restarts the killed actor: it comes back as a new process with the pipeline loaded again
    back = wait_workers(client, lambda ws: all(w["state"] == "idle" for w in ws)
                        and victim["pid"] not in {w["pid"] for w in ws}, "back after the kill")
    assert {w["id"] for w in back} == {"worker-0", "worker-1"}


def test_a_node_removed_while_idle_leaves_the_service_serving(client: Client, cluster: LocalRayCluster) -> None:
    ws = wait_workers(client, lambda ws: all(w["state"] == "idle" for w in ws), "idle")
    assert sorted(w["node"] for w in ws) == ["127.0.0.2", "127.0.0.3"], ws
    cluster.remove_node(cluster.nodes[1])  # the node at 127.0.0.3 leaves the cluster
    after = wait_workers(client, lambda ws: {w["node"]: w["state"] for w in ws} == {
        "127.0.0.2": "idle", "127.0.0.3": "dead"}, "dead on the removed node only")
    image = upload(client, png_bytes(4, (80, 60)), "image/png", "target2.png")
    for takes in (2, 1):  # two in a row: whichever worker claims one, both must finish
        status, body = client.request("POST", "/v1/generations",
                                      json_body={"image": image["id"], "prompt": "p", "steps": 2, "takes": takes})
        assert status == 202, body
        done = wait_job(client, body["job"]["id"])
        assert done["status"] == "succeeded", done
        assert len(done["result"]["takes"]) == takes  # every take came back from the actor
        assert client.request("GET", f"/v1/jobs/{done['id']}/video?take={takes - 1}")[0] == 200
    assert next(w for w in after if w["node"] == "127.0.0.2")["id"] == done["worker"]
    assert client.request("GET", "/v1/health")[1]["status"] == "ok"


def test_one_actor_left_extraction_yields_to_a_generation_and_cancel_reaches_it(
        client: Client, tmp_path: Path) -> None:
    """With no actor free, the extraction pauses at a checkpoint for the generation; cancel stops it on the actor."""
    wait_workers(client, lambda ws: sorted(w["state"] for w in ws) == ["dead", "idle"], "one idle")
    clip = upload(client, clip_bytes(tmp_path / "clip.mp4", seconds=2.5), "video/mp4", "clip2.mp4")
    image = upload(client, png_bytes(5, (80, 60)), "image/png", "target3.png")
    status, body = client.request("POST", "/v1/actions", json_body={
        "name": "long", "caption": "a square slides", "video": clip["id"], "start_s": 0, "end_s": 2.5,
        "steps": 5000})
    extraction = body["job"]
    wait_job(client, extraction["id"], ("running",), min_step=3)
    status, body = client.request("POST", "/v1/generations",
                                  json_body={"image": image["id"], "prompt": "p", "steps": 2})
    assert wait_job(client, body["job"]["id"])["status"] == "succeeded"
    ext = client.request("GET", f"/v1/jobs/{extraction['id']}")[1]
    assert ext["status"] in ("queued", "running") and 0 < ext["step"] < 5000, ext  # paused, then resumed
    assert client.request("POST", f"/v1/jobs/{extraction['id']}/cancel")[0] == 200
    final = wait_job(client, extraction["id"])
    assert final["status"] == "cancelled" and final["step"] < 5000, final
    wait_workers(client, lambda ws: sorted(w["state"] for w in ws) == ["dead", "idle"], "idle again")


def wait_health(client: Client, ok, what: str, limit_s: float = STATE_WAIT_S) -> dict:
    """Poll /v1/health until `ok(health)` holds."""
    return wait_until(lambda: client.request("GET", "/v1/health")[1], ok, what, limit_s)


def test_the_head_lost_longer_than_rays_timeout_then_back_resumes_every_job(
        client: Client, server: ServerProcess, cluster: LocalRayCluster, tmp_path: Path) -> None:
    """The service outlives its Ray head: degraded while it is gone, jobs kept, reconnected and resumed after."""
    wait_workers(client, lambda ws: any(w["state"] == "idle" for w in ws), "one idle")
    clip = upload(client, clip_bytes(tmp_path / "clip.mp4"), "video/mp4", "clip4.mp4")
    image = upload(client, png_bytes(6, (80, 60)), "image/png", "target4.png")
    status, body = client.request("POST", "/v1/actions", json_body={
        "name": "outage", "caption": "a square slides", "video": clip["id"], "start_s": 0, "end_s": 2,
        "steps": 60})
    assert status == 202 and body["note"] is None, body
    extraction = body["job"]
    wait_job(client, extraction["id"], ("running",), min_step=2 * CHECKPOINT_EVERY + 1)

    cluster.kill_node(cluster.nodes[0])  # the head's whole process group, SIGKILL: its machine went away
    lost = time.monotonic()
    health = wait_health(client, lambda h: h["status"] == "degraded", "degraded", limit_s=DEGRADED_WITHIN_S)
    print(f"health said degraded {time.monotonic() - lost:.1f} s after the head was killed")
    assert "Ray head" in health["cluster"]["reason"] or "driver" in health["cluster"]["reason"], health
    queued = wait_job(client, extraction["id"], ("queued",))
    assert queued["step"] >= 2 * CHECKPOINT_EVERY, queued
    status, body = client.request("POST", "/v1/generations",
                                  json_body={"image": image["id"], "prompt": "p", "steps": 2})
    assert status == 202 and "unreachable" in body["note"], body  # accepted, with a note: it waits
    generation = body["job"]

    time.sleep(max(0.0, lost + GCS_TIMEOUT_S + 4 - time.monotonic()))  # past the time Ray waits for a head
    assert server.proc.poll() is None, server.log_tail()
    health = client.request("GET", "/v1/health")[1]
    assert health["status"] == "degraded" and health["queue"]["queued"] == 2, health

    cluster.restart()  # the same address, the same token
    final = wait_job(client, extraction["id"])
    assert final["status"] == "succeeded", final
    resumed_from = final["result"]["resumed_from"]
    assert resumed_from >= 2 * CHECKPOINT_EVERY and resumed_from % CHECKPOINT_EVERY == 0, final["result"]
    done = wait_job(client, generation["id"])
    assert done["status"] == "succeeded", done
    health = wait_health(client, lambda h: h["status"] == "ok" and all(w["state"] == "idle" for w in h["workers"]),
                         "ok with every worker idle")
    assert health["cluster"]["reconnects"] >= 1 and health["cluster"]["auth"] == "token", health
    # the workers were placed anew: one on each node again
    assert sorted(w["node"] for w in health["workers"]) == ["127.0.0.2", "127.0.0.3"], health["workers"]
    log = server.log_path.read_text()
    assert "reconnected to the Ray cluster" in log and "next try in" in log


def test_no_actor_scratch_folder_is_left_behind(server: ServerProcess, cluster: LocalRayCluster) -> None:
    """Killed actors' folders were removed by the actors after them; the last ones go when the service stops."""
    live = {w["pid"] for w in server.health()["workers"]}
    folders = list(cluster.tmp_dir.glob(f"{SCRATCH_PREFIX}*"))  # several actors were killed before: none of theirs
    assert len(live) == 2 and {int(f.name.removeprefix(SCRATCH_PREFIX).split("-")[0]) for f in folders} == live, (
        folders, live)
    server.stop()
    assert "Application shutdown complete" in server.log_path.read_text(), server.log_tail()
    deadline = time.monotonic() + 30
    while list(cluster.tmp_dir.glob(f"{SCRATCH_PREFIX}*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(cluster.tmp_dir.glob(f"{SCRATCH_PREFIX}*"))
