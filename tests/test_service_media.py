"""Uploads on a real server: classified by content, stored under the detected format, limits from the probe,
image sequences as a zip with a frame rate, and playlists that cannot make the server read another file."""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from service_helpers import Client, ServerProcess, clip_bytes
from tests.media_fixtures import PLAYLISTS, OpenWatch, coded_frame, make_clip

H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "12", "-preset", "ultrafast"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # frames up to 100x80 (8000 pixels): the 96x64 clips pass, a 128x96 one is over
    with ServerProcess(tmp_path_factory.mktemp("service-media"), extra_args=("--max-video-pixels", "8000")) as s:
        yield s


def _stored(server: ServerProcess, file_id: str) -> list[str]:
    return [p.name for p in (server.data_dir / "files" / file_id[:2]).glob(file_id + "*")]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(coded_frame(i)).save(buf, format="PNG")
    return buf.getvalue()


def test_kind_and_extension_come_from_the_content(server: ServerProcess, tmp_path: Path) -> None:
    """A PNG sent as video/mp4 named clip.mp4 is an image stored as .png; an mp4 named a.png is a video."""
    client = Client(server.url)
    status, image = client.upload(_png(7), "video/mp4", "clip.mp4")
    assert status == 201 and image["kind"] == "image", image
    assert _stored(server, image["id"]) == [image["id"] + ".png"]
    status, video = client.upload(clip_bytes(tmp_path / "c.mp4"), "image/png", "a.png")
    assert status == 201 and video["kind"] == "video" and video["meta"]["container"] == "mp4", video
    assert _stored(server, video["id"]) == [video["id"] + ".mp4"]
    gif = make_clip(tmp_path / "anim.gif", 12, Fraction(12), ["-c:v", "gif"])
    status, anim = client.upload(gif.read_bytes(), "application/octet-stream", "anim.bin")
    assert status == 201 and anim["kind"] == "video" and anim["meta"]["frames"] == 12, anim


@pytest.mark.parametrize("name, text", PLAYLISTS)
def test_playlist_upload_is_refused_and_no_other_file_is_read(server: ServerProcess, tmp_path: Path,
                                                              name: str, text: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    target = make_clip(secret / "private.mp4", 24, Fraction(24), H264)
    watch = OpenWatch(secret)
    try:
        status, body = Client(server.url).upload(text.format(target=target).encode(), "video/mp4", name)
        assert status == 422 and "text file, not a video" in body["error"]["message"], body
        assert str(secret) not in body["error"]["message"]
        assert watch.opened() == set()
        target.read_bytes()
        assert watch.opened() == {"private.mp4"}  # the watch sees a real read
    finally:
        watch.close()


def test_video_frame_size_is_limited_from_the_probe(server: ServerProcess, tmp_path: Path) -> None:
    status, body = Client(server.url).upload(clip_bytes(tmp_path / "big.mp4", size=(128, 96)), "video/mp4", "b.mp4")
    assert status == 413 and body["error"]["code"] == "too_large", body
    assert "128x96" in body["error"]["message"] and "limit is 0.008 megapixels" in body["error"]["message"]


def test_image_sequence_zip_with_frame_rate(server: ServerProcess) -> None:
    """A zip of numbered PNGs with ?fps=12 becomes a 2 s clip that an extraction can trim; no fps or a gap: 422."""
    client = Client(server.url)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(24):
            z.writestr(f"render/shot_{i + 1:04d}.png", _png(i))
    data = buf.getvalue()
    status, body = client.upload(data, "application/zip", "shot.zip")
    assert status == 422 and "?fps=" in body["error"]["message"], body
    status, clip = client.request("POST", "/v1/files?fps=12", data=data,
                                  headers={"Content-Type": "application/octet-stream", "X-Filename": "shot.zip"})
    assert status == 201 and clip["kind"] == "video", clip
    assert (clip["meta"]["frames"], clip["meta"]["fps"], clip["meta"]["duration_s"]) == (24, 12.0, 2.0)
    assert _stored(server, clip["id"]) == [clip["id"] + ".avi"]
    status, action = client.request("POST", "/v1/actions", json_body={
        "name": "seq", "caption": "a block", "video": clip["id"], "start_s": 0.5, "end_s": 1.5, "steps": 1})
    assert status == 202, action
    client.request("POST", f"/v1/jobs/{action['job']['id']}/cancel")
    gap = io.BytesIO()
    with zipfile.ZipFile(gap, "w") as z:
        for i in (1, 2, 4):
            z.writestr(f"shot_{i:04d}.png", _png(i))
    status, body = client.request("POST", "/v1/files?fps=12", data=gap.getvalue(),
                                  headers={"Content-Type": "application/octet-stream", "X-Filename": "gap.zip"})
    assert status == 422 and "frame 3 (shot_0003.png) is missing" in body["error"]["message"], body
