"""Every kind of clip an animator has (issue 15): made here with FFmpeg's own sources and encoders, checked by number.

Colours are compared with a stated tolerance, frames by the index each one shows (media_fixtures), geometry by
shape and by where the coded blocks land. No media file is committed.
"""

from __future__ import annotations

import struct
import subprocess
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from flexiact_backend.colour import hlg_inverse_oetf
from flexiact_backend.errors import MediaError, MediaTooLarge
from flexiact_backend.media import (VideoLimits, check_video_limits, classify, image_rgb, open_image, probe_video,
                                    read_clip)
from flexiact_backend.sequences import encode_sequence, find_frames, looks_like_sequence
from tests.media_fixtures import PLAYLISTS, H, OpenWatch, W, coded_frame, exr_bytes, make_clip, read_code

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "12", "-preset", "ultrafast"]
COLOURS = [(230, 20, 20), (128, 128, 128), (200, 150, 120), (30, 60, 200), (20, 200, 40), (250, 240, 60)]
"""Known SDR colours: saturated red, mid grey, skin, blue, green, yellow (one per patch of a 3 x 2 grid)."""


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], input=stdin, check=True)


def patches() -> np.ndarray:
    f = np.zeros((48, 96, 3), np.uint8)
    for i, c in enumerate(COLOURS):
        f[(i // 3) * 24:(i // 3 + 1) * 24, (i % 3) * 32:(i % 3 + 1) * 32] = c
    return f


def worst_patch_error(frame: np.ndarray) -> int:
    """Largest channel error over the centres of the colour patches (edges blur with chroma subsampling)."""
    errors = []
    for i, c in enumerate(COLOURS):
        y, x = (i // 3) * 24 + 12, (i % 3) * 32 + 16
        errors.append(np.abs(frame[y - 6:y + 6, x - 8:x + 8].astype(int) - np.array(c)).max())
    return int(max(errors))


def bt2100_hlg_signal(srgb8: np.ndarray) -> np.ndarray:
    """An HLG picture of SDR colours the way BT.2408 maps them (display light): BT.1886 SDR with white at
    203 cd/m², BT.709 to BT.2020 primaries, the inverse of the 1000 cd/m² HLG OOTF (luminance-based, BT.2100),
    then the HLG OETF. Written from the standards, independently of the decoder."""
    display = (srgb8.astype(np.float64) / 255.0) ** 2.4 * 203.0
    to2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])
    display = display @ to2020.T
    yd = display @ np.array([0.2627, 0.6780, 0.0593])
    ys = (yd / 1000.0) ** (1 / 1.2)
    scene = display / (1000.0 * np.maximum(ys, 1e-9) ** 0.2)[..., None]
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    scene = np.clip(scene, 0, 1)
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), a * np.log(np.maximum(12 * scene - b, 1e-9)) + c)


# --------------------------------------------------------------------------------------------
# Colour


def test_hlg_signal_helper_inverts_to_the_same_scene_light() -> None:
    """The test's own HLG encoder agrees with the decoder's inverse OETF (so the clip test measures the rest)."""
    v = bt2100_hlg_signal(patches())
    scene = hlg_inverse_oetf(v)
    assert np.all(np.abs(np.where(scene <= 1 / 12, np.sqrt(3 * scene), v) - v) < 1e-6)


def test_hlg_clip_tone_maps_to_the_sdr_colours(tmp_path: Path) -> None:
    """A 10-bit HEVC HLG BT.2020 clip made from known SDR colours decodes to them within 20/255 per channel."""
    signal = np.round(bt2100_hlg_signal(patches()) * 65535).astype("<u2")
    out = tmp_path / "hlg.mp4"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb48le", "-s", "96x48", "-r", "10", "-i", "-",
           "-vf", "scale=out_color_matrix=bt2020:out_range=tv,format=yuv420p10le,setparams=color_trc=arib-std-b67:"
           "color_primaries=bt2020:colorspace=bt2020nc:range=tv",
           "-c:v", "libx265", "-x265-params", "log-level=error:crf=4", "-color_trc", "arib-std-b67",
           "-colorspace", "bt2020nc", "-color_primaries", "bt2020", "-color_range", "tv", str(out),
           stdin=signal.tobytes() * 10)
    info = probe_video(out)
    assert info.colour == "hlg"
    frame = read_clip(out, 0.0, None, 1)[0]
    assert worst_patch_error(frame) <= 20
    naive = next(av.open(str(out)).decode(video=0)).to_ndarray(format="rgb24")  # what was decoded before
    assert worst_patch_error(naive) > 40


def test_pq_clip_made_by_zscale_tone_maps_to_the_sdr_colours(tmp_path: Path) -> None:
    """PQ made by FFmpeg's zscale (zimg) from SDR with white at 203 cd/m² comes back within 20/255."""
    out = tmp_path / "pq.mkv"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "96x48", "-r", "10", "-i", "-",
           "-vf", "zscale=rin=full:tin=bt709:pin=bt709:min=bt709:t=smpte2084:p=bt2020:m=bt2020nc:r=tv:npl=203,"
           "format=yuv420p10le", "-c:v", "libx265", "-x265-params", "log-level=error:crf=4",
           "-color_trc", "smpte2084", "-colorspace", "bt2020nc", "-color_primaries", "bt2020", str(out),
           stdin=patches().tobytes() * 10)
    assert probe_video(out).colour == "pq"
    assert worst_patch_error(read_clip(out, 0.0, None, 1)[0]) <= 20


@pytest.mark.parametrize("matrix, yuv_range, size", [("bt709", "tv", "96x48"), ("bt470bg", "tv", "1280x720"),
                                                     ("bt709", "pc", "96x48")])
def test_declared_matrix_and_range_are_honoured(tmp_path: Path, matrix: str, yuv_range: str, size: str) -> None:
    """A clip that declares the matrix opposite to the size-based guess, or full range, keeps its colours."""
    w, h = map(int, size.split("x"))
    frame = np.asarray(Image.fromarray(patches()).resize((w, h), Image.NEAREST))
    out = tmp_path / "tagged.mp4"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", size, "-r", "10", "-i", "-",
           "-vf", f"scale=out_color_matrix={matrix}:out_range={yuv_range},format=yuv444p",
           "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", "-colorspace", matrix,
           "-color_range", yuv_range, str(out), stdin=frame.tobytes() * 5)
    got = read_clip(out, 0.0, None, 1)[0]
    assert got.shape == (h, w, 3)
    assert worst_patch_error(np.asarray(Image.fromarray(got).resize((96, 48), Image.NEAREST))) <= 4


# --------------------------------------------------------------------------------------------
# Geometry


def test_anamorphic_clip_comes_out_with_square_pixels(tmp_path: Path) -> None:
    """48x48 stored with pixel aspect 4:3 is 64x48 on screen: probe says so and the code blocks land back."""
    src = make_clip(tmp_path / "square.mp4", 12, Fraction(12), H264)
    out = tmp_path / "anamorphic.mp4"
    ffmpeg("-i", str(src), "-vf", "scale=48:48:flags=neighbor,setsar=4/3", *H264, str(out))
    info = probe_video(out)
    assert (info.width, info.height) == (W, H)
    frames = read_clip(out, 0.0, None, 12)
    assert frames.shape == (12, H, W, 3)
    assert [read_code(f) for f in frames] == list(range(12))


def comb(frame: np.ndarray) -> float:
    """Combing: how much each row differs from its neighbours beyond how it differs from rows two away."""
    f = frame.astype(np.float64).mean(axis=-1)
    return float(np.abs(f[1:-1] - (f[:-2] + f[2:]) / 2).mean())


def test_interlaced_clip_is_deinterlaced(tmp_path: Path) -> None:
    """Fields of a fast-moving bar, woven into interlaced frames, show combing raw and none once decoded."""
    moving = np.zeros((50, 120, 160, 3), np.uint8)
    for i in range(50):
        moving[i, :, (i * 8) % 140:(i * 8) % 140 + 20] = 255
    out = tmp_path / "interlaced.mp4"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "160x120", "-r", "50", "-i", "-",
           "-vf", "tinterlace=mode=interleave_top,setfield=tff", "-c:v", "libx264", "-flags", "+ildct+ilme",
           "-x264opts", "tff=1", "-qp", "0", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out),
           stdin=moving.tobytes())
    assert probe_video(out).interlaced
    raw = next(av.open(str(out)).decode(video=0)).to_ndarray(format="rgb24")
    ours = read_clip(out, 0.0, None, 4)
    assert comb(raw) > 10
    assert max(comb(f) for f in ours) < comb(raw) / 4


# --------------------------------------------------------------------------------------------
# Alpha: one policy for video and images (composite over black)

HALF_RED = (200, 100, 50, 128)
OVER_BLACK = (100, 50, 25)  # 200 * 128/255 ...


@pytest.mark.parametrize("suffix, codec", [
    (".mov", ["-c:v", "png", "-pix_fmt", "rgba"]),
    (".mov", ["-c:v", "prores_ks", "-profile:v", "4444", "-pix_fmt", "yuva444p10le"]),
    (".mov", ["-c:v", "qtrle", "-pix_fmt", "argb"]),
    (".webm", ["-c:v", "libvpx-vp9", "-pix_fmt", "yuva420p", "-deadline", "realtime", "-crf", "4", "-b:v", "0"]),
])
def test_video_alpha_is_composited_over_black(tmp_path: Path, suffix: str, codec: list[str]) -> None:
    """PNG-in-mov, ProRes 4444, QuickTime Animation and VP9 alpha in WebM: colour x alpha over black."""
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:] = HALF_RED
    rgba[:, :32, 3] = 0  # the left half fully transparent, its colour (200, 100, 50) must not show
    out = tmp_path / f"alpha{suffix}"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgba", "-s", "64x48", "-r", "10", "-i", "-", *codec, str(out),
           stdin=rgba.tobytes() * 6)
    assert probe_video(out).alpha
    frame = read_clip(out, 0.0, None, 1)[0].astype(int)
    assert np.abs(frame[10:38, 40:60] - OVER_BLACK).max() <= 4
    assert frame[10:38, 4:28].max() <= 4


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_image_alpha_uses_the_same_policy(tmp_path: Path, mode: str) -> None:
    """RGBA and grey+alpha images: colour x alpha over black, as for video."""
    img = Image.new("RGBA", (8, 8), HALF_RED).convert(mode)
    path = tmp_path / "a.png"
    img.save(path)
    colour = np.asarray(img.convert("RGB"))[4, 4].astype(int)
    assert np.abs(image_rgb(path)[4, 4].astype(int) - colour * 128 / 255).max() <= 1


# --------------------------------------------------------------------------------------------
# Image modes


def test_sixteen_bit_grey_png_keeps_its_grey(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG of 25% / 75% grey is not clipped to white."""
    arr = np.full((8, 16), 16384, np.uint16)
    arr[:, 8:] = 49152
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = image_rgb(path).astype(int)
    assert abs(rgb[4, 2, 0] - 64) <= 1 and abs(rgb[4, 12, 1] - 191) <= 1


def test_palette_with_transparency_and_cmyk(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    assert image_rgb(tmp_path / "pal.png").max() == 0  # the transparent index shows the background
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(image_rgb(tmp_path / "cmyk.jpg")[4, 4].astype(int) - (255, 0, 0)).max() <= 8


# --------------------------------------------------------------------------------------------
# Classified by content; refusals that say what to do


def test_gif_with_frames_is_a_video_and_a_one_frame_gif_an_image(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "anim.gif", 10, Fraction(10), ["-c:v", "gif"])
    assert classify(clip) == ("video", "gif")
    info = probe_video(clip)
    assert info.frames == 10 and info.container == "gif"
    assert [read_code(f) for f in read_clip(clip, 0.0, None, 10)] == list(range(10))
    still = tmp_path / "still.gif"
    Image.fromarray(coded_frame(5)).save(still)
    assert classify(still) == ("image", "gif")


def test_name_does_not_decide(tmp_path: Path) -> None:
    """A PNG named .mp4 is an image; an mp4 named .png is a video (and is read)."""
    png = tmp_path / "x.mp4"
    Image.fromarray(coded_frame(1)).save(png, format="PNG")
    assert classify(png) == ("image", "png")
    with pytest.raises(MediaError, match="still image"):
        probe_video(png)
    mp4 = make_clip(tmp_path / "clip.mp4", 12, Fraction(12), H264)
    disguised = mp4.rename(tmp_path / "clip.png")
    assert classify(disguised) == ("video", "mp4") and probe_video(disguised).frames == 12


def test_refusals_say_what_to_do(tmp_path: Path) -> None:
    """Truncated, audio with cover art, single frame: each named, none shows a path."""
    clip = make_clip(tmp_path / "long.mp4", 48, Fraction(24), H264 + ["-movflags", "+faststart"])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size * 2 // 3])
    with pytest.raises(MediaError, match="incomplete") as exc:
        probe_video(cut)
    assert str(tmp_path) not in str(exc.value)
    cover = tmp_path / "cover.png"
    Image.fromarray(coded_frame(2)).save(cover)
    song = tmp_path / "song.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-i", str(cover), "-map", "0:a", "-map", "1:v", "-c:a", "aac",
           "-c:v", "png", "-disposition:v", "attached_pic", "-f", "mp4", str(song))
    with pytest.raises(MediaError, match="audio only"):
        probe_video(song)
    single = make_clip(tmp_path / "one.mp4", 1, Fraction(24), H264)
    with pytest.raises(MediaError, match="single frame.*target image"):
        probe_video(single)


def _bomb_png(path: Path, w: int, h: int) -> None:
    """A tiny PNG whose header claims w x h pixels (no need to hold them to test the refusal)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_gets_the_services_size_message(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    _bomb_png(path, 40000, 40000)
    with pytest.raises(MediaTooLarge, match=r"bomb.png: the image is 1600.0 megapixels; the limit is 178.957 megapixels") as e:
        open_image(path)
    assert "decompression" not in str(e.value).lower() and str(tmp_path) not in str(e.value)
    with pytest.raises(MediaTooLarge, match="limit is 10 megapixels"):
        open_image(path, max_pixels=10_000_000)


def test_video_limits_are_checked_from_the_probe(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", 24, Fraction(24), H264)
    info = probe_video(clip)
    check_video_limits(info, VideoLimits(W * H, 1.0, 24))
    for pixels, seconds, frames, fragment in [(W * H - 1, 10, 100, "megapixels"), (10**9, 0.5, 100, "s long"),
                                              (10**9, 10, 23, "frames")]:
        with pytest.raises(MediaTooLarge, match=fragment):
            check_video_limits(info, VideoLimits(pixels, seconds, frames))


# --------------------------------------------------------------------------------------------
# Only local files, only allow-listed containers: a playlist cannot make FFmpeg read another file

@pytest.mark.parametrize("name, text", PLAYLISTS)
def test_playlists_and_concat_lists_are_refused_without_reading_the_named_file(
        tmp_path: Path, name: str, text: str) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    target = make_clip(secret_dir / "private.mp4", 12, Fraction(12), H264)
    listing = tmp_path / name
    listing.write_text(text.format(target=target))
    watch = OpenWatch(secret_dir)
    try:
        for call in (probe_video, lambda p: read_clip(p, 0.0, None, 4)):
            with pytest.raises(MediaError, match="text file, not a video") as exc:
                call(listing)
            assert str(target) not in str(exc.value)
        assert watch.opened() == set()
        target.read_bytes()  # the watch itself works: a real read is seen
        assert watch.opened() == {"private.mp4"}
    finally:
        watch.close()


def test_a_pattern_or_url_is_not_expanded(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(coded_frame(i)).save(tmp_path / f"f{i:03d}.png")
    for spec in (tmp_path / "f%03d.png", "concat:" + str(tmp_path / "f000.png"), "file:" + str(tmp_path)):
        with pytest.raises(MediaError, match="no such file"):
            probe_video(spec)


# --------------------------------------------------------------------------------------------
# Decode only what the trim needs


@pytest.mark.parametrize("name", ["gop.mp4", "gop.ts", "gop.mkv"])
def test_seek_on_a_long_gop_clip_keeps_exact_frames(tmp_path: Path, name: str) -> None:
    """Keyframes every 10 frames; trims that start mid-GOP still pick floor(t * fps) exactly."""
    clip = make_clip(tmp_path / name, 200, Fraction(25), H264 + ["-g", "10", "-bf", "2"])
    for start, end, n in [(3.3, 5.1, 9), (7.0, 8.0, 25), (0.04, 0.6, 7)]:
        got = [read_code(f) for f in read_clip(clip, start, end, n)]
        exact = [int(Fraction(repr(start)) * 25 + i * (Fraction(repr(end)) - Fraction(repr(start))) * 25 / n)
                 for i in range(n)]
        assert got == exact


# --------------------------------------------------------------------------------------------
# Image sequences


def _png_sequence(folder: Path, n: int, first: int = 1, prefix: str = "shot_") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(coded_frame(i)).save(folder / f"{prefix}{first + i:04d}.png")
    return folder


@pytest.mark.parametrize("spec", ["{d}", "{d}/shot_####.png", "{d}/shot_%04d.png", "{d}/shot_0007.png"])
def test_sequence_by_folder_pattern_or_numbered_file(tmp_path: Path, spec: str) -> None:
    d = _png_sequence(tmp_path / "render", 24, first=5)
    path = Path(spec.format(d=d))
    assert looks_like_sequence(path) is (not path.is_file())
    info = encode_sequence(path, 12, tmp_path / "ref.avi")
    assert (info.frames, info.fps, info.duration_s, info.width, info.height) == (24, 12.0, 2.0, W, H)
    assert [read_code(f) for f in read_clip(tmp_path / "ref.avi", 0.5, 1.5, 12)] == list(range(6, 18))


def test_sequence_gap_names_the_missing_frame(tmp_path: Path) -> None:
    d = _png_sequence(tmp_path / "render", 10)
    (d / "shot_0004.png").unlink()
    with pytest.raises(MediaError, match=r"frame 4 \(shot_0004.png\) is missing between shot_0003.png and shot_0005"):
        find_frames(d)


def test_sequence_refusals(tmp_path: Path) -> None:
    d = _png_sequence(tmp_path / "two", 3)
    _png_sequence(d, 3, prefix="other_")
    with pytest.raises(MediaError, match="more than one sequence"):
        find_frames(d)
    with pytest.raises(MediaError, match="one frame is not a clip"):
        find_frames(_png_sequence(tmp_path / "one", 1))
    odd = _png_sequence(tmp_path / "sizes", 3)
    Image.new("RGB", (10, 10)).save(odd / "shot_0002.png")
    with pytest.raises(MediaError, match="shot_0002.png is 10x10"):
        encode_sequence(odd, 24, tmp_path / "x.avi")
    assert not (tmp_path / "x.avi").exists() and not list(tmp_path.glob(".x.*"))


def test_exr_is_scene_linear_to_srgb(tmp_path: Path) -> None:
    """Linear 0.18 (photographic mid grey) is sRGB 118; 1.0 and above are white; 0.0 black."""
    lin = np.zeros((8, 24, 3), np.float32)
    lin[:, 8:16] = 0.18
    lin[:, 16:] = 4.0
    path = tmp_path / "f.exr"
    path.write_bytes(exr_bytes(lin))
    rgb = image_rgb(path).astype(int)
    assert rgb[4, 2].tolist() == [0, 0, 0] and rgb[4, 20].tolist() == [255, 255, 255]
    assert np.abs(rgb[4, 12] - 118).max() <= 1


def test_zip_of_exr_frames(tmp_path: Path) -> None:
    """A zip (the API's upload) of EXR frames is classified as a zip and read in numeric order."""
    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(12):  # 0 and 1 are the same in linear and sRGB, so the code blocks survive exactly
            z.writestr(f"render/frame_{i + 1:03d}.exr", exr_bytes(coded_frame(i).astype(np.float32) / 255.0))
    assert classify(archive) == ("zip", "zip")
    info = encode_sequence(archive, 24, tmp_path / "ref.avi")
    assert info.frames == 12
    frames = read_clip(tmp_path / "ref.avi", 0.0, None, 12)
    assert [read_code(f) for f in frames] == list(range(12))
    assert np.abs(frames[3].astype(int) - coded_frame(3)).max() <= 1


@pytest.mark.parametrize("fmt, suffix", [("TIFF", "tif"), ("JPEG", "jpg")])
def test_tiff_and_jpeg_sequences(tmp_path: Path, fmt: str, suffix: str) -> None:
    d = tmp_path / fmt
    d.mkdir()
    for i in range(6):
        Image.fromarray(coded_frame(i)).save(d / f"f{i}.{suffix}", format=fmt)
    encode_sequence(d, 6, tmp_path / "ref.avi")
    assert [read_code(f) for f in read_clip(tmp_path / "ref.avi", 0.0, None, 6)] == list(range(6))


@pytest.mark.parametrize("name, codec, fmt", [
    ("clip.mts", H264 + ["-f", "mpegts", "-mpegts_m2ts_mode", "1"], "m2ts"),
    ("clip.ts", H264 + ["-f", "mpegts"], "ts"),
    ("clip.mxf", ["-c:v", "mpeg2video", "-q:v", "2", "-pix_fmt", "yuv422p", "-f", "mxf"], "mxf"),
    ("clip.3gp", H264 + ["-f", "3gp"], "3gp"),
])
def test_camera_and_broadcast_containers(tmp_path: Path, name: str, codec: list[str], fmt: str) -> None:
    """AVCHD (.mts, 192-byte packets), MPEG-TS, MXF and 3GP, the files a picker by name refused, are read."""
    clip = make_clip(tmp_path / name, 25, Fraction(25), codec)
    assert classify(clip) == ("video", fmt)
    assert [read_code(f) for f in read_clip(clip, 0.2, 0.84, 8)] == [5, 7, 9, 11, 13, 15, 17, 19]
