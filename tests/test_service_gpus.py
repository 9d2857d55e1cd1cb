"""`gpus: N` on the service's jobs, through a real server on loopback (local mode, CPU ranks over gloo here).

A `gpus: 2` extraction trains the same action as the one-GPU job (sequence mode: same math, shorter steps);
a rank killed mid-job loses the attempt and the job resumes from its checkpoint; more GPUs than the machine
runs one job on is refused with the limit named.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexiact_backend.parallel.launch import max_service_ranks
from service_helpers import (Client, ServerProcess, action_tensors, clip_bytes, extraction, frames, png_bytes, upload,
                             wait_job)

pytestmark = pytest.mark.slow
two_ranks = pytest.mark.skipif(max_service_ranks() < 2, reason="this machine runs one rank per job")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tmp_path_factory.mktemp("service-gpus"), extra_args=("--checkpoint-every", "2")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    return Client(server.url)


@pytest.fixture(scope="module")
def clip(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return upload(client, clip_bytes(tmp_path_factory.mktemp("clip") / "clip.mp4"), "video/mp4", "clip.mp4")


@two_ranks
def test_two_rank_extraction_trains_the_one_gpu_action(client: Client, clip: dict, tmp_path: Path) -> None:
    status, one = extraction(client, clip)
    assert status == 202, one
    job_one = wait_job(client, one["job"]["id"], ("succeeded",))
    tokens_one = action_tensors(client, one["action"]["id"], tmp_path / "one.safetensors")
    status, _ = client.request("DELETE", f"/v1/actions/{one['action']['id']}")  # else the same request dedups to it
    assert status == 204

    status, two = extraction(client, clip, gpus=2)
    assert status == 202, two
    assert two["job"]["params"]["gpus"] == 2
    job_two = wait_job(client, two["job"]["id"], ("succeeded",))
    tokens_two = action_tensors(client, two["action"]["id"], tmp_path / "two.safetensors")

    assert job_two["result"].keys() == job_one["result"].keys()
    assert job_two["result"]["steps_trained"] == job_one["result"]["steps_trained"] == 4
    assert tokens_two.keys() == tokens_one.keys() and tokens_one
    for name, t in tokens_one.items():
        torch.testing.assert_close(tokens_two[name], t, atol=1e-5, rtol=0, msg=name)
    assert abs(job_two["result"]["final_loss"] - job_one["result"]["final_loss"]) <= 1e-5


@two_ranks
def test_a_data_parallel_extraction_is_the_one_gpu_action_on_as_many_windows(client: Client, clip: dict,
                                                                            tmp_path: Path) -> None:
    """`parallel: data` on 2 GPUs (a window per GPU per step, gradients averaged) trains what one GPU trains with
    `windows_per_step: 2`; that is its own action, not the one-window action of the same request."""
    status, single = extraction(client, clip, seed=9)
    assert status == 202 and single["action"]["windows_per_step"] == 1, single
    status, one = extraction(client, clip, seed=9, windows_per_step=2)
    assert status == 202 and one["action"]["id"] != single["action"]["id"], one  # another action
    assert one["action"]["windows_per_step"] == 2
    wait_job(client, one["job"]["id"], ("succeeded",))
    tokens_one = action_tensors(client, one["action"]["id"], tmp_path / "one.safetensors")
    status, same = extraction(client, clip, seed=9, gpus=2, parallel="data")  # 2 windows: the same action
    assert status == 202 and same["action"]["id"] == one["action"]["id"], same
    assert client.request("DELETE", f"/v1/actions/{one['action']['id']}")[0] == 204

    status, two = extraction(client, clip, seed=9, gpus=2, parallel="data")
    assert status == 202, two
    assert two["job"]["params"]["parallel"] == "data" and two["job"]["params"]["windows_per_step"] == 2
    wait_job(client, two["job"]["id"], ("succeeded",))
    tokens_two = action_tensors(client, two["action"]["id"], tmp_path / "two.safetensors")
    assert tokens_two.keys() == tokens_one.keys() and tokens_one
    for name, t in tokens_one.items():
        torch.testing.assert_close(tokens_two[name], t, atol=1e-5, rtol=0, msg=name)

    status, body = extraction(client, clip, gpus=2, parallel="data", windows_per_step=1)
    assert status == 422 and "windows_per_step must be at least 2" in json.dumps(body), body


@two_ranks
def test_two_rank_generation_makes_the_one_gpu_takes(client: Client, tmp_path: Path) -> None:
    """CFG-parallel on 2 ranks: the same videos as one process (a last-bit float difference may move a pixel
    value by one level after the 8-bit rounding, hence the tolerance of 1 level)."""
    image = upload(client, png_bytes(1, (80, 60)), "image/png", "target.png")
    jobs = {}
    for gpus in (1, 2):
        status, body = client.request("POST", "/v1/generations", json_body={
            "image": image["id"], "prompt": "a figure waves", "steps": 3, "takes": 2, "gpus": gpus})
        assert status == 202, body
        jobs[gpus] = wait_job(client, body["job"]["id"], ("succeeded",))  # type: ignore[index]
    one, two = jobs[1]["result"], jobs[2]["result"]
    assert one.keys() == two.keys() and [t["seed"] for t in one["takes"]] == [t["seed"] for t in two["takes"]]
    for i in range(2):
        a = frames(client, one["takes"][i]["url"], tmp_path / f"one{i}.mp4").astype(int)
        b = frames(client, two["takes"][i]["url"], tmp_path / f"two{i}.mp4").astype(int)
        assert a.shape == b.shape and a.std() > 0
        assert np.abs(a - b).max() <= 1, np.abs(a - b).max()


def _rank_pids(server_pid: int) -> list[int]:
    """The server's rank processes (spawned children running a rank, not the resource tracker)."""
    pids = []
    for child in Path(f"/proc/{server_pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(int(pid))
    return sorted(pids)


@two_ranks
def test_a_killed_rank_loses_the_attempt_and_the_job_resumes(client: Client, server: ServerProcess,
                                                              clip: dict) -> None:
    status, body = extraction(client, clip, gpus=2, steps=16, seed=7)
    assert status == 202, body
    job_id = body["job"]["id"]
    wait_job(client, job_id, ("running",), min_step=3)  # past the checkpoint at step 2
    pids = _rank_pids(server.proc.pid)  # type: ignore[union-attr]
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    done = wait_job(client, job_id, ("succeeded",))
    assert done["result"]["resumed_from"] >= 2, done["result"]
    assert done["result"]["steps_trained"] == 16


def test_more_gpus_than_the_machine_runs_is_refused_with_its_limit(client: Client, clip: dict) -> None:
    limit = max_service_ranks()
    status, body = extraction(client, clip, gpus=limit + 1, seed=3)
    assert status == 422, body
    assert body["error"]["code"] == "too_many_gpus"  # type: ignore[index]
    assert f"at most {limit}" in body["error"]["message"], body  # type: ignore[index]
    image = upload(client, png_bytes(1, (80, 60)), "image/png", "target.png")
    status, body = client.request("POST", "/v1/generations", json_body={
        "image": image["id"], "prompt": "a figure waves", "gpus": limit + 1})
    assert status == 422 and body["error"]["code"] == "too_many_gpus", body  # type: ignore[index]
    for bad in (0, 65, "2"):
        status, body = extraction(client, clip, gpus=bad)
        assert status == 422, (bad, body)
    status, jobs = client.request("GET", "/v1/jobs?kind=extract")
    assert all(j["params"].get("seed") != 3 for j in jobs["jobs"])  # type: ignore[index]  (nothing queued)


@two_ranks
def test_a_waiting_generation_pauses_a_two_rank_extraction_which_then_resumes(client: Client, clip: dict) -> None:
    status, body = extraction(client, clip, gpus=2, steps=12, seed=11)
    assert status == 202, body
    job_id = body["job"]["id"]
    wait_job(client, job_id, ("running",), min_step=1)
    image = upload(client, png_bytes(2, (80, 60)), "image/png", "target.png")
    status, gen = client.request("POST", "/v1/generations", json_body={
        "image": image["id"], "prompt": "a figure waves", "steps": 2})
    assert status == 202, gen
    generated = wait_job(client, gen["job"]["id"], ("succeeded",))  # type: ignore[index]
    done = wait_job(client, job_id, ("succeeded",))
    assert generated["finished_at"] < done["finished_at"]
    assert done["result"]["resumed_from"] >= 2, done["result"]  # paused at a checkpoint, resumed from it
    assert done["result"]["steps_trained"] == 12


@two_ranks
def test_cancel_stops_a_two_rank_extraction_and_its_ranks(client: Client, server: ServerProcess, clip: dict) -> None:
    status, body = extraction(client, clip, gpus=2, steps=200, seed=13)
    assert status == 202, body
    job_id = body["job"]["id"]
    wait_job(client, job_id, ("running",), min_step=1)
    status, _ = client.request("POST", f"/v1/jobs/{job_id}/cancel")
    assert status == 200
    done = wait_job(client, job_id, ("cancelled",))
    assert done["step"] < 200
    deadline = time.monotonic() + 30
    while _rank_pids(server.proc.pid) and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.2)
    assert _rank_pids(server.proc.pid) == []  # type: ignore[union-attr]


@two_ranks
def test_finish_early_on_two_ranks_makes_the_action_from_the_tokens_so_far(client: Client, clip: dict) -> None:
    status, body = extraction(client, clip, gpus=2, steps=200, seed=17)
    assert status == 202, body
    job_id = body["job"]["id"]
    wait_job(client, job_id, ("running",), min_step=1)
    status, _ = client.request("POST", f"/v1/jobs/{job_id}/finish")
    assert status == 200
    done = wait_job(client, job_id, ("succeeded",))
    assert 1 <= done["result"]["steps_trained"] < 200, done["result"]
    status, action = client.request("GET", f"/v1/actions/{body['action']['id']}")
    assert action["status"] == "ready" and action["meta"]["steps_trained"] == done["result"]["steps_trained"]  # type: ignore[index]
