"""RGB -> HSV (8-bit, H in [0, 180)) with the same integers as OpenCV's `cvtColor(COLOR_RGB2HSV)`.

The public Slow-Fast similarity compares frames in OpenCV's HSV; reproducing its fixed-point
arithmetic keeps the decisions identical without making OpenCV a dependency.

OpenCV computes, with v = max(r, g, b) and d = v - min(r, g, b), in 12-bit fixed point:

    s = (d * round(255 * 2^12 / v) + 2^11) >> 12
    h = (num * round(180 * 2^12 / (6 d)) + 2^11) >> 12, plus 180 when negative,
    num = g - b (v == r), b - r + 2d (else v == g), r - g + 4d (else).

s depends only on (v, d) and h only on (num, d), so `hsv_planes` reads both from small
tables (64 KB and 457 KB, built once at import) instead of computing them per pixel: the
same integers, about ten times faster than the per-pixel arithmetic in NumPy. When OpenCV
is installed, `rgb_to_hsv_uint8` calls it instead (faster still, and the very function the
public code calls).
"""
from __future__ import annotations

import functools

import numpy as np

_SHIFT = 12
_HALF = 1 << (_SHIFT - 1)
_NUM_MIN, _NUM_MAX = -255, 5 * 255  # range of the hue numerator: [-d, d], [d, 3d], [3d, 5d]


def _fixed_point_tables() -> tuple[np.ndarray, np.ndarray]:
    divisor = np.arange(256, dtype=np.float64)
    divisor[0] = 1.0
    s_div = np.where(np.arange(256) == 0, 0, np.round((255 << _SHIFT) / divisor)).astype(np.int64)
    h_div = np.where(np.arange(256) == 0, 0, np.round((180 << _SHIFT) / (6.0 * divisor))).astype(np.int64)
    v, d = np.mgrid[0:256, 0:256]
    s = np.clip((d * s_div[v] + _HALF) >> _SHIFT, 0, 255)  # entries with d > v are never read
    num = np.arange(_NUM_MIN, _NUM_MAX + 1)[:, None]
    h = (num * h_div[None, :] + _HALF) >> _SHIFT
    h = np.clip(np.where(h < 0, h + 180, h), 0, 255)  # out-of-range (num, d) pairs are never read
    s_table, h_table = s.astype(np.uint8).reshape(-1), h.astype(np.uint8).reshape(-1)
    s_table.flags.writeable = h_table.flags.writeable = False
    return s_table, h_table


_S_TABLE, _H_TABLE = _fixed_point_tables()  # indexed by v << 8 | d, and by (num - _NUM_MIN) << 8 | d


def hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Three uint8 planes of one shape -> HSV uint8 planes stacked first: (3, *shape).

    Contiguous planes (channel-first images) are the fast case; strided views work too.
    """
    out = np.empty((3, *r.shape), dtype=np.uint8)
    v = np.maximum(np.maximum(r, g), b, out=out[2])
    d = v - np.minimum(np.minimum(r, g), b)  # uint8: v is the max, no wrap-around
    d32 = d.astype(np.int32)
    np.take(_S_TABLE, (v.astype(np.int32) << 8) | d32, out=out[1], mode="clip")
    # The hue numerator of the channel holding the max, in OpenCV's order of precedence (r, g, b),
    # selected by multiplying with 0/1 masks: cheaper than np.where on these arrays.
    r32, g32, b32 = r.astype(np.int32), g.astype(np.int32), b.astype(np.int32)
    is_r = v == r
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    num = g32 - b32
    num *= is_r
    num += is_g * (b32 - r32 + 2 * d32)
    num += is_b * (r32 - g32 + 4 * d32)
    num -= _NUM_MIN
    num <<= 8
    num |= d32
    np.take(_H_TABLE, num, out=out[0], mode="clip")
    return out


@functools.cache
def _opencv():
    """OpenCV when installed (imported on first use: it takes a while), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def rgb_to_hsv_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) -> HSV uint8 (..., 3) with H in [0, 180), bit-exact with OpenCV.

    An image (h, w, 3) goes through OpenCV's own `cvtColor` when OpenCV is installed (the call
    the public code makes, about ten times faster), otherwise through `hsv_planes`; tests check
    that both give the same integers on every one of the 2^24 colours. The NumPy result is a
    view of channel-first planes.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    cv2 = _opencv()
    if cv2 is not None and rgb.ndim == 3 and rgb.shape[-1] == 3:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))  # whole planes: the fast case of hsv_planes
    return np.moveaxis(hsv_planes(*planes), 0, -1)


__all__ = ["hsv_planes", "rgb_to_hsv_uint8"]
