"""Pixels for the demo dataset: shapes, words, photo variants and short clips, all from a seeded rng.

Every function takes the numpy Generator it draws from and returns plain uint8 arrays
(H, W, 3) or frame stacks (N, H, W, 3), so the same rng state gives the same pixels.
Sizes are multiples of 28 (one LLM token per 28x28 block) between 112 and 224 px; clips
are 128x96 at 8 fps. Colours are far apart and backgrounds pale, so a small model can
name them after yuv420p encoding.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "orange": (245, 130, 20), "purple": (140, 60, 190),
}
BACKGROUNDS = ((255, 255, 255), (245, 245, 240), (235, 240, 245), (250, 245, 230))
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "star", "moon",
         "bird", "cake", "door", "milk", "rain", "ship", "lamp", "key")
SIDES = (112, 140, 168, 196, 224)
INK = ((20, 20, 20), (30, 30, 120), (110, 20, 20), (20, 80, 40))
# skimage.data loader -> the one word that answers "What is in the picture?"
PHOTOS = {"astronaut": "astronaut", "chelsea": "cat", "coffee": "coffee", "rocket": "rocket",
          "camera": "man", "coins": "coins", "moon": "moon", "horse": "horse", "clock": "clock"}
PHOTO_CAPTIONS = {
    "astronaut": "An astronaut in an orange space suit in front of a flag.",
    "chelsea": "A tabby cat looking to the side.",
    "coffee": "A cup of coffee on a saucer.", "rocket": "A rocket standing on its launch pad.",
    "camera": "A man with a camera on a tripod.", "coins": "Old coins lying on a flat surface.",
    "moon": "The surface of the moon with craters.", "horse": "The black silhouette of a horse.",
    "clock": "A wall clock, slightly blurred by motion.",
}
VIDEO_WH = (128, 96)
VIDEO_FPS = 8


def _canvas(rng: np.random.Generator, w: int | None = None, h: int | None = None) -> Image.Image:
    w = w or int(rng.choice(SIDES))
    h = h or int(rng.choice(SIDES))
    return Image.new("RGB", (w, h), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: str) -> None:
    x1, y1, x2, y2 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)


def _boxes(rng: np.random.Generator, w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
    """n non-overlapping square boxes: one free box, or one per cell of a 2x2 grid."""
    if n == 1:
        s = int(rng.uniform(0.3, 0.6) * min(w, h))
        x, y = int(rng.integers(w // 20, w - s - w // 20 + 1)), int(rng.integers(h // 20, h - s - h // 20 + 1))
        return [(x, y, x + s, y + s)]
    assert 1 <= n <= 4, n
    cw, ch = w // 2, h // 2
    out = []
    for cell in sorted(rng.choice(4, size=n, replace=False).tolist()):
        s = int(rng.uniform(0.5, 0.85) * min(cw, ch))
        x0, y0 = (cell % 2) * cw, (cell // 2) * ch
        x, y = x0 + int(rng.integers(2, cw - s - 1)), y0 + int(rng.integers(2, ch - s - 1))
        out.append((x, y, x + s, y + s))
    return out


def shapes_image(rng: np.random.Generator, items: list[tuple[str, str]]) -> tuple[np.ndarray, list[tuple]]:
    """Draw (shape, colour) items on a pale canvas; returns the image and each item's pixel box."""
    img = _canvas(rng)
    boxes = _boxes(rng, img.width, img.height, len(items))
    draw = ImageDraw.Draw(img)
    for (shape, colour), box in zip(items, boxes):
        draw_shape(draw, shape, box, colour)
    return np.asarray(img), boxes


def sided_shape_image(rng: np.random.Generator, shape: str, colour: str, side: str) -> tuple[np.ndarray, tuple]:
    """One shape whose centre lies clearly in the left or right half (15-35% or 65-85% of the width)."""
    img = _canvas(rng)
    w, h = img.size
    s = int(rng.uniform(0.2, 0.28) * min(w, h))
    cx = rng.uniform(0.15, 0.35) * w if side == "left" else rng.uniform(0.65, 0.85) * w
    x = int(np.clip(cx - s / 2, 1, w - s - 1))
    y = int(rng.integers(h // 20, h - s - h // 20 + 1))
    box = (x, y, x + s, y + s)
    draw_shape(ImageDraw.Draw(img), shape, box, colour)
    return np.asarray(img), box


def normalised_box(box: tuple, w: int, h: int) -> list[int]:
    """Pixel box -> integer [x1, y1, x2, y2] in [0, 1000], as the sample format wants."""
    x1, y1, x2, y2 = box
    return [int(np.clip(round(v * 1000 / d), 0, 1000)) for v, d in ((x1, w), (y1, h), (x2, w), (y2, h))]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont | None:
    """PIL's bundled font at `size`, or None where this Pillow cannot scale it (no FreeType / < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return None


def word_image(rng: np.random.Generator, word: str) -> np.ndarray:
    """A word in dark ink on a pale canvas, 28-40 px tall letters."""
    img = _canvas(rng, w=int(rng.choice(SIDES[2:])), h=int(rng.choice(SIDES[:2])))
    ink = INK[int(rng.integers(len(INK)))]
    size = int(rng.integers(28, 41))
    font = _font(size)
    if font is None:  # draw at the bitmap font's ~11 px and scale the text patch up
        small = Image.new("RGB", (8 * len(word) + 4, 14), img.getpixel((0, 0)))
        ImageDraw.Draw(small).text((2, 1), word, fill=ink, font=ImageFont.load_default())
        scale = size / 11
        patch = small.resize((int(small.width * scale), int(small.height * scale)), Image.NEAREST)
    else:
        x1, y1, x2, y2 = ImageDraw.Draw(img).textbbox((0, 0), word, font=font)
        patch = Image.new("RGB", (x2 - x1 + 4, y2 - y1 + 4), img.getpixel((0, 0)))
        ImageDraw.Draw(patch).text((2 - x1, 2 - y1), word, fill=ink, font=font)
    x = int(rng.integers(0, max(img.width - patch.width, 0) + 1))
    y = int(rng.integers(0, max(img.height - patch.height, 0) + 1))
    img.paste(patch, (x, y))
    return np.asarray(img)


def load_photos() -> dict[str, np.ndarray]:
    """The photos scikit-image ships in its wheel (no download), as RGB uint8, keyed by loader name."""
    try:
        import skimage.data
    except ImportError as err:
        raise RuntimeError("the demo dataset's photos come from scikit-image: `pip install scikit-image` "
                           "(its bundled images are read offline)") from err
    photos = {}
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype == bool:
            a = np.where(a, 0, 255).astype(np.uint8)  # horse: a black silhouette on white
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        photos[name] = np.ascontiguousarray(a[..., :3], dtype=np.uint8)
    return photos


def photo_variant(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    """A random 60-100% crop, maybe mirrored, brightness x0.85-1.15, resized to fit 112-224 px."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.clip(crop.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    side = int(rng.choice(SIDES[2:]))
    scale = side / max(ch, cw)
    size = (max(112, int(cw * scale)), max(112, int(ch * scale)))
    return np.asarray(Image.fromarray(crop).resize(size, Image.BICUBIC))


def ball_frames(rng: np.random.Generator, colour: str, direction: str, seconds: int) -> np.ndarray:
    """A ball crossing the frame towards `direction` ("left" / "right") over `seconds` at 8 fps."""
    w, h = VIDEO_WH
    n = seconds * VIDEO_FPS
    r = int(rng.integers(8, 15))
    cy = int(rng.integers(r + 4, h - r - 4))
    start, end = r + 2 + int(rng.integers(0, 8)), w - r - 2 - int(rng.integers(0, 8))
    if direction == "left":
        start, end = end, start
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[:] = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    yy, xx = np.mgrid[:h, :w]
    for i, cx in enumerate(np.linspace(start, end, n)):
        frames[i][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = COLOURS[colour]
    return frames


def scene_frames(rng: np.random.Generator, colours: list[str], changes: list[int], seconds: int) -> np.ndarray:
    """Scenes of solid or striped colour; scene k+1 starts at second changes[k] (8 fps)."""
    w, h = VIDEO_WH
    assert len(changes) == len(colours) - 1 and all(0 < c < seconds for c in changes), (colours, changes, seconds)
    scenes = []
    for colour in colours:
        base = np.array(COLOURS[colour], np.float32)
        scene = np.broadcast_to(base, (h, w, 3)).copy()
        if rng.random() < 0.5:  # stripes in a darker shade of the same colour
            width = int(rng.integers(6, 13))
            axis = np.arange(w)[None, :] if rng.random() < 0.5 else np.arange(h)[:, None]
            scene[np.broadcast_to((axis // width) % 2 == 1, (h, w))] = base * 0.75
        scenes.append(scene.astype(np.uint8))
    t = np.arange(seconds * VIDEO_FPS) / VIDEO_FPS
    index = np.searchsorted(np.asarray(changes), t, side="right")
    return np.stack([scenes[k] for k in index])
