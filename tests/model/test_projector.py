"""The 2x2 merge groups raster neighbours; Keye-VL-1.5 normalises after the merge."""
import torch

from keyetron.model import build_model
from keyetron.model.projector import merge_patches


def test_merged_token_holds_its_2x2_block_in_raster_order():
    # Feature of patch (frame f, row r, col c) = [f, r, c]; grids: one 4x6 image, a 2-frame 2x4 clip.
    grids = torch.tensor([[1, 4, 6], [2, 2, 4]])
    feats = torch.cat([
        torch.tensor([[f, r, c] for f in range(t) for r in range(h) for c in range(w)], dtype=torch.float64)
        for t, h, w in grids.tolist()
    ])
    merged = merge_patches(feats, grids, 2).view(-1, 4, 3)
    assert merged.shape[0] == 6 + 2 * 2
    # image: merged token (i, j) = patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    for i in range(2):
        for j in range(3):
            expected = [[0, 2 * i + a, 2 * j + b] for a in (0, 1) for b in (0, 1)]
            assert merged[i * 3 + j].tolist() == expected
    # clip: frame after frame, each frame's blocks in raster order
    assert merged[6 + 3].tolist() == [[1, 0, 2], [1, 0, 3], [1, 1, 2], [1, 1, 3]]


def test_layer_norm_acts_on_the_merged_vector(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64)
    d = tiny_cfg.vision.hidden_size
    assert model.projector.pre_norm.normalized_shape == (4 * d,)
    grids = torch.tensor([[1, 2, 2]])
    feats = torch.randn(4, d, dtype=torch.float64)
    out = model.projector(feats, grids)
    x = torch.nn.functional.layer_norm(feats.reshape(1, 4 * d), (4 * d,), eps=tiny_cfg.projector.norm_eps)
    p = model.projector
    expected = p.linear_2(torch.nn.functional.gelu(p.linear_1(x * p.pre_norm.weight + p.pre_norm.bias)))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
