"""Smart resize: pick an image or frame size that the ViT and the 2x2 merge can tile.

Keye-VL (like Qwen2-VL) feeds 14x14 patches to the ViT and merges 2x2 of them into one
LLM token, so both sides must be multiples of 28 px and the pixel count decides the
token count: tokens = h * w / 28**2. The size is chosen by rounding each side to the
nearest multiple, then scaling down to a pixel cap or up to a floor while keeping the
aspect ratio.

Two variants live here:

- `smart_resize(..., compat=False)` (default) treats the cap as a hard limit (it is a
  token budget) and then tops the size up towards the floor where the cap allows,
  so the result respects both bounds whenever the pair of bounds can be met.
- `smart_resize(..., compat=True)` reproduces keye-vl-utils 1.5.2 exactly: flooring both
  sides after scaling down can land a few tokens under `min_pixels`. The
  `keye-vl-utils` Slow-Fast profile uses it so its sizes match the released processor.
"""
from __future__ import annotations

import math

PATCH_FACTOR = 28  # 14 px ViT patch x 2x2 merge: one LLM token per 28x28 block
MAX_ASPECT_RATIO = 200
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 20480  # paper: up to 20,480 tokens per image


def _round_to(value: float, factor: int) -> int:
    return round(value / factor) * factor


def _floor_to(value: float, factor: int) -> int:
    return math.floor(value / factor) * factor


def _ceil_to(value: float, factor: int) -> int:
    return math.ceil(value / factor) * factor


def _check_inputs(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, max_ratio: float) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize an image of size {height}x{width} (height x width): both sides must be > 0")
    if factor <= 0:
        raise ValueError(f"resize factor must be > 0, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}); swap or fix them")
    ratio = max(height, width) / min(height, width)
    if ratio > max_ratio:
        raise ValueError(
            f"image of size {height}x{width} (height x width) has aspect ratio {ratio:.1f}, above the limit "
            f"{max_ratio}; crop or pad it before feeding it to the model"
        )


def _smart_resize_compat(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """keye-vl-utils 1.5.2 arithmetic, kept bit-for-bit (including its under-the-floor results)."""
    h_bar = max(factor, _round_to(height, factor))
    w_bar = max(factor, _round_to(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_to(height / beta, factor)
        w_bar = _floor_to(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_to(height * beta, factor)
        w_bar = _ceil_to(width * beta, factor)
    return max(h_bar, factor), max(w_bar, factor)


def _fit_to_bounds(
    h_bar: int, w_bar: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Step one side at a time (the one furthest from the source aspect) into [min, max].

    The cap wins over the floor: a frame that must fit a token budget may come out under
    the floor only when no size with both sides >= factor can satisfy both bounds.
    """
    # Shrink the side that is relatively too long until the cap holds.
    while h_bar * w_bar > max_pixels and (h_bar > factor or w_bar > factor):
        if (h_bar / height >= w_bar / width and h_bar > factor) or w_bar == factor:
            h_bar -= factor
        else:
            w_bar -= factor
    # Grow the side that is relatively too short while the cap still holds.
    while h_bar * w_bar < min_pixels:
        grow_h_first = h_bar / height <= w_bar / width
        candidates = [(h_bar + factor, w_bar), (h_bar, w_bar + factor)]
        if not grow_h_first:
            candidates.reverse()
        for h_new, w_new in candidates:
            if h_new * w_new <= max_pixels:
                h_bar, w_bar = h_new, w_new
                break
        else:
            break
    return h_bar, w_bar


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_FACTOR,
    min_pixels: int = IMAGE_MIN_TOKENS * PATCH_FACTOR**2,
    max_pixels: int = IMAGE_MAX_TOKENS * PATCH_FACTOR**2,
    max_ratio: float = MAX_ASPECT_RATIO,
    *,
    compat: bool = False,
) -> tuple[int, int]:
    """Return (height, width), multiples of `factor`, close to the source aspect ratio.

    Round each side to the nearest multiple; if the area is above `max_pixels` scale both
    sides down (floor), if below `min_pixels` scale up (ceil). With `compat=False` the
    result is then nudged one `factor` step at a time so that it never exceeds
    `max_pixels` and reaches `min_pixels` whenever the cap allows it. With `compat=True`
    the keye-vl-utils 1.5.2 result is returned unchanged.

    Raises ValueError for non-positive sizes, min_pixels > max_pixels, or an aspect ratio
    above `max_ratio` (the message names the size).
    """
    _check_inputs(height, width, factor, min_pixels, max_pixels, max_ratio)
    if compat:
        return _smart_resize_compat(height, width, factor, min_pixels, max_pixels)
    if factor * factor > max_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) is below one {factor}x{factor} block; raise it")
    h_bar = max(factor, _round_to(height, factor))
    w_bar = max(factor, _round_to(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_to(height / beta, factor))
        w_bar = max(factor, _floor_to(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_to(height * beta, factor)
        w_bar = _ceil_to(width * beta, factor)
    return _fit_to_bounds(h_bar, w_bar, height, width, factor, min_pixels, max_pixels)


def resize_to_tokens(
    height: int, width: int, max_tokens: int, min_tokens: int, *, factor: int = PATCH_FACTOR, compat: bool = False
) -> tuple[int, int]:
    """`smart_resize` with bounds given in LLM tokens (28x28 blocks) instead of pixels."""
    return smart_resize(
        height, width, factor, min_pixels=min_tokens * factor**2, max_pixels=max_tokens * factor**2, compat=compat
    )


def num_tokens(height: int, width: int, factor: int = PATCH_FACTOR) -> int:
    """LLM tokens for an image of this (already resized) size: one per factor x factor block."""
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"size {height}x{width} is not a positive multiple of {factor}; smart_resize it first")
    return (height // factor) * (width // factor)
