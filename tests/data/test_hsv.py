"""RGB -> HSV as OpenCV computes it (the public Slow-Fast similarity's colour space): the NumPy
tables equal the per-pixel fixed-point arithmetic and OpenCV on every one of the 2^24 colours."""
import numpy as np
import pytest

from keyetron.data import hsv
from keyetron.data.hsv import hsv_planes, rgb_to_hsv_uint8


def reference_hsv(rgb: np.ndarray) -> np.ndarray:
    """The previous implementation, kept as the specification: OpenCV's 8-bit RGB->HSV fixed-point
    arithmetic evaluated per pixel in int64 (H in [0, 180))."""
    shift, half = 12, 1 << 11
    divisor = np.arange(256, dtype=np.float64)
    divisor[0] = 1.0
    s_div = np.where(np.arange(256) == 0, 0, np.round((255 << shift) / divisor)).astype(np.int64)
    h_div = np.where(np.arange(256) == 0, 0, np.round((180 << shift) / (6.0 * divisor))).astype(np.int64)
    c = rgb.astype(np.int64)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = c.max(axis=-1)
    diff = v - c.min(axis=-1)
    s = (diff * s_div[v] + half) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * h_div[diff] + half) >> shift
    return np.stack([np.where(h < 0, h + 180, h), s, v], axis=-1).astype(np.uint8)


def every_colour(r_values: range) -> np.ndarray:
    """All 65,536 (g, b) pairs for each red value: (3, len(r_values), 65536) uint8 planes."""
    gb = np.arange(65536)
    planes = np.empty((3, len(r_values), 65536), np.uint8)
    planes[0] = np.asarray(r_values, np.uint8)[:, None]
    planes[1], planes[2] = gb >> 8, gb & 255
    return planes


EDGE_COLOURS = np.array(
    [[k, k, k] for k in (0, 1, 2, 127, 128, 254, 255)]  # greys: saturation 0, value 0 to 255
    + [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]]  # pure hues
    + [[255, 0, 1], [1, 0, 255], [0, 1, 255], [255, 1, 0], [1, 255, 0], [0, 255, 1]]  # hue wrap-around
    + [[255, 254, 254], [1, 0, 0], [0, 0, 1], [255, 255, 254], [254, 255, 255], [128, 255, 128]],  # d = 1, v = 1
    np.uint8)


@pytest.fixture(params=["opencv", "numpy"])
def hsv_path(request, monkeypatch) -> str:
    """Runs a test with OpenCV's cvtColor and again with the NumPy tables (as without OpenCV installed)."""
    if request.param == "opencv":
        pytest.importorskip("cv2", reason="opencv-python-headless is a test dependency")
    else:
        monkeypatch.setattr(hsv, "_opencv", lambda: None)
    return request.param


def test_hsv_tables_equal_the_per_pixel_fixed_point_reference_on_every_colour():
    for start in range(0, 256, 16):  # 2^24 colours, 1M at a time
        planes = every_colour(range(start, start + 16))
        assert np.array_equal(np.moveaxis(hsv_planes(*planes), 0, -1), reference_hsv(np.moveaxis(planes, 0, -1))), start


def test_hsv_tables_match_opencv_exactly_on_every_colour():
    cv2 = pytest.importorskip("cv2", reason="opencv is the reference for the public code's HSV")
    for start in range(0, 256, 16):
        planes = every_colour(range(start, start + 16))
        rgb = np.ascontiguousarray(np.moveaxis(planes, 0, -1))
        assert np.array_equal(np.moveaxis(hsv_planes(*planes), 0, -1), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)), start


def test_rgb_to_hsv_on_edge_colours(hsv_path):
    for rgb in (EDGE_COLOURS, EDGE_COLOURS[None], EDGE_COLOURS.reshape(5, 5, 3)):  # a list of colours, images
        assert np.array_equal(rgb_to_hsv_uint8(rgb), reference_hsv(rgb))
    hsv_of = rgb_to_hsv_uint8(EDGE_COLOURS[None])[0]
    assert hsv_of[:7, :2].max() == 0 and hsv_of[:7, 2].tolist() == [0, 1, 2, 127, 128, 254, 255]  # greys
    assert hsv_of[7:13].tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [30, 255, 255],
                                     [90, 255, 255], [150, 255, 255]]  # pure hues
