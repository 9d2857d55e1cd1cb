"""Synthetic clips for the media tests, made with the bundled ffmpeg.

Every frame carries its own index as an 8-bit block code, so a test can read back exactly which
source frame a decoder returned; a red stripe marks the top and a green stripe the left edge, so
a test can tell which way a rotated clip points.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

W, H = 64, 48
_BLOCK_W, _BLOCK_H = 14, 20  # 4 x 2 code blocks in the area x 8..64, y 8..48


def _block(bit: int) -> tuple[slice, slice]:
    row, col = divmod(bit, 4)
    y0, x0 = 8 + row * _BLOCK_H, 8 + col * _BLOCK_W
    return slice(y0, y0 + _BLOCK_H), slice(x0, x0 + _BLOCK_W)


def coded_frame(index: int) -> np.ndarray:
    """A 64x48 RGB frame showing `index` (0..255) as white/black blocks, red top, green left."""
    f = np.zeros((H, W, 3), np.uint8)
    f[:6, :, 0] = 255
    f[6:, :6, 1] = 255
    for bit in range(8):
        if index >> bit & 1:
            f[_block(bit)] = 255
    return f


def read_code(frame: np.ndarray) -> int:
    """The index a (decoded, upright, unscaled) coded frame shows; robust to lossy codecs."""
    value = 0
    for bit in range(8):
        ys, xs = _block(bit)
        centre = frame[ys.start + 5:ys.stop - 5, xs.start + 4:xs.stop - 4]
        if centre.mean() > 128:
            value |= 1 << bit
    return value


def make_clip(
    path: Path,
    n: int,
    rate: Fraction,
    codec_args: list[str],
    audio: list[str] | None = None,
    vf: str | None = None,
) -> Path:
    """Encode `n` coded frames at `rate` into `path` (container from the suffix).

    `audio` adds a lavfi sine input encoded with those args; `vf` is a filter (e.g. setpts for
    variable frame rate, written with passthrough timing).
    """
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-r", str(rate), "-i", "-"]
    if audio is not None:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={float(n / rate):.3f}"]
        cmd += ["-map", "0:v", "-map", "1:a"] + audio
    if vf is not None:
        cmd += ["-vf", vf, "-fps_mode", "passthrough"]
    cmd += codec_args + [str(path)]
    data = b"".join(coded_frame(i).tobytes() for i in range(n))
    subprocess.run(cmd, input=data, check=True)
    return path


def remux(src: Path, dst: Path, pre_input: list[str]) -> Path:
    """Stream-copy `src` to `dst` with input options such as `-display_rotation 90`."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                    *pre_input, "-i", str(src), "-c", "copy", str(dst)], check=True)
    return dst


PLAYLISTS = [
    ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n"),
    ("list.mp4", "#EXTM3U\n#EXTINF:10.0,\nfile://{target}\n#EXT-X-ENDLIST\n"),
    ("concat.txt", "ffconcat version 1.0\nfile '{target}'\n"),
]
"""(file name, text) of an HLS playlist, one disguised as mp4, and an FFmpeg concat list, each naming `target`."""

IN_OPEN, IN_ACCESS = 0x20, 0x01


class OpenWatch:
    """inotify on a folder: which of its files any process opened while the watch was up."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN | IN_ACCESS) >= 0

    def opened(self) -> set[str]:
        names = set()
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return names
        i = 0
        while i < len(data):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, i)
            names.add(data[i + 16:i + 16 + length].rstrip(b"\0").decode())
            i += 16 + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def exr_bytes(linear: np.ndarray) -> bytes:
    """One OpenEXR file (float RGB) encoded by FFmpeg from a linear [H, W, 3] array."""
    planes = np.ascontiguousarray(linear.astype(np.float32)[..., [1, 2, 0]].transpose(2, 0, 1))  # G, B, R
    h, w = linear.shape[:2]
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "gbrpf32le", "-s", f"{w}x{h}",
                           "-i", "-", "-c:v", "exr", "-f", "image2pipe", "-"],
                          input=planes.tobytes(), stdout=subprocess.PIPE, check=True).stdout
