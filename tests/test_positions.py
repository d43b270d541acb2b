"""3D rope index: text (p,p,p); each image / frame block at (s, s+i, s+j); text resumes at block max + 1."""
import pytest
import torch

from keyetron.positions import compute_position_ids, llm_grids
from keyetron.model.rope import sectioned_rope

IMG, VID = 151655, 151656


def test_text_then_image_then_text():
    ids = torch.tensor([1, 2, 3, IMG, IMG, IMG, IMG, IMG, IMG, 4, 5])
    pos = compute_position_ids(ids, [(2, 3)], (IMG, VID))
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    # block starts at s = 3: rows 3..4, cols 3..5, t constant
    assert pos[0, 3:9].tolist() == [3] * 6
    assert pos[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert pos[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    # max of the block is 5, so text resumes at 6
    assert pos[:, 9:].tolist() == [[6, 7]] * 3


def test_each_video_frame_is_its_own_block_and_adjacent_blocks_chain():
    ids = torch.tensor([9, VID, VID, VID, VID, 8, VID, VID, VID, VID, VID, VID, VID, VID, VID])
    pos = compute_position_ids(ids, [(2, 2), (1, 1), (2, 4)], (IMG, VID))
    assert pos[:, 1:5].tolist() == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]]
    assert pos[:, 5].tolist() == [3, 3, 3]
    assert pos[:, 6].tolist() == [4, 4, 4]  # a 1x1 frame, then the next frame directly after it
    assert pos[0, 7:].tolist() == [5] * 8
    assert pos[2, 7:11].tolist() == [5, 6, 7, 8]


def test_video_grid_with_several_frames_expands_to_blocks():
    assert llm_grids(torch.tensor([[3, 4, 6], [1, 2, 2]]), 2) == [(2, 3)] * 3 + [(1, 1)]
    with pytest.raises(ValueError, match="not divisible"):
        llm_grids(torch.tensor([[1, 3, 4]]), 2)


def test_pad_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="3 visual pad tokens but its grids need 4"):
        compute_position_ids(torch.tensor([IMG, IMG, IMG]), [(2, 2)], (IMG, VID))


def test_sectioned_rope_with_equal_axes_is_plain_rope():
    T, dim, theta = 50, 16, 1e6
    pos = torch.arange(T).expand(3, T)
    cos, sin = sectioned_rope(pos, dim, theta, (2, 3, 3), torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    torch.testing.assert_close(cos, torch.cat([ang, ang], -1).cos())
    torch.testing.assert_close(sin, torch.cat([ang, ang], -1).sin())


def test_sectioned_rope_gives_each_section_its_axis():
    pos = torch.tensor([[1], [2], [3]])
    cos, _ = sectioned_rope(pos, 16, 10.0, (2, 3, 3), torch.float64)
    inv = 1.0 / 10.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    axis = torch.tensor([1, 1, 2, 2, 2, 3, 3, 3], dtype=torch.float64)
    torch.testing.assert_close(cos[0, :8], (axis * inv).cos())
