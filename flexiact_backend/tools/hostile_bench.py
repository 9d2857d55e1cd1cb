"""Hostile uploads against a real server: what each one costs it, in memory and in /v1/health latency.

Why: no small upload may freeze or exhaust the backend (issue 22). Each input here is built in memory, a few
kilobytes, crafted to make a careless server decode gigabytes, backtrack for minutes or index millions of
packets. `measure` sends one while another thread polls /v1/health, and reports the server's peak RSS rise
and the slowest health answer meanwhile. `bench hostile` prints these figures for every input; the tests
assert only generous bounds on them.
"""

from __future__ import annotations

import io
import struct
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..media import write_mp4
from ..service.process import ServerProcess
from .serve_bench import Client, png_bytes

#: The limits the hostile server runs with: small, so that each input is far past them yet only kilobytes.
HOSTILE_ARGS = ("--max-image-pixels", "1000000", "--max-sequence-pixels", "20000000", "--max-zip-entries", "100",
                "--max-uploads-per-token", "1", "--max-uploads", "2")
#: A poll of /v1/health every this many seconds while a hostile request runs.
POLL_S = 0.05


# ---- crafted inputs ------------------------------------------------------------------------------

def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds one row of them: its header is all a check may read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = zlib.compress(b"\x00" + b"\x00" * (3 * w))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def tiff_bytes(w: int, h: int) -> bytes:
    """A real w x h TIFF of zeros, deflate-compressed: kilobytes on disk, w*h bytes decoded."""
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def exr_header(w: int, h: int) -> bytes:
    """An OpenEXR header whose dataWindow is w x h (half RGB, no compression) and no pixels."""
    def attr(name: str, kind: str, value: bytes) -> bytes:
        return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value
    channels = b"".join(c + b"\0" + struct.pack("<iB3xii", 1, 0, 1, 1) for c in (b"B", b"G", b"R")) + b"\0"
    box = struct.pack("<iiii", 0, 0, w - 1, h - 1)
    return (b"\x76\x2f\x31\x01" + struct.pack("<I", 2) + attr("channels", "chlist", channels)
            + attr("compression", "compression", b"\0") + attr("dataWindow", "box2i", box)
            + attr("displayWindow", "box2i", box) + attr("lineOrder", "lineOrder", b"\0")
            + attr("pixelAspectRatio", "float", struct.pack("<f", 1.0))
            + attr("screenWindowCenter", "v2f", struct.pack("<ff", 0, 0))
            + attr("screenWindowWidth", "float", struct.pack("<f", 1.0)) + b"\0")


def zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def frames_zip(n: int = 3, size: tuple[int, int] = (48, 32)) -> bytes:
    """A good sequence: n numbered PNG frames."""
    return zip_of([(f"shot_{i + 1:04d}.png", png_bytes(i, size)) for i in range(n)], zipfile.ZIP_STORED)


def gradient_zip(n: int, size: tuple[int, int]) -> bytes:
    """A legitimate sequence within the limits that takes real work: n smooth w x h PNG frames (kilobytes each)."""
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    members = []
    for i in range(n):
        frame = np.broadcast_to((ramp + 3 * i) % 256, (h, w, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
        members.append((f"legit_{i + 1:04d}.png", buf.getvalue()))
    return zip_of(members, zipfile.ZIP_STORED)


def with_method(data: bytes, method: int, flags: int = 0) -> bytes:
    """A zip whose every member claims compression `method` and general-purpose `flags` (both headers)."""
    out = bytearray(data)
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = out.find(sig)
        while at >= 0:
            struct.pack_into("<HH", out, at + flag_at, flags, method)
            at = out.find(sig, at + 4)
    return bytes(out)


def bad_crc_zip() -> bytes:
    """A sequence zip whose first frame's bytes no longer match their checksum."""
    out = bytearray(frames_zip())
    at = out.find(b"IDAT")
    out[at + 12] ^= 0xFF
    return bytes(out)


def zip64_claiming(entries: int) -> bytes:
    """A small zip whose ZIP64 end record says it holds `entries` entries (a million-entry bomb's directory)."""
    data = bytearray(frames_zip(2))
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[eocd + 12:eocd + 20])
    record = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, entries, entries, entries * 80, cd_offset)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, eocd, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(data[:eocd]) + record + locator + end


def many_entries_zip(n: int) -> bytes:
    """A real zip of n empty members (no frames)."""
    return zip_of([(f"e{i}", b"") for i in range(n)], zipfile.ZIP_STORED)


def digits_zip() -> bytes:
    """Member names a backtracking frame-number pattern chokes on: long runs of digits, then one frame whose
    number has a thousand digits."""
    names = [("7" * 1000 + f"x{i}", b"") for i in range(60)]
    return zip_of(names + [("f" + "1" * 1000 + ".png", png_bytes(1))], zipfile.ZIP_STORED)


def long_name_zip() -> bytes:
    return zip_of([("1" * 60_000 + ".png", png_bytes(1)), ("1" * 59_999 + "2.png", png_bytes(2))],
                  zipfile.ZIP_STORED)


def _mp4(folder: Path) -> bytearray:
    n, (w, h) = 24, (64, 48)
    frames = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t, :, t * 2:t * 2 + 8] = 255
    path = folder / "clip.mp4"
    write_mp4(path, frames, 24)
    return bytearray(path.read_bytes())


def mp4_declaring_samples(folder: Path, samples: int) -> bytes:
    """A real mp4 whose `stsz` says every sample has one size and there are `samples` of them."""
    data = _mp4(folder)
    at = data.find(b"stsz") + 4
    struct.pack_into(">III", data, at, 0, 100, samples)
    return bytes(data)


def mp4_with_edits(folder: Path, edits: int) -> bytes:
    """A real mp4 whose edit list declares `edits` entries (a player repeats the media once per entry)."""
    data = _mp4(folder)
    at = data.find(b"elst") + 4
    struct.pack_into(">I", data, at + 4, edits)
    return bytes(data)


def mp4_zero_matrix(folder: Path) -> bytes:
    """A real mp4 whose track header's display matrix is all zeros (no rotation can be read from it)."""
    data = _mp4(folder)
    at = data.find(b"tkhd") + 4
    matrix_at = at + (52 if data[at] == 1 else 40)
    data[matrix_at:matrix_at + 36] = bytes(36)
    return bytes(data)


def mp4_nested_boxes(depth: int) -> bytes:
    """An mp4 of nothing but `depth` movie boxes, each inside the last (a recursive walker's stack bomb)."""
    inner = b""
    for _ in range(depth):
        inner = struct.pack(">I4s", 8 + len(inner), b"moov") + inner
    return b"\0\0\0\x14ftypisom\0\0\0\0isom" + inner


def avi_with_dropped_frames(folder: Path) -> bytes:
    """An AVI whose writer dropped frames 3 and 4 (empty chunks in their place, as capture tools write)."""
    path = folder / "dropped.avi"
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in (0, 1, 2, 5, 6, 7, 8, 9):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 24)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


def garbage_tiff() -> bytes:
    return b"II*\x00" + b"\xff\xff\xff\x7f" + b"\x00" * 40


# ---- measuring -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One hostile request: how to build its body, how it is sent, and what the server must answer."""

    name: str
    build: Callable[[Path], bytes]
    content_type: str
    filename: str
    query: str = ""
    status: int = 422
    message: str = ""


CASES = (
    Case("digit_names", lambda d: digits_zip(), "application/zip", "digits.zip", "?fps=24", 422, "has 1000 digits"),
    Case("long_name", lambda d: long_name_zip(), "application/zip", "long.zip", "?fps=24", 422,
         "characters long; the limit is 1024"),
    Case("png_7000", lambda d: png_header(7000, 7000), "image/png", "big.png", "", 413, "7000x7000 = 49.0 megapixels"),
    Case("tiff_4000", lambda d: tiff_bytes(4000, 4000), "image/tiff", "big.tif", "", 413, "4000x4000"),
    Case("exr_7000", lambda d: exr_header(7000, 7000), "image/x-exr", "big.exr", "", 413, "7000x7000"),
    Case("seq_exr_7000", lambda d: zip_of([(f"f_{i:03d}.exr", exr_header(7000, 7000)) for i in range(3)]),
         "application/zip", "exr.zip", "?fps=24", 413, "f_000.exr: the frame is 7000x7000"),
    Case("seq_png_7000", lambda d: zip_of([(f"f_{i:03d}.png", png_header(7000, 7000)) for i in range(3)]),
         "application/zip", "png.zip", "?fps=24", 413, "f_000.png: the frame is 7000x7000"),
    Case("seq_budget", lambda d: zip_of([(f"f_{i:03d}.png", png_header(1000, 1000)) for i in range(30)]),
         "application/zip", "budget.zip", "?fps=24", 413, "30 frames of 1000x1000 = 30,000,000 pixels"),
    Case("heavy_legit_sequence", lambda d: gradient_zip(60, (640, 360)), "application/zip", "legit.zip", "?fps=24",
         201, ""),
    Case("zip64_million", lambda d: zip64_claiming(1_000_000), "application/zip", "million.zip", "?fps=24", 413,
         "holds 1000000 entries"),
    Case("zip_101_entries", lambda d: many_entries_zip(101), "application/zip", "many.zip", "?fps=24", 413,
         "holds 101 entries"),
    Case("bad_crc", lambda d: bad_crc_zip(), "application/zip", "crc.zip", "?fps=24", 422, "checksum does not match"),
    Case("encrypted", lambda d: with_method(frames_zip(), zipfile.ZIP_STORED, 0x1), "application/zip", "enc.zip",
         "?fps=24", 422, "is encrypted"),
    Case("deflate64", lambda d: with_method(frames_zip(), 9), "application/zip", "d64.zip", "?fps=24", 422,
         "compressed with Deflate64"),
    Case("aes", lambda d: with_method(frames_zip(), 99, 0x1), "application/zip", "aes.zip", "?fps=24", 422,
         "compressed with AES encryption"),
    Case("tiny_fps", lambda d: frames_zip(), "application/zip", "slow.zip", "?fps=0.003", 422,
         "fps: Input should be greater than or equal to 1"),
    Case("no_frames_zip", lambda d: zip_of([("notes.txt", b"hello")]), "application/zip", "notes.zip", "?fps=24",
         422, "holds no numbered image frames"),
    Case("tiff_garbage", lambda d: garbage_tiff(), "image/tiff", "junk.tif", "", 422, "junk.tif: not an image file"),
    Case("seq_tiff_garbage", lambda d: zip_of([(f"f_{i}.tif", garbage_tiff()) for i in range(2)]),
         "application/zip", "junk.zip", "?fps=24", 422, "f_0.tif: not an image file"),
    Case("mp4_50M_samples", lambda d: mp4_declaring_samples(d, 50_000_000), "video/mp4", "samples.mp4", "", 413,
         "declares 50000000 samples"),
    Case("mp4_5000_edits", lambda d: mp4_with_edits(d, 5000), "video/mp4", "edits.mp4", "", 422,
         "edit list of 5000 entries"),
    Case("mp4_nested_boxes", lambda d: mp4_nested_boxes(5000), "video/mp4", "nested.mp4", "", 422,
         "boxes nested more than 12 deep"),
    Case("mp4_zero_matrix", mp4_zero_matrix, "video/mp4", "matrix.mp4", "", 201, ""),
    Case("avi_dropped", avi_with_dropped_frames, "video/x-msvideo", "dropped.avi", "", 201, ""),
)


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Watch:
    """While open: /v1/health polled every POLL_S, the server's resident memory sampled. On close: the peak
    RSS rise over the start (the kernel's high-water mark, reset at the start where allowed) and the slowest
    health answer."""

    def __init__(self, client: Client, pid: int) -> None:
        self.client, self.pid = client, pid
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._peak = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Watch:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.base = _rss_kib(self.pid)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _body = self.client.request("GET", "/v1/health", timeout=30)
                if status != 200:
                    self.failures.append(f"health {status}")
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append(time.perf_counter() - t0)
            self._peak = max(self._peak, _rss_kib(self.pid))
            self._stop.wait(POLL_S)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_kib(self.pid), _rss_kib(self.pid, "VmHWM"))

    @property
    def rss_rise_mb(self) -> float:
        return max(0, self._peak - self.base) / 1024

    @property
    def health_max_ms(self) -> float:
        return max(self.latencies, default=0.0) * 1000


def measure(client: Client, pid: int, case: Case, folder: Path) -> dict:
    """Send one case while watching the server; its answer and what it cost."""
    body = case.build(folder)
    with Watch(client, pid) as watch:
        t0 = time.perf_counter()
        status, answer = client.request("POST", "/v1/files" + case.query, data=body,
                                        headers={"Content-Type": case.content_type, "X-Filename": case.filename})
        seconds = time.perf_counter() - t0
        time.sleep(2 * POLL_S)  # one more health poll after the answer
    message = answer.get("error", {}).get("message", "") if isinstance(answer, dict) else str(answer)[:200]
    return {"bytes": len(body), "status": status, "message": message, "seconds": round(seconds, 3),
            "rss_rise_mb": round(watch.rss_rise_mb, 1), "health_max_ms": round(watch.health_max_ms, 1),
            "health_polls": len(watch.latencies), "health_failures": len(watch.failures), "answer": answer}


def bench_hostile(token: str = "hostile-bench") -> dict:
    """Every case against a fresh tiny server on loopback with `HOSTILE_ARGS`."""
    with tempfile.TemporaryDirectory(prefix="flexiact-hostile-") as tmp:
        with ServerProcess(Path(tmp) / "data", token=token, extra_args=HOSTILE_ARGS) as server:
            assert server.proc is not None
            client = Client(server.url, token)
            results = {}
            for case in CASES:
                r = measure(client, server.proc.pid, case, Path(tmp))
                r.pop("answer")
                r["expected"] = case.status
                results[case.name] = r
    return {"server_args": list(HOSTILE_ARGS), "poll_s": POLL_S, "results": results}


def format_table(report: dict) -> str:
    keys = ("bytes", "status", "expected", "seconds", "rss_rise_mb", "health_max_ms", "health_polls")
    rows = [(name, *(str(r[k]) for k in keys)) for name, r in report["results"].items()]
    header = ("input", *keys)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
