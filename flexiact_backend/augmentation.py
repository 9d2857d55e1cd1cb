"""FAE training augmentation: how a reference trim becomes training clips.

- Tempo: the trim is sampled at the model's frame rate, so a motion is learned at its real speed. A trim longer
  than the model's clip gives windows of the model's length (a bounded set per crop, each encoded once); a
  shorter one is resampled to the model's frames and the action records how long the motion really lasts.
- Space: random crop boxes of exactly the model's aspect, then a resize, so nothing is ever stretched; the
  random scale and position keep the embedding from memorising the reference layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

#: Smallest crop area, as a fraction of the largest box of the model's aspect that fits the frame.
MIN_CROP_AREA = 0.6


@dataclass(frozen=True)
class CropBox:
    """One spatial crop in decoded (upright) source pixels; w/h is exactly the model's aspect."""

    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class TrimSampling:
    """Which frames a trim gives the model and how long the motion they show really lasts.

    `num_frames` frames are read over [start_s, end_s) (one every 1/fps for a windowed trim); `duration_s` is
    what the action records: the trim's length when it is resampled, the model's clip length when windowed.
    """

    start_s: float
    end_s: float
    num_frames: int
    duration_s: float
    windowed: bool


def plan_sampling(start: Fraction, end: Fraction, model_frames: int, model_fps: float) -> TrimSampling:
    """Sample [start, end) at the model's rate when it holds at least one model clip, else resample it.

    The windowed span is shortened to a whole number of frames at the model's rate, so frames are exactly
    1/fps apart (the authors take frames at about the model's 8 fps).
    """
    fps = Fraction(repr(float(model_fps)))
    at_rate = math.floor((end - start) * fps)
    if at_rate >= model_frames:
        return TrimSampling(float(start), float(start + at_rate / fps), at_rate, float(model_frames / fps), True)
    return TrimSampling(float(start), float(end), model_frames, float(end - start), False)


def window_starts(num_frames: int, window: int, count: int, rng: np.random.Generator) -> list[int]:
    """Up to `count` distinct random starts of `window`-frame windows in a `num_frames` clip, ascending."""
    positions = num_frames - window + 1
    if positions < 1:
        raise ValueError(f"a {num_frames}-frame clip holds no {window}-frame window")
    if positions <= count:
        return list(range(positions))
    return sorted(int(s) for s in rng.choice(positions, size=count, replace=False))


def crop_boxes(frame_size: tuple[int, int], count: int, size: tuple[int, int], seed: int) -> list[CropBox]:
    """`count` seeded boxes of the aspect of `size` (w, h) inside a frame of `frame_size` (w, h).

    Each box is the largest one of that aspect that fits, shrunk to an area fraction U(MIN_CROP_AREA, 1)
    and placed uniformly at random.
    """
    fw, fh = frame_size
    aspect = size[0] / size[1]
    full_w = min(fw, fh * aspect)
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        w = full_w * math.sqrt(rng.uniform(MIN_CROP_AREA, 1.0))
        h = w / aspect
        boxes.append(CropBox(x=float(rng.uniform(0, fw - w)), y=float(rng.uniform(0, fh - h)), w=w, h=h))
    return boxes


def crop_frames(frames: np.ndarray, box: CropBox, size: tuple[int, int]) -> np.ndarray:
    """The same box cut from every frame of uint8 [T, H, W, 3] and resized to `size` (w, h), sub-pixel exact."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    region = (box.x, box.y, box.x + box.w, box.y + box.h)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.LANCZOS, box=region)) for f in frames])
