"""The HTTP service end to end: a real server process on loopback running the tiny model."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from flexiact_backend.media import read_clip

from service_helpers import (WAIT_S, Client, ServerProcess, assert_monotonic, clip_bytes, decode_mp4, png_bytes,
                             upload, wait_job)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tmp_path_factory.mktemp("service"), extra_args=("--checkpoint-every", "2")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    return Client(server.url)


@pytest.fixture(scope="module")
def model(client: Client) -> dict:
    return client.request("GET", "/v1/health")[1]["model"]


@pytest.fixture(scope="module")
def clip(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return upload(client, clip_bytes(tmp_path_factory.mktemp("clip") / "clip.mp4"), "video/mp4", "clip.mp4")


@pytest.fixture(scope="module")
def image(client: Client) -> dict:
    return upload(client, png_bytes(1, (80, 60)), "image/png", "target.png")


def _generate(client: Client, image: dict, **fields) -> dict:
    status, body = client.request("POST", "/v1/generations",
                                  json_body={"image": image["id"], "prompt": "a figure waves", **fields})
    assert status == 202, body
    return body["job"]


def _extract(client: Client, clip: dict, **fields) -> tuple[dict, dict]:
    body = {"name": "slide", "caption": "a square slides right", "video": clip["id"], "start_s": 0.0, "end_s": 2.0,
            **fields}
    status, out = client.request("POST", "/v1/actions", json_body=body)
    assert status == 202, out
    return out["action"], out["job"]


def test_health_reports_model_device_queue_and_workers(client: Client, server: ServerProcess) -> None:
    status, h = client.request("GET", "/v1/health")
    assert status == 200
    assert h["status"] == "ok"
    assert h["model"]["tiny"] is True and h["model"]["loaded"] is True
    assert all(isinstance(h["model"][k], (int, float)) and h["model"][k] > 0 for k in ("width", "height", "frames", "fps"))
    assert h["device"]["type"] == "cpu"
    assert set(h["queue"]) == {"queued", "running"}
    # one machine: one worker thread in the server process, same fields as a Ray actor's
    assert h["workers"] == [{"id": "worker-0", "node": h["workers"][0]["node"], "device": "cpu",
                             "pid": server.proc.pid, "state": "idle", "job": None}]
    assert h["workers"][0]["node"]


def test_uploads_are_content_addressed(client: Client, clip: dict) -> None:
    data = png_bytes(7)
    first = upload(client, data, "image/png", "a.png")
    assert first["id"] == hashlib.sha256(data).hexdigest()
    assert first["kind"] == "image" and first["meta"] == {"width": 48, "height": 32}
    assert upload(client, data, "image/png", "again.png")["id"] == first["id"]
    assert client.request("HEAD", f"/v1/files/{first['id']}")[0] == 200
    assert client.request("HEAD", f"/v1/files/{'0' * 64}")[0] == 404
    assert clip["kind"] == "video"
    assert clip["meta"]["frames"] == 48 and clip["meta"]["fps"] == pytest.approx(24.0)
    assert clip["meta"]["duration_s"] == pytest.approx(2.0)


def test_round_trip_extract_then_generate_at_scene_rates(client: Client, server: ServerProcess, clip: dict,
                                                         image: dict, model: dict, tmp_path: Path) -> None:
    action, job = _extract(client, clip, steps=6, seed=3, preview_every=0)  # previews have their own test
    again, job_again = _extract(client, clip, steps=6, seed=3, preview_every=0)
    assert again["id"] == action["id"] and job_again["id"] == job["id"]  # same request: no second training
    history: list[dict] = []
    done = wait_job(client, job["id"], history=history)
    assert done["status"] == "succeeded", done
    assert_monotonic(history)
    status, action = client.request("GET", f"/v1/actions/{action['id']}")
    assert status == 200 and action["status"] == "ready" and action["meta"]["steps"] == 6
    assert action["duration_s"] == pytest.approx(model["frames"] / model["fps"])  # 2 s trim: model-length windows
    status, raw = client.request("GET", f"/v1/actions/{action['id']}/file")
    assert status == 200 and hashlib.sha256(raw).hexdigest() == action["file"]
    assert any(a["id"] == action["id"] for a in client.request("GET", "/v1/actions")[1]["actions"])
    # the estimate is the training loop's own time per step: below the whole job's (loading, encoding included)
    per_step = client.request("GET", "/v1/health")[1]["step_s"]["extract"]
    assert per_step is not None and 0 < per_step < (done["finished_at"] - done["started_at"]) / 6

    for fps in (24.0, 29.97):
        job = _generate(client, image, action=action["id"], steps=3, fps=fps)
        history = []
        done = wait_job(client, job["id"], history=history)
        assert done["status"] == "succeeded", done
        assert_monotonic(history)
        status, mp4 = client.request("GET", f"/v1/jobs/{job['id']}/video")
        assert status == 200
        path = tmp_path / f"out-{fps}.mp4"
        path.write_bytes(mp4)
        frames, got_fps, size = decode_mp4(path)
        assert frames == round(model["frames"] / model["fps"] * fps)  # the model's duration, kept at any rate
        assert got_fps == pytest.approx(fps, abs=0.01)
        assert size == (model["width"], model["height"])
        assert done["result"]["frames"] == frames

    # the events stream replays the finished job and ends
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events and events[-1]["status"] == "succeeded" and events[-1]["id"] == job["id"]


def test_events_stream_progress_never_goes_backwards(client: Client, server: ServerProcess, image: dict) -> None:
    job = _generate(client, image, steps=30)
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["status"] == "succeeded"
    assert_monotonic(events)


def test_generation_goes_ahead_of_a_running_extraction(client: Client, clip: dict, image: dict) -> None:
    action, extraction = _extract(client, clip, steps=5000, seed=11, preview_every=0)
    wait_job(client, extraction["id"], ("running",), min_step=3)
    generation = _generate(client, image, steps=2)
    done = wait_job(client, generation["id"])
    assert done["status"] == "succeeded"
    status, ext = client.request("GET", f"/v1/jobs/{extraction['id']}")
    assert ext["status"] in ("queued", "running"), ext  # it yielded at a checkpoint and was re-queued
    assert 0 < ext["step"] < 5000
    status, cancelled = client.request("POST", f"/v1/jobs/{extraction['id']}/cancel")
    assert status == 200
    final = wait_job(client, extraction["id"])
    assert final["status"] == "cancelled" and final["error"]["code"] == "cancelled"
    assert client.request("GET", f"/v1/actions/{action['id']}")[1]["status"] == "cancelled"
    assert client.request("DELETE", f"/v1/actions/{action['id']}")[0] == 204
    assert client.request("GET", f"/v1/actions/{action['id']}")[0] == 404


def test_cancel_queued_is_immediate_and_running_stops(client: Client, image: dict) -> None:
    running = _generate(client, image, steps=1000)
    wait_job(client, running["id"], ("running",), min_step=1)
    queued, behind = _generate(client, image, steps=2), _generate(client, image, steps=2)
    assert (queued["queue_position"], behind["queue_position"], queued["worker"]) == (1, 2, None)
    status, run = client.request("GET", f"/v1/jobs/{running['id']}")
    assert run["worker"] == "worker-0" and run["queue_position"] is None
    workers = client.request("GET", "/v1/health")[1]["workers"]
    assert [(w["state"], w["job"]) for w in workers] == [("busy", running["id"])]
    assert client.request("POST", f"/v1/jobs/{behind['id']}/cancel")[0] == 200
    status, body = client.request("POST", f"/v1/jobs/{queued['id']}/cancel")
    assert status == 200 and body["job"]["status"] == "cancelled"
    assert client.request("POST", f"/v1/jobs/{running['id']}/cancel")[0] == 200
    final = wait_job(client, running["id"])
    assert final["status"] == "cancelled" and final["step"] < 1000
    assert client.request("GET", f"/v1/jobs/{running['id']}/video")[0] == 409
    listed = client.request("GET", "/v1/jobs?status=cancelled")[1]["jobs"]
    assert {running["id"], queued["id"]} <= {j["id"] for j in listed}


def _download(client: Client, url: str, path: Path) -> Path:
    status, data = client.request("GET", url)
    assert status == 200, data
    path.write_bytes(data)  # type: ignore[arg-type]
    return path


def test_previews_while_training_then_finish_early(client: Client, clip: dict, image: dict, model: dict,
                                                   tmp_path: Path) -> None:
    """Previews appear during the extraction and decode; finish makes the action ready from the tokens so far."""
    action, job = _extract(client, clip, steps=100_000, seed=21, preview_every=3, preview_image=image["id"],
                           end_s=1.0)  # within one model clip: the latents are quick to prepare
    deadline = time.monotonic() + WAIT_S
    previews: list[dict] = []
    while not previews and time.monotonic() < deadline:
        status, previews = client.request("GET", f"/v1/jobs/{job['id']}/previews")  # type: ignore[assignment]
        assert status == 200, previews
        time.sleep(0.1)
    assert previews and previews[0]["step"] == 3, previews
    assert client.request("GET", f"/v1/jobs/{job['id']}")[1]["status"] == "running"  # seen while it trains
    first = previews[0]
    frames, fps, size = decode_mp4(_download(client, first["url"], tmp_path / "preview.mp4"))
    assert (frames, size) == (first["frames"], (model["width"], model["height"]))
    assert frames == model["frames"] and fps == pytest.approx(model["fps"])
    _error(client.request("GET", f"/v1/jobs/{job['id']}/previews/4"), 404, "not_found")

    status, body = client.request("POST", f"/v1/jobs/{job['id']}/finish")
    assert status == 200, body
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    trained = done["result"]["steps_trained"]
    assert 3 <= trained < 100_000 and done["step"] == trained and done["total_steps"] == 100_000
    status, action = client.request("GET", f"/v1/actions/{action['id']}")
    assert action["status"] == "ready" and action["meta"]["steps_trained"] == trained
    assert action["meta"]["steps"] == 100_000
    steps = [p["step"] for p in client.request("GET", f"/v1/jobs/{job['id']}/previews")[1]]  # type: ignore[union-attr]
    assert steps == list(range(3, trained + 1, 3))
    _error(client.request("POST", f"/v1/jobs/{job['id']}/finish"), 409, "not_running")
    gen = _generate(client, image, action=action["id"], steps=2)
    assert wait_job(client, gen["id"])["status"] == "succeeded"  # the early action is usable
    _error(client.request("POST", f"/v1/jobs/{gen['id']}/finish"), 409, "not_an_extraction")
    _error(client.request("GET", f"/v1/jobs/{gen['id']}/previews"), 404, "not_found")


def test_takes_make_one_video_per_seed(client: Client, image: dict, model: dict, tmp_path: Path) -> None:
    job = _generate(client, image, steps=3, seed=40, takes=3)
    assert job["total_steps"] == 9 and job["params"]["seeds"] == [40, 41, 42]
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    takes = done["result"]["takes"]
    assert [t["seed"] for t in takes] == [40, 41, 42]
    assert done["result"]["video"] == takes[0]["video"] and done["result"]["url"] == f"/v1/jobs/{job['id']}/video"
    videos = []
    for i, take in enumerate(takes):
        path = _download(client, take["url"], tmp_path / f"take{i}.mp4")
        assert decode_mp4(path)[0] == take["frames"] == model["frames"]
        videos.append(read_clip(path, 0.0, None, model["frames"]))
    assert not np.array_equal(videos[0], videos[1]) and not np.array_equal(videos[1], videos[2])
    status, first = client.request("GET", f"/v1/jobs/{job['id']}/video")
    assert status == 200 and hashlib.sha256(first).hexdigest() == takes[0]["video"]  # type: ignore[arg-type]
    _error(client.request("GET", f"/v1/jobs/{job['id']}/video?take=3"), 404, "not_found")

    explicit = wait_job(client, _generate(client, image, steps=2, seeds=[7, 3])["id"])
    assert [t["seed"] for t in explicit["result"]["takes"]] == [7, 3]


def test_bad_takes_previews_and_finish_are_4xx(client: Client, clip: dict, image: dict) -> None:
    gen = {"image": image["id"], "prompt": "x", "steps": 2}
    for bad in ({"takes": 0}, {"takes": 9}, {"seeds": []}, {"seeds": list(range(9))}, {"seeds": [1, 2], "takes": 3},
                {"seeds": [-1]}, {"takes": 2.5}):
        _error(client.request("POST", "/v1/generations", json_body={**gen, **bad}), 422, "invalid_request")
    ext = {"name": "n", "caption": "c", "video": clip["id"], "start_s": 0, "end_s": 1, "steps": 2}
    _error(client.request("POST", "/v1/actions", json_body={**ext, "preview_every": -1}), 422, "invalid_request")
    _error(client.request("POST", "/v1/actions", json_body={**ext, "preview_image": clip["id"]}), 422,
           "wrong_file_kind")
    _error(client.request("POST", f"/v1/jobs/{'d' * 32}/finish"), 404, "not_found")
    _error(client.request("GET", f"/v1/jobs/{'d' * 32}/previews"), 404, "not_found")


def _error(status_body: tuple[int, object], status: int, code: str | None = None) -> None:
    got, body = status_body
    assert got == status, body
    assert isinstance(body, dict) and set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body


def test_bad_inputs_are_4xx_json(client: Client, clip: dict, image: dict) -> None:
    raw = lambda path, data: client.request("POST", path, data=data,  # noqa: E731
                                            headers={"Content-Type": "application/json"})
    _error(raw("/v1/generations", b'{"image": '), 400, "malformed_json")
    _error(client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "x", "steps": "many"}),
           422, "invalid_request")
    _error(raw("/v1/generations", f'{{"image": "{image["id"]}", "prompt": "x", "seed": NaN}}'.encode()), 422)
    _error(client.request("POST", "/v1/generations", json_body={"image": "1" * 64, "prompt": "x"}), 404, "not_found")
    _error(client.request("POST", "/v1/generations", json_body={"image": clip["id"], "prompt": "x"}), 422,
           "wrong_file_kind")
    _error(client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "x",
                                                                 "action": "a" * 32}), 404, "not_found")
    _error(client.request("GET", f"/v1/jobs/{'b' * 32}"), 404, "not_found")
    _error(client.request("GET", "/v1/jobs/../../etc/passwd"), 404)
    _error(client.request("GET", "/v1/jobs/not-an-id"), 422)
    _error(client.request("GET", f"/v1/actions/{'c' * 32}/file"), 404)
    _error(client.upload(b"just some text\n" * 10, "video/mp4", "notes.mp4"), 422, "bad_media")
    _error(client.upload(b"just some text\n", "text/plain", "notes.txt"), 415)
    _error(client.upload(b"not a checkpoint", "application/octet-stream", "x.pt"), 422, "bad_checkpoint")
    _error(client.upload(b"", "image/png", "empty.png"), 422, "empty_file")
    trim = {"name": "n", "caption": "c", "video": clip["id"], "steps": 2}
    _error(client.request("POST", "/v1/actions", json_body={**trim, "start_s": 1.0, "end_s": 9.0}), 422, "bad_media")
    _error(client.request("POST", "/v1/actions", json_body={**trim, "start_s": 1.5, "end_s": 1.0}), 422, "bad_media")
    _error(client.request("POST", "/v1/actions", json_body={**trim, "video": image["id"], "start_s": 0, "end_s": 1}),
           422, "wrong_file_kind")
    _error(client.request("POST", "/v1/actions/import", json_body={"name": "n", "caption": "c", "file": image["id"]}),
           422, "wrong_file_kind")


def test_import_published_checkpoint(client: Client, tmp_path: Path) -> None:
    """A published-format `.pt` (plain dict of motion tokens) becomes a ready action without training."""
    import torch

    from flexiact_backend.generation import FlexiActGenerator
    from flexiact_backend.tiny import ensure_tiny_model

    gen = FlexiActGenerator.from_pretrained(ensure_tiny_model(tmp_path), device="cpu")
    tokens = {k: torch.randn_like(v) for k, v in gen.adapter.action_state_dict().items()}
    torch.save(tokens, tmp_path / "published.pt")
    file = upload(client, (tmp_path / "published.pt").read_bytes(), "application/octet-stream", "published.pt")
    assert file["kind"] == "checkpoint" and file["meta"]["format"] == "torch"
    status, action = client.request("POST", "/v1/actions/import", json_body={"name": "pub", "caption": "c",
                                                                              "file": file["id"]})
    assert status == 201 and action["status"] == "ready" and action["source"] == "import", action
    assert action["duration_s"] == pytest.approx(9 / 8)  # no metadata: the model's clip length


def test_short_action_plays_at_reference_speed_unless_tempo_model(client: Client, clip: dict, image: dict,
                                                                  model: dict, tmp_path: Path) -> None:
    """A 0.5 s trim records duration_s 0.5; its generation lasts 0.5 s, or the model's clip with tempo "model"."""
    action, job = _extract(client, clip, start_s=1.0, end_s=1.5, steps=2, seed=5)
    assert wait_job(client, job["id"])["status"] == "succeeded"
    action = client.request("GET", f"/v1/actions/{action['id']}")[1]
    assert action["duration_s"] == pytest.approx(0.5) and action["meta"]["duration_s"] == pytest.approx(0.5)
    for tempo, seconds in ((None, 0.5), ("model", model["frames"] / model["fps"])):
        fields = {"tempo": tempo} if tempo else {}
        done = wait_job(client, _generate(client, image, action=action["id"], steps=2, fps=24, **fields)["id"])
        assert done["status"] == "succeeded", done
        path = tmp_path / f"tempo-{tempo}.mp4"
        path.write_bytes(client.request("GET", f"/v1/jobs/{done['id']}/video")[1])
        assert decode_mp4(path)[0] == round(seconds * 24) == done["result"]["frames"]
        assert done["result"]["duration_s"] == pytest.approx(seconds, abs=1 / 24)
    _error(client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p", "tempo": "slow"}),
           422)


def test_health_serves_the_extraction_presets(client: Client) -> None:
    from flexiact_backend.presets import PRESETS

    presets = client.request("GET", "/v1/health")[1]["presets"]
    assert presets == PRESETS and presets["standard"] == 3000 and 0 < presets["quick"] < presets["standard"]


def test_failing_job_reports_why_and_the_next_job_runs(client: Client, server: ServerProcess) -> None:
    """A job that raises (here: its image's bytes vanish while it waits) fails alone; the worker lives on."""
    blocker = _generate(client, upload(client, png_bytes(21), "image/png", "b.png"), steps=1000)
    wait_job(client, blocker["id"], ("running",), min_step=1)
    doomed = upload(client, png_bytes(22), "image/png", "d.png")
    queued = _generate(client, doomed, steps=2)
    next((server.data_dir / "files" / doomed["id"][:2]).glob(doomed["id"] + "*")).unlink()
    client.request("POST", f"/v1/jobs/{blocker['id']}/cancel")
    failed = wait_job(client, queued["id"])
    assert failed["status"] == "failed" and failed["error"]["message"], failed
    assert str(server.data_dir) not in failed["error"]["message"]
    fresh = upload(client, png_bytes(23), "image/png", "n.png")
    assert wait_job(client, _generate(client, fresh, steps=2)["id"])["status"] == "succeeded"


def test_twenty_clients_poll_and_upload_while_a_job_runs(client: Client, image: dict) -> None:
    from flexiact_backend.tools.serve_bench import run_load

    job = _generate(client, image, steps=1000)
    wait_job(client, job["id"], ("running",), min_step=1)
    report = run_load(client, lambda: job["id"], clients=20, rounds=10, upload_every=3)
    client.request("POST", f"/v1/jobs/{job['id']}/cancel")
    assert report["errors"] == 0, report["error_samples"]
    assert report["poll_ms"]["n"] == 200 and report["upload_ms"]["n"] == 20 * 4
    assert report["job_status_seen"].get("running", 0) > 0
    assert wait_job(client, job["id"])["status"] == "cancelled"


def test_fuzz_from_openapi_no_5xx_and_schema_conformance(server: ServerProcess, tmp_path: Path) -> None:
    """Schemathesis, driven by the server's own /openapi.json: no 5xx, every response as documented.

    A bounded, seeded run (the pytest plugin of schemathesis 4 does not work with pytest 9, so its CLI runs).
    `positive_data_acceptance` is left out: valid-looking but unknown ids rightly get 404.
    """
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--max-examples", "10",
           "--seed", "1", "--no-shrink", "--exclude-checks", "positive_data_acceptance", "--request-timeout", "60"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and re.search(r"Selected: (\d+)/\1", run.stdout), run.stdout[-3000:]
