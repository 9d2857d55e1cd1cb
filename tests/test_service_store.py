"""The store never loses what a record names, strict request types, 409/410 answers, no server paths in
messages, owner-only files: on a real server process."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from service_helpers import Client, ServerProcess, png_bytes, upload, wait_job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tmp_path_factory.mktemp("service-store")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    return Client(server.url)


def _stored(server: ServerProcess, sha: str) -> Path:
    [path] = (server.data_dir / "files" / sha[:2]).glob(sha + "*")
    return path


def _tokens(tmp_path: Path, **change) -> dict:
    """The tiny model's action tokens (random values), optionally with a changed shape, dtype or values."""
    import torch

    from flexiact_backend.generation import FlexiActGenerator
    from flexiact_backend.tiny import ensure_tiny_model

    gen = FlexiActGenerator.from_pretrained(ensure_tiny_model(tmp_path), device="cpu")
    return {k: torch.randn_like(v) for k, v in gen.adapter.action_state_dict().items()}


def test_request_types_are_strict_and_ranges_sane(client: Client) -> None:
    image = upload(client, png_bytes(31), "image/png", "t.png")
    base = {"image": image["id"], "prompt": "p", "steps": 2}
    for field, value in (("steps", "5"), ("seed", True), ("steps", 2.0), ("fps", 1e-300), ("fps", 0.5),
                         ("fps", 241), ("fps", "24"), ("guidance_scale", "6"), ("prompt", 5)):
        status, body = client.request("POST", "/v1/generations", json_body={**base, field: value})
        assert status == 422 and field in body["error"]["message"], (field, value, body)
    assert client.request("POST", "/v1/generations", json_body={**base, "fps": 24})[0] == 202  # an int is a float
    trim = {"name": "n", "caption": "c", "video": "0" * 64, "start_s": 0, "end_s": 1e12}
    assert client.request("POST", "/v1/actions", json_body=trim)[0] == 422


def test_a_malformed_exif_chunk_is_a_422(client: Client) -> None:
    import struct
    import zlib

    png = png_bytes(34)
    exif = b"\x00" * 3  # an eXIf chunk that is not TIFF data: Pillow raises SyntaxError on it
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    status, body = client.upload(png[:33] + chunk + png[33:], "image/png", "exif.png")
    assert status == 422 and body["error"]["code"] == "bad_media" and "exif.png" in body["error"]["message"], body


def test_cancel_of_a_finished_job_is_409(client: Client) -> None:
    image = upload(client, png_bytes(32), "image/png", "t.png")
    status, body = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p",
                                                                         "steps": 1})
    done = wait_job(client, body["job"]["id"])
    assert done["status"] == "succeeded"
    status, body = client.request("POST", f"/v1/jobs/{done['id']}/cancel")
    assert status == 409 and body["error"]["code"] == "already_finished"
    assert client.request("GET", f"/v1/jobs/{done['id']}")[1]["status"] == "succeeded"


def test_a_file_named_by_another_record_survives_delete(client: Client, server: ServerProcess,
                                                        tmp_path: Path) -> None:
    """An action's safetensors uploaded again as a checkpoint: deleting the action keeps the upload's bytes."""
    import torch

    torch.save(_tokens(tmp_path), tmp_path / "a.pt")
    pt = upload(client, (tmp_path / "a.pt").read_bytes(), "application/octet-stream", "a.pt")
    status, action = client.request("POST", "/v1/actions/import", json_body={"name": "a", "caption": "c",
                                                                              "file": pt["id"]})
    assert status == 201, action
    status, raw = client.request("GET", f"/v1/actions/{action['id']}/file")
    again = upload(client, raw, "application/octet-stream", "a.safetensors")
    assert again["id"] == action["file"]  # the same content: one stored file, two records naming it
    assert client.request("DELETE", f"/v1/actions/{action['id']}")[0] == 204
    assert client.request("HEAD", f"/v1/files/{again['id']}")[0] == 200
    assert hashlib.sha256(_stored(server, again["id"]).read_bytes()).hexdigest() == again["id"]


def test_missing_bytes_answer_404_or_410_and_reupload_restores(client: Client, server: ServerProcess) -> None:
    data = png_bytes(33)
    image = upload(client, data, "image/png", "t.png")
    status, body = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p",
                                                                         "steps": 1})
    done = wait_job(client, body["job"]["id"])
    _stored(server, image["id"]).unlink()  # lost behind the service's back
    assert client.request("HEAD", f"/v1/files/{image['id']}")[0] == 404
    status, body = client.request("POST", "/v1/generations", json_body={"image": image["id"], "prompt": "p"})
    assert status == 404 and "upload it again" in body["error"]["message"]
    assert upload(client, data, "image/png", "t.png")["id"] == image["id"]
    assert client.request("HEAD", f"/v1/files/{image['id']}")[0] == 200
    assert _stored(server, image["id"]).read_bytes() == data

    _stored(server, done["result"]["video"]).unlink()
    status, body = client.request("GET", f"/v1/jobs/{done['id']}/video")
    assert status == 410 and body["error"]["code"] == "gone"


def test_no_server_path_in_messages_and_files_are_owner_only(client: Client, server: ServerProcess,
                                                            tmp_path: Path) -> None:
    import torch

    torch.save([1, 2, 3], tmp_path / "list.pt")  # a torch zip that is not a dict of tensors
    bad = upload(client, (tmp_path / "list.pt").read_bytes(), "application/octet-stream", "list.pt")
    status, body = client.request("POST", "/v1/actions/import", json_body={"name": "a", "caption": "c",
                                                                            "file": bad["id"]})
    message = body["error"]["message"]
    assert status == 422 and bad["id"] in message, body  # says which file, by its name in the store
    assert str(server.data_dir) not in message and "/files/" not in message, message
    for path in [server.data_dir / "state.sqlite3", *(server.data_dir / "files").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path.name, oct(mode))


def test_imports_the_model_cannot_use_are_422(client: Client, tmp_path: Path) -> None:
    import torch

    good = _tokens(tmp_path)
    first = next(iter(good))
    cases = {
        "layer count": dict(list(good.items())[:-1]),
        "token shape": {k: torch.zeros(1, v.shape[1] + 1, v.shape[2]) for k, v in good.items()},
        "dtype": {k: v.to(torch.int32) for k, v in good.items()},
        "NaN": {**good, first: torch.full_like(good[first], float("nan"))},
    }
    for what, tokens in cases.items():
        torch.save(tokens, tmp_path / "bad.pt")
        file = upload(client, (tmp_path / "bad.pt").read_bytes(), "application/octet-stream", "bad.pt")
        status, body = client.request("POST", "/v1/actions/import", json_body={"name": "x", "caption": "c",
                                                                                "file": file["id"]})
        assert status == 422 and body["error"]["code"] == "bad_checkpoint", (what, body)
        assert "layers of motion tokens shaped [1, " in body["error"]["message"], (what, body)
    torch.save(good, tmp_path / "good.pt")
    file = upload(client, (tmp_path / "good.pt").read_bytes(), "application/octet-stream", "good.pt")
    assert client.request("POST", "/v1/actions/import", json_body={"name": "x", "caption": "c",
                                                                    "file": file["id"]})[0] == 201


def test_archive_bomb_is_refused_at_upload_in_bounded_memory(client: Client, server: ServerProcess,
                                                            tmp_path: Path) -> None:
    import zipfile

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            for _ in range(256):  # 256 MiB of zeros in a few hundred kB
                f.write(bytes(1 << 20))
    forged = tmp_path / "forged.pt"  # an uncompressed entry whose directory claims far more than the file holds
    with zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"x" * 100)
    raw = bytearray(forged.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = (3 * 1024**3).to_bytes(4, "little")  # uncompressed size in the central directory
    forged.write_bytes(bytes(raw))

    rss = lambda: int(next(line.split()[1] for line in Path(f"/proc/{server.proc.pid}/status").read_text()  # noqa: E731
                           .splitlines() if line.startswith("VmRSS:")))
    before = rss()
    for path in (bomb, forged):
        status, body = client.upload(path.read_bytes(), "application/octet-stream", path.name)
        assert status == 422 and body["error"]["code"] == "bad_checkpoint", body
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert client.request("HEAD", f"/v1/files/{sha}")[0] == 404
    assert (rss() - before) / 1024 < 32, "refusing the bombs took memory"


def test_step_clock_counts_only_the_step_loop() -> None:
    """Seconds per step from the training/denoising reports alone: loading and a preview between two training
    stretches never count."""
    from flexiact_backend.service.worker import StepClock

    clock = StepClock()
    for phase, step, now in (("loading", None, 0.0), ("training", 1, 10.0), ("training", 3, 12.0),
                             ("previewing", None, 13.0), ("training", 4, 50.0), ("training", 6, 51.0),
                             ("encoding", None, 99.0)):
        clock.observe(phase, step, now)
    assert clock.seconds_per_step() == pytest.approx((2.0 + 1.0) / 4)
    assert StepClock().seconds_per_step() is None
