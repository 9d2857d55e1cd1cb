"""Media layer: real clips made with the bundled ffmpeg, read back frame-exactly.

Every synthetic frame shows its own index (see media_fixtures), so trim + resample tests assert
the exact source frames chosen, not just shapes.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexiact_backend.errors import MediaError
from flexiact_backend.media import (
    VideoInfo,
    fit_target_image,
    probe_video,
    read_clip,
    read_image_info,
    retime_frames,
    trim_frame_indices,
    write_mp4,
)
from tests.media_fixtures import H, W, coded_frame, make_clip, read_code, remux

H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "12", "-preset", "ultrafast"]
VP9 = ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-crf", "12", "-b:v", "0",
       "-deadline", "realtime", "-cpu-used", "8"]
MJPEG = ["-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p"]
NTSC30 = Fraction(30000, 1001)

# name -> (file name, frame rate, frame count, codec args, audio args or None); Matroska/WebM
# store timestamps in whole milliseconds, which the expected indices must take into account
CFR_CLIPS = {
    "mp4_h264_24fps_aac": ("a.mp4", Fraction(24), 48, H264, ["-c:a", "aac"]),
    "mov_h264_25fps": ("b.mov", Fraction(25), 50, H264, None),
    "webm_vp9_29.97fps_opus": ("c.webm", NTSC30, 60, VP9, ["-c:a", "libopus"]),
    "mkv_h264_29.97fps": ("d.mkv", NTSC30, 60, H264, None),
    "avi_mjpeg_25fps_pcm": ("e.avi", Fraction(25), 50, MJPEG, ["-c:a", "pcm_s16le"]),
}
VFR_TIMES = [Fraction(n, 24) if n < 24 else 1 + Fraction(n - 24, 12) for n in range(48)]


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All synthetic clips, encoded once per session."""
    d = tmp_path_factory.mktemp("clips")
    out = {name: make_clip(d / fn, n, rate, codec, audio)
           for name, (fn, rate, n, codec, audio) in CFR_CLIPS.items()}
    # 24 fps for the first second, then 12 fps: timestamps VFR_TIMES, 3.0 s in all
    out["vfr"] = make_clip(d / "vfr.mp4", 48, Fraction(24), H264,
                           vf="setpts='if(lt(N,24),N,24+2*(N-24))'")
    out["rot90"] = remux(out["mp4_h264_24fps_aac"], d / "rot90.mp4", ["-display_rotation", "90"])
    out["rot270"] = remux(out["mp4_h264_24fps_aac"], d / "rot270.mp4", ["-display_rotation", "-90"])
    out["audio_only"] = make_clip(d / "tone.m4a", 1, Fraction(1), ["-vn"], ["-c:a", "aac"])
    out["zero_frames"] = d / "zero.avi"
    make_clip(out["zero_frames"], 0, Fraction(25), MJPEG)
    text = d / "notes.txt"
    text.write_text("this is not a video\n" * 50)
    out["text"] = text
    empty = d / "empty.mp4"
    empty.touch()
    out["empty"] = empty
    truncated = d / "truncated.mp4"
    truncated.write_bytes(out["mp4_h264_24fps_aac"].read_bytes()[: 2000])
    out["truncated"] = truncated
    image = d / "still.png"
    Image.fromarray(coded_frame(3)).save(image)
    out["image"] = image
    return out


def codes(frames: np.ndarray) -> list[int]:
    return [read_code(f) for f in frames]


# --------------------------------------------------------------------------------------------
# Probing


@pytest.mark.parametrize("name", list(CFR_CLIPS))
def test_probe_cfr_clips(clips: dict[str, Path], name: str) -> None:
    """Every container/codec/rate reports true size, count, rate, duration and audio presence."""
    _, rate, n, _, audio = CFR_CLIPS[name]
    info = probe_video(clips[name])
    assert (info.width, info.height, info.frames, info.rotation) == (W, H, n, 0)
    assert info.fps == pytest.approx(float(rate), abs=1e-6)
    assert info.duration_s == pytest.approx(float(n / rate), abs=2e-3)
    assert info.has_audio is (audio is not None)


def test_probe_vfr_and_rotation(clips: dict[str, Path]) -> None:
    """VFR gives the average rate over the real span; rotation swaps the reported size."""
    vfr = probe_video(clips["vfr"])
    assert vfr.frames == 48
    # the last frame starts at 35/12 s; mp4 stores its length as the encoder's 1/24 s
    assert vfr.duration_s == pytest.approx(35 / 12 + 1 / 24)
    assert vfr.fps == pytest.approx(48 / vfr.duration_s)
    assert probe_video(clips["rot90"]) == VideoInfo(H, W, 24.0, 2.0, 48, 90, True, container="mp4")
    assert probe_video(clips["rot270"]).rotation == 270


@pytest.mark.parametrize(
    "name, fragment",
    [("text", "text file, not a video"), ("empty", "empty"), ("image", "still image"),
     ("audio_only", "audio only"), ("zero_frames", "no frames"), ("truncated", "incomplete")],
)
def test_probe_rejects_bad_files(clips: dict[str, Path], name: str, fragment: str) -> None:
    """Each kind of unusable file gets a MediaError naming the problem."""
    with pytest.raises(MediaError, match=fragment):
        probe_video(clips[name])


def test_probe_missing_file(tmp_path: Path) -> None:
    """A wrong path is reported as such, not as a codec problem."""
    with pytest.raises(MediaError, match="no such file"):
        probe_video(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------------------------
# Trim + resample


def expected_cfr(start: Fraction, end: Fraction, n: int, rate: Fraction, ms: bool = False) -> list[int]:
    """Independent statement of the rule: the last frame starting at or before t_i.

    Frame k starts at k / fps (rounded half up to whole ms for Matroska), so for exact time
    bases this is floor(t_i * fps).
    """
    starts = [Fraction(math.floor(k / rate * 1000 + Fraction(1, 2)), 1000) if ms else k / rate
              for k in range(1000)]
    return [max(k for k, s in enumerate(starts) if s <= start + i * (end - start) / n)
            for i in range(n)]


@pytest.mark.parametrize("name", list(CFR_CLIPS))
@pytest.mark.parametrize("start, end, n", [("0.6", "1.6", 8), ("0.5", "1.5", 49), ("0", None, 13)])
def test_read_clip_exact_indices(clips: dict[str, Path], name: str, start: str,
                                 end: str | None, n: int) -> None:
    """Trim + resample picks exactly floor(t_i * fps) on every container, repeating when N > frames."""
    _, rate, count, _, _ = CFR_CLIPS[name]
    frames = read_clip(clips[name], float(start), None if end is None else float(end), n)
    assert frames.shape == (n, H, W, 3) and frames.dtype == np.uint8
    stop = Fraction(end) if end is not None else Fraction(repr(probe_video(clips[name]).duration_s))
    ms = clips[name].suffix in (".mkv", ".webm")
    assert codes(frames) == expected_cfr(Fraction(start), stop, n, rate, ms)


def test_read_clip_vfr_follows_timestamps(clips: dict[str, Path]) -> None:
    """On a 24-then-12 fps clip frames are picked by timestamp, not by frame count."""
    expected = [12, 18, 24, 27, 30, 33, 36, 39]
    assert trim_frame_indices(VFR_TIMES, 0.5, 2.5, 8) == expected
    assert codes(read_clip(clips["vfr"], 0.5, 2.5, 8)) == expected


@pytest.mark.parametrize("name, red_side, green_side", [("rot90", "left", "bottom"),
                                                        ("rot270", "right", "top")])
def test_read_clip_rotated_comes_out_upright(clips: dict[str, Path], name: str,
                                             red_side: str, green_side: str) -> None:
    """Rotation metadata is applied: portrait shape, and the stripes turned the way it says."""
    frame = read_clip(clips[name], 0.0, 1.0, 4)[0].astype(int)
    assert frame.shape == (W, H, 3)
    edges = {"left": frame[:, :3], "right": frame[:, -3:], "top": frame[:3], "bottom": frame[-3:]}
    assert edges[red_side][..., 0].mean() > 200 and edges[red_side][..., 1].mean() < 60
    assert edges[green_side][..., 1].mean() > 200 and edges[green_side][..., 0].mean() < 60


def test_read_clip_max_side_downscales(clips: dict[str, Path]) -> None:
    """max_side bounds the decoded size with even dimensions and the aspect kept."""
    frames = read_clip(clips["mp4_h264_24fps_aac"], 0.0, 1.0, 3, max_side=32)
    assert frames.shape == (3, 24, 32, 3)


def test_trim_frame_indices_rule() -> None:
    """Typed decimals are exact, times before the first frame take frame 0, frames repeat."""
    ts = [i / 10 for i in range(10)]
    assert trim_frame_indices(ts, 0.3, 0.9, 3) == [3, 5, 7]
    assert trim_frame_indices([0.25, 0.5, 0.75], 0.0, 1.0, 4) == [0, 0, 1, 2]
    assert trim_frame_indices([0.0, 1.0], 0.0, 2.0, 4) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "start, end, fragment",
    [(2.5, None, "past the end"), (0.5, 9.0, "past the end"), (-0.1, 1.0, "negative"),
     (1.0, 1.0, "not after the start"), (1.2, 0.8, "not after the start"),
     (1.0, 1.4, "at least 0.5 s")],
)
def test_read_clip_bad_trims(clips: dict[str, Path], tmp_path: Path, start: float,
                             end: float | None, fragment: str) -> None:
    """Bad trims name the problem; nothing is left in the clip's folder."""
    path = clips["mp4_h264_24fps_aac"]
    before = sorted(path.parent.iterdir())
    with pytest.raises(MediaError, match=fragment):
        read_clip(path, start, end, 8)
    assert sorted(path.parent.iterdir()) == before


def test_read_clip_end_slightly_past_clip_is_clamped(clips: dict[str, Path]) -> None:
    """An end a few ms past a rounded duration is accepted as the clip end."""
    frames = read_clip(clips["mp4_h264_24fps_aac"], 1.0, 2.02, 6)
    assert codes(frames) == expected_cfr(Fraction(1), Fraction(2), 6, Fraction(24))


@pytest.mark.parametrize("name", ["text", "empty", "image", "audio_only", "zero_frames", "truncated"])
def test_read_clip_rejects_bad_files(clips: dict[str, Path], name: str) -> None:
    """read_clip fails with MediaError, never another exception, and writes nothing."""
    before = sorted(clips[name].parent.iterdir())
    with pytest.raises(MediaError):
        read_clip(clips[name], 0.0, 1.0, 8)
    assert sorted(clips[name].parent.iterdir()) == before


# --------------------------------------------------------------------------------------------
# Writing and retiming


@pytest.mark.parametrize("fps, rate", [(8, Fraction(8)), (23.976, Fraction(24000, 1001)),
                                       (29.97, NTSC30)])
def test_write_mp4_round_trip(tmp_path: Path, fps: float, rate: Fraction) -> None:
    """Exact NTSC rate, every frame once and in order, odd size padded, no temp file left."""
    frames = np.stack([coded_frame(i) for i in range(17)])[:, :47, :63]
    out = tmp_path / "out.mp4"
    write_mp4(out, frames, fps)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    info = probe_video(out)
    assert (info.width, info.height, info.frames) == (64, 48, 17)
    assert info.fps == pytest.approx(float(rate), abs=1e-6)
    assert info.duration_s == pytest.approx(float(17 / rate), abs=1e-3)
    assert codes(read_clip(out, 0.0, None, 17)) == list(range(17))


def test_write_mp4_replaces_atomically_and_fails_cleanly(tmp_path: Path) -> None:
    """Overwrite replaces the file; bad input or a missing folder leaves nothing behind."""
    out = tmp_path / "out.mp4"
    write_mp4(out, np.stack([coded_frame(i) for i in range(4)]), 8)
    write_mp4(out, np.stack([coded_frame(i) for i in range(6)]), 8)
    assert probe_video(out).frames == 6
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_mp4(out, np.zeros((3, 48, 64), np.uint8), 8)
    with pytest.raises(ValueError):
        write_mp4(out, np.zeros((3, 48, 64, 3), np.float32), 8)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    with pytest.raises(OSError, match="could not write"):
        write_mp4(tmp_path / "missing" / "x.mp4", np.stack([coded_frame(0)] * 2), 8)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_retime_frames_keeps_duration() -> None:
    """49 frames at 8 fps stay 6.125 s at any rate, each output showing the frame then on screen."""
    src = np.arange(49)
    up = retime_frames(src, 8, 24)
    assert len(up) == 147 and list(up[:7]) == [0, 0, 0, 1, 1, 1, 2] and up[-1] == 48
    assert np.array_equal(retime_frames(src, 8, 8), src)
    ntsc = retime_frames(src, 8, 23.976)
    assert len(ntsc) == round(49 * 23.976 / 8) == 147
    assert list(ntsc[[0, 3, 4, 146]]) == [0, 1, 1, 48]
    down = retime_frames(np.arange(48), 24, 8)
    assert list(down) == list(range(0, 48, 3))
    assert len(retime_frames(np.arange(49), 8, 25)) == 153  # 6.125 s * 25 = 153.1


# --------------------------------------------------------------------------------------------
# Images


def test_fit_crop_mapping() -> None:
    """Centre crop to the model aspect; the mapping sends the kept box to the whole canvas."""
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    img.paste((255, 0, 0), (0, 0, 12, 50))  # a red band that the crop must cut away
    out, m = fit_target_image(img, (72, 48), "crop")
    assert out.size == (72, 48) and out.mode == "RGB"
    assert m.box == (12.5, 0.0, 87.5, 50.0) and m.offset == (0, 0)
    assert m.src_to_dst(12.5, 0) == (0, 0) and m.src_to_dst(87.5, 50) == pytest.approx((72, 48))
    assert m.dst_to_src(*m.src_to_dst(40, 20)) == pytest.approx((40, 20))
    assert np.asarray(out)[:, :2, 0].max() < 60
    assert m.to_dict()["box"] == [12.5, 0.0, 87.5, 50.0]


def test_fit_pad_mapping_and_modes() -> None:
    """Letterbox with black bars; RGBA/L/P inputs all come out RGB; alpha goes over black."""
    img = Image.new("RGBA", (100, 50), (200, 100, 50, 255))
    out, m = fit_target_image(img, (72, 48), "pad")
    a = np.asarray(out)
    assert m.offset == (0, 6) and m.scale_x == pytest.approx(0.72) and m.box == (0, 0, 100, 50)
    assert a[:6].max() == 0 and a[-6:].max() == 0 and tuple(a[24, 36]) == (200, 100, 50)
    assert m.src_to_dst(0, 0) == (0, 6) and m.src_to_dst(100, 50) == pytest.approx((72, 42))
    half = fit_target_image(Image.new("RGBA", (72, 48), (255, 255, 255, 0)), (72, 48))[0]
    assert np.asarray(half).max() == 0
    for mode in ("L", "P", "CMYK"):
        assert fit_target_image(Image.new(mode, (30, 20)), (72, 48))[0].mode == "RGB"
    with pytest.raises(MediaError, match="Unknown fit"):
        fit_target_image(img, (72, 48), "stretch")


def test_read_image_info(tmp_path: Path, clips: dict[str, Path]) -> None:
    """Size as displayed (EXIF orientation applied); non-images raise MediaError."""
    assert read_image_info(clips["image"]) == (W, H)
    rotated = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 30)).save(rotated, exif=exif)
    assert read_image_info(rotated) == (30, 40)
    assert fit_target_image(Image.open(rotated), (30, 40))[1].src_size == (30, 40)
    for name in ("text", "empty", "mp4_h264_24fps_aac"):
        with pytest.raises(MediaError):
            read_image_info(clips[name])
