"""`make demo`: start a backend, run the Blender half of the demo against it, draw the contact sheet, stop.

Run by the main venv's python. The backend is the tiny random model (or `--model DIR`) on a free loopback port
with a temporary data dir, so nothing of the user's is touched and no weights are needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw

from flexiact_backend.service.process import ServerProcess

HERE = Path(__file__).resolve().parent
TILE_H = 160
LABEL_W = 110


def video_frames(path: str | Path, count: int) -> list[Image.Image]:
    """`count` frames spread evenly over the clip (first and last included)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return [Image.fromarray(frames[i]) for i in picks]


def _tile(image: Image.Image) -> Image.Image:
    w = round(image.width * TILE_H / image.height)
    resample = Image.Resampling.NEAREST if image.height < TILE_H else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((w, TILE_H), resample)


def contact_sheet(target: str | Path, reference: str | Path, result: str | Path, out: Path, frames: int = 5) -> Path:
    """Rows: the target frame, frames of the reference clip, frames of the generated clip, each labelled."""
    rows = [("target", [_tile(Image.open(target))]),
            ("reference", [_tile(f) for f in video_frames(reference, frames)]),
            ("result", [_tile(f) for f in video_frames(result, frames)])]
    gap = 6
    width = LABEL_W + max(sum(t.width + gap for t in tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (width, len(rows) * (TILE_H + gap) + gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (label, tiles) in enumerate(rows):
        y = gap + r * (TILE_H + gap)
        draw.text((10, y + TILE_H // 2 - 6), label, fill=(230, 230, 230))
        x = LABEL_W
        for tile in tiles:
            sheet.paste(tile, (x, y))
            x += tile.width + gap
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blender-python", type=Path, required=True, help="python of a venv with the bpy module")
    p.add_argument("--zip", type=Path, required=True, help="the extension zip")
    p.add_argument("--model", type=Path, help="a real pipeline folder (default: the tiny random model)")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--frames", type=int, default=36)
    p.add_argument("--extract-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)

    start = time.perf_counter()
    shutil.rmtree(args.out / "flexiact", ignore_errors=True)  # this run's results replace the last run's
    with tempfile.TemporaryDirectory(prefix="flexiact-demo-") as data:
        server = ServerProcess(Path(data), model_dir=args.model)
        print(f"demo: starting the backend ({args.model or 'tiny model'}) at {server.url}, data in {data}", flush=True)
        with server:
            print(f"demo: backend ready after {time.perf_counter() - start:.1f} s", flush=True)
            cmd = [str(args.blender_python), str(HERE / "run_demo.py"), "--zip", str(args.zip), "--url", server.url,
                   "--out", str(args.out), "--frames", str(args.frames), "--extract-steps", str(args.extract_steps),
                   "--steps", str(args.steps)]
            code = subprocess.run(cmd).returncode
            if code:
                print(f"demo: the Blender part failed ({code}); backend log:\n{server.log_tail()}", file=sys.stderr)
                return code
    report = json.loads((args.out / "demo.json").read_text())
    sheet = contact_sheet(report["target"], report["reference"], report["video"], args.out / "contact-sheet.png")
    print(f"demo: wrote {report['blend']}, {report['video']} and {sheet}")
    for label, seconds in report["timings_s"].items():
        print(f"  {label:<22} {seconds:7.2f} s")
    print(f"demo: done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
