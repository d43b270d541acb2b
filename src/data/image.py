"""Images -> normalised 14x14 patches in raster order, with the grid the ViT needs.

Sizes come from the file header alone (``probe_image``), so the balancer can cost a
sample without decoding it. A header announcing more pixels than ``max_source_pixels``
is refused before any pixel is decoded (decompression bombs).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keyetron.data.resize import IMAGE_MAX_TOKENS, IMAGE_MIN_TOKENS, PATCH_FACTOR, smart_resize
from keyetron.data.errors import MediaError

PATCH = 14
MERGE = 2
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
MAX_SOURCE_PIXELS = 16384 * 16384  # ~268 MP: beyond any real photo or scan page


@dataclass(frozen=True)
class ImageSize:
    source_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return (1, self.resized_hw[0] // PATCH, self.resized_hw[1] // PATCH)

    @property
    def patches(self) -> int:
        return self.resized_hw[0] * self.resized_hw[1] // PATCH**2

    @property
    def llm_tokens(self) -> int:
        return self.patches // MERGE**2


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # (patches, 3, 14, 14) float32, normalised
    size: ImageSize


def _open(path: Path, max_source_pixels: int) -> Image.Image:
    if not path.is_file():
        raise MediaError(path, "image file not found; check the path in the manifest (relative paths start at the manifest's folder)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(path, f"refused as a possible decompression bomb ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise MediaError(path, f"not a readable image ({err}); re-encode it as PNG or JPEG") from err
    w, h = img.size
    if w * h > max_source_pixels:
        img.close()
        raise MediaError(path, f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_source_pixels:,}; "
                               "downscale it or raise max_source_pixels")
    return img


def probe_image(path: str | Path, max_source_pixels: int = MAX_SOURCE_PIXELS) -> tuple[int, int]:
    """(height, width) from the header, without decoding pixels."""
    with _open(Path(path), max_source_pixels) as img:
        return img.size[1], img.size[0]


def image_size(source_hw: tuple[int, int], min_tokens: int = IMAGE_MIN_TOKENS,
               max_tokens: int = IMAGE_MAX_TOKENS) -> ImageSize:
    h, w = smart_resize(*source_hw, factor=PATCH_FACTOR, min_pixels=min_tokens * PATCH_FACTOR**2,
                        max_pixels=max_tokens * PATCH_FACTOR**2)
    return ImageSize(source_hw, (h, w))


def patchify(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (H/14 * W/14, 3, 14, 14), patches in raster order."""
    c, h, w = pixels.shape
    assert h % PATCH == 0 and w % PATCH == 0, (h, w)
    x = pixels.view(c, h // PATCH, PATCH, w // PATCH, PATCH).permute(1, 3, 0, 2, 4)
    return x.reshape(-1, c, PATCH, PATCH)


def normalise(rgb_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 with SigLIP's mean/std."""
    x = torch.tensor(rgb_uint8).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(SIGLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(SIGLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_rgb(rgb_uint8: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an RGB uint8 array to (h, w), as the Qwen2-VL family's processors do."""
    if rgb_uint8.shape[:2] == tuple(hw):
        return rgb_uint8
    return np.asarray(Image.fromarray(rgb_uint8).resize((hw[1], hw[0]), Image.BICUBIC))


def load_image(path: str | Path, min_tokens: int = IMAGE_MIN_TOKENS, max_tokens: int = IMAGE_MAX_TOKENS,
               max_source_pixels: int = MAX_SOURCE_PIXELS) -> ProcessedImage:
    """Decode, smart-resize, normalise and patchify one image; every failure is a MediaError naming the file."""
    path = Path(path)
    with _open(path, max_source_pixels) as img:
        try:
            rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise MediaError(path, f"image data is corrupt or truncated ({err}); re-encode or drop it") from err
    try:
        size = image_size(rgb.shape[:2], min_tokens, max_tokens)
    except ValueError as err:
        raise MediaError(path, str(err)) from err
    pixels = normalise(resize_rgb(rgb, size.resized_hw))
    return ProcessedImage(patchify(pixels), size)
