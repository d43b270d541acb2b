"""Images: header-only sizes, smart resize, normalised raster patches; bad files are MediaErrors naming the file."""
import numpy as np
import pytest
import torch
from PIL import Image

from keyetron.data.image import image_size, load_image, patchify, probe_image
from keyetron.data.video import MediaError


def write_png(path, h, w, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_patchify_is_raster_order_and_invertible():
    x = torch.arange(3 * 28 * 42, dtype=torch.float32).view(3, 28, 42)
    p = patchify(x)
    assert p.shape == (6, 3, 14, 14)
    # patch k covers rows 14*(k // 3), cols 14*(k % 3)
    for k in range(6):
        r, c = 14 * (k // 3), 14 * (k % 3)
        torch.testing.assert_close(p[k], x[:, r:r + 14, c:c + 14])


def test_load_image_sizes_grid_and_normalisation(tmp_path):
    rgb = write_png(tmp_path / "a.png", 56, 84)  # already a multiple of 28: no resize
    img = load_image(tmp_path / "a.png")
    assert img.size.resized_hw == (56, 84) and img.size.grid_thw == (1, 4, 6)
    assert img.pixel_values.shape == (24, 3, 14, 14) and img.size.llm_tokens == 6
    expected = torch.from_numpy(rgb[:14, :14]).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(img.pixel_values[0], expected)


def test_header_probe_predicts_the_decoded_grid(tmp_path):
    write_png(tmp_path / "b.png", 333, 517)
    size = image_size(probe_image(tmp_path / "b.png"), max_tokens=64)
    img = load_image(tmp_path / "b.png", max_tokens=64)
    assert img.size == size and size.llm_tokens <= 64
    assert img.pixel_values.shape[0] == size.patches


def test_oversized_image_is_refused_before_decoding(tmp_path):
    write_png(tmp_path / "big.png", 1200, 1000)
    with pytest.raises(MediaError, match=r"big.png: image is 1000x1200 = 1,200,000 pixels, above the limit"):
        load_image(tmp_path / "big.png", max_source_pixels=1_000_000)


@pytest.mark.parametrize("name,content,match", [
    ("missing.png", None, "image file not found"),
    ("text.png", b"this is not an image", "not a readable image"),
])
def test_bad_files_name_the_file(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(MediaError, match=f"{name}: {match}"):
        load_image(tmp_path / name)


def test_truncated_image_is_a_media_error(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError, match="t.jpg: image data is corrupt or truncated"):
        load_image(tmp_path / "t.jpg")


def test_extreme_aspect_ratio_is_a_media_error(tmp_path):
    write_png(tmp_path / "strip.png", 2, 600)
    with pytest.raises(MediaError, match="strip.png: .*aspect ratio"):
        load_image(tmp_path / "strip.png")
