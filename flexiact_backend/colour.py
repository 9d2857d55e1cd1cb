"""Colour transforms the decoder needs beyond swscale's matrix and range: HDR to SDR, scene-linear to sRGB, alpha.

The model was trained on ordinary BT.709 SDR video, so every reference ends up as 8-bit BT.709 R'G'B'.

HDR (BT.2100) to SDR, display-referred as in ITU-R BT.2408: the signal is turned into display light
(PQ: its EOTF in cd/m²; HLG: inverse OETF then the OOTF of a 1000 cd/m² display, system gamma 1.2), SDR
reference white is 203 cd/m² (BT.2408's HDR reference white), the BT.2020 primaries are converted to BT.709
in linear light, anything brighter than `KNEE` of SDR white is rolled off smoothly towards white (hue kept: the
three channels are scaled together), and the result is encoded for a BT.1886 display (gamma 2.4), the display
SDR video is made for; BT.2020 SDR goes through the same path without the tone curve.
"""

from __future__ import annotations

import numpy as np

SDR_WHITE_NITS = 203.0
"""HDR luminance shown as SDR white (BT.2408 reference white)."""

HLG_PEAK_NITS = 1000.0
"""Nominal peak of the HLG display whose OOTF defines display light (BT.2100 reference)."""

KNEE = 0.9
"""Linear SDR level above which highlights are compressed; below it HDR maps to SDR unchanged."""

_BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                             [-0.1246, 1.1329, -0.0083],
                             [-0.0182, -0.1006, 1.1187]], np.float32)
"""Linear-light BT.2020 RGB to BT.709 RGB (ITU-R BT.2087)."""

_HLG_A, _HLG_B, _HLG_C = 0.17883277, 0.28466892, 0.55991073
_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32


def hlg_inverse_oetf(v: np.ndarray) -> np.ndarray:
    """HLG signal [0, 1] to normalised scene light [0, 1] (BT.2100 table 5)."""
    v = np.clip(v, 0.0, 1.0)
    return np.where(v <= 0.5, v * v / 3.0, (np.exp((v - _HLG_C) / _HLG_A) + _HLG_B) / 12.0)


def pq_eotf(v: np.ndarray) -> np.ndarray:
    """PQ signal [0, 1] to display light in cd/m² (SMPTE ST 2084)."""
    p = np.power(np.clip(v, 0.0, 1.0), 1.0 / _PQ_M2)
    return 10000.0 * np.power(np.maximum(p - _PQ_C1, 0.0) / (_PQ_C2 - _PQ_C3 * p), 1.0 / _PQ_M1)


def bt1886_eotf(v: np.ndarray) -> np.ndarray:
    """SDR signal to display light relative to white (ITU-R BT.1886 with a zero black level: gamma 2.4)."""
    return np.power(np.clip(v, 0.0, 1.0), 2.4)


def bt1886_inverse_eotf(linear: np.ndarray) -> np.ndarray:
    return np.power(np.clip(linear, 0.0, 1.0), 1 / 2.4)


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear [0, 1] to sRGB-encoded [0, 1] (IEC 61966-2-1 piecewise curve); out-of-range values are clipped."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def srgb_decode(encoded: np.ndarray) -> np.ndarray:
    encoded = np.clip(encoded, 0.0, 1.0)
    return np.where(encoded <= 0.04045, encoded / 12.92, np.power((encoded + 0.055) / 1.055, 2.4))


def to_uint8(v: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def _roll_off(linear: np.ndarray) -> np.ndarray:
    """Scale each pixel so that its largest channel above KNEE approaches 1 smoothly (slope 1 at the knee)."""
    peak = linear.max(axis=-1, keepdims=True)
    over = peak > KNEE
    mapped = KNEE + (1 - KNEE) * (1 - np.exp(-(peak - KNEE) / (1 - KNEE)))
    return np.where(over, linear * (mapped / np.maximum(peak, 1e-6)), linear)


def bt2100_to_sdr(rgb: np.ndarray, transfer: str) -> np.ndarray:
    """BT.2020 R'G'B' (float [0, 1], full range) with `transfer` 'hlg', 'pq' or 'sdr' to uint8 BT.709 R'G'B'."""
    rgb = rgb.astype(np.float32, copy=False)
    if transfer == "hlg":
        scene = hlg_inverse_oetf(rgb)
        ys = scene @ np.array([0.2627, 0.6780, 0.0593], np.float32)
        nits = HLG_PEAK_NITS * np.power(np.maximum(ys, 0.0), 0.2)[..., None] * scene
        linear = nits / SDR_WHITE_NITS
    elif transfer == "pq":
        linear = pq_eotf(rgb) / SDR_WHITE_NITS
    else:  # BT.2020 primaries with an SDR transfer (BT.2020-10/12 use the BT.709 curve)
        linear = bt1886_eotf(rgb)
    linear = np.maximum(linear.astype(np.float32) @ _BT2020_TO_BT709.T, 0.0)
    return to_uint8(bt1886_inverse_eotf(_roll_off(linear)))


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 RGBA (straight alpha) over an opaque background colour, in the encoded values as players do."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    return to_uint8((rgba[..., :3].astype(np.float32) * alpha + bg * (1 - alpha)) / 255.0)
