"""Training augmentation: crops keep the model's aspect, trims are taken at the model's rate, windows are bounded."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from flexiact_backend.augmentation import MIN_CROP_AREA, crop_boxes, crop_frames, plan_sampling, window_starts

TINY = (9, 8.0)  # frames, fps: a 1.125 s clip
REAL = (49, 8.0)  # a 6.125 s clip


@pytest.mark.parametrize("frame_size", [(160, 90), (90, 160), (64, 48), (96, 64), (1920, 1080)])
def test_crop_boxes_keep_the_model_aspect(frame_size: tuple[int, int]) -> None:
    """No box is stretched by more than 1% on its way to the model's size; boxes are in bounds and vary."""
    size = (72, 48)
    boxes = crop_boxes(frame_size, 200, size, seed=3)
    fw, fh = frame_size
    full_w = min(fw, fh * 1.5)
    for b in boxes:
        assert 0 <= b.x and b.x + b.w <= fw + 1e-9 and 0 <= b.y and b.y + b.h <= fh + 1e-9
        sx, sy = size[0] / b.w, size[1] / b.h
        assert abs(sx / sy - 1) <= 0.01
        assert MIN_CROP_AREA * full_w**2 * (1 - 1e-9) <= b.w**2 <= full_w**2 * (1 + 1e-9)
    areas = [b.w**2 / full_w**2 for b in boxes]
    assert min(areas) < 0.65 and max(areas) > 0.95  # the scale jitter spans its range
    assert crop_boxes(frame_size, 12, size, seed=3) == boxes[:12]
    assert crop_boxes(frame_size, 12, size, seed=4) != boxes[:12]


def test_crops_do_not_stretch_a_circle() -> None:
    """A disc in a 16:9 frame comes out of every 3:2 crop as a disc (second moments equal within 2%)."""
    y, x = np.mgrid[0:360, 0:640]
    frame = (((x - 320) ** 2 + (y - 180) ** 2 <= 50**2) * 255).astype(np.uint8)
    frames = np.repeat(np.stack([frame] * 3, axis=-1)[None], 2, axis=0)
    size = (300, 200)
    for box in crop_boxes((640, 360), 12, size, seed=1):
        out = crop_frames(frames, box, size)
        assert out.shape == (2, 200, 300, 3) and out.dtype == np.uint8
        ys, xs = np.nonzero(out[1, :, :, 0] > 127)
        assert abs(xs.std() / ys.std() - 1) < 0.02
        ref = Image.fromarray(frames[0]).resize(size, Image.LANCZOS, box=(box.x, box.y, box.x + box.w, box.y + box.h))
        assert np.array_equal(out[0], np.asarray(ref))


@pytest.mark.parametrize("start, end, model, expected", [
    ("0", "0.5", TINY, (0.5, 9, 0.5, False)),  # shorter than the clip: resampled, real duration kept
    ("1", "4", TINY, (4.0, 24, 1.125, True)),  # 3 s: 24 frames at 8 fps, windows of 1.125 s
    ("0", "1.2", TINY, (1.125, 9, 1.125, True)),  # just over one clip: exactly one window at the model's rate
    ("0", "3", REAL, (3.0, 49, 3.0, False)),
    ("0.25", "10.3", REAL, (10.25, 80, 6.125, True)),
])
def test_plan_sampling(start: str, end: str, model: tuple[int, float], expected: tuple) -> None:
    plan = plan_sampling(Fraction(start), Fraction(end), *model)
    assert (plan.end_s, plan.num_frames, plan.duration_s, plan.windowed) == pytest.approx(expected)
    assert plan.start_s == float(Fraction(start))
    if plan.windowed:  # frames exactly one model frame apart
        assert (plan.end_s - plan.start_s) / plan.num_frames == pytest.approx(1 / model[1])


def test_window_starts_bounded_distinct_in_range() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        starts = window_starts(80, 49, 4, rng)
        assert len(starts) == 4 == len(set(starts)) and starts == sorted(starts)
        assert all(0 <= s <= 80 - 49 for s in starts)
        seen.update(starts)
    assert len(seen) > 20  # windows are spread over the whole trim
    assert window_starts(10, 9, 4, rng) == [0, 1]
    assert window_starts(9, 9, 4, rng) == [0]
    with pytest.raises(ValueError):
        window_starts(8, 9, 4, rng)
