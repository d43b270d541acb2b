"""The ViT equals transformers' PaddleOCRVisionModel (the same SigLIP + 2D RoPE math as Keye-VL-1.5)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.paddleocr_vl.configuration_paddleocr_vl import PaddleOCRVisionConfig  # noqa: E402
from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel  # noqa: E402

from keyetron.model import build_model  # noqa: E402
from keyetron.model.vit import VisionEmbeddings, _bilinear_axis_weights  # noqa: E402


def reference_vit(cfg):
    v = cfg.vision
    hf_cfg = PaddleOCRVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, num_channels=v.num_channels, patch_size=v.patch_size,
        image_size=v.position_table_side * v.patch_size, layer_norm_eps=v.layer_norm_eps,
        rope_parameters={"rope_theta": v.rope_theta, "rope_type": "axial"},
    )
    hf_cfg._attn_implementation = "eager"
    return PaddleOCRVisionModel(hf_cfg).eval()


def copy_into_reference(model, ref):
    """Our ViT names are the reference's, except layers.N ~ encoder.layers.N."""
    ours = {("vision_model." + k).replace("vision_model.layers.", "vision_model.encoder.layers."): v
            for k, v in model.vit.state_dict().items()}
    missing, unexpected = ref.load_state_dict(ours, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)


# In fp64 the reference still computes RoPE angles and interpolation taps in fp32 (~1e-8).
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_vit_matches_transformers_on_several_grids_in_one_pack(tiny_cfg, dtype, tol):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, dtype=dtype, seed=1)
    ref = reference_vit(tiny_cfg).to(dtype)
    copy_into_reference(model, ref)
    # Grids smaller than, equal to and larger than the 6x6 table; non-square; a 3-frame clip.
    grids = torch.tensor([[1, 4, 6], [1, 6, 6], [1, 10, 4], [3, 2, 8], [1, 14, 12]])
    n = int(grids.prod(1).sum())
    pixels = torch.randn(n, 3, 14, 14, dtype=dtype)
    ours = model.vit(pixels, grids)
    theirs = ref(pixel_values=pixels.unsqueeze(0), grid_thw=grids).last_hidden_state.reshape(n, -1)
    assert (ours - theirs).abs().max().item() <= tol


def test_each_frame_attends_only_to_itself(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64)
    grids = torch.tensor([[2, 4, 4]])
    pixels = torch.randn(32, 3, 14, 14, dtype=torch.float64)
    both = model.vit(pixels, grids)
    alone = model.vit(pixels[16:], torch.tensor([[1, 4, 4]]))
    torch.testing.assert_close(both[16:], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w", [(3, 3), (6, 6), (9, 13), (40, 2), (1, 1)])
def test_resized_position_table_equals_bilinear_interpolate(tiny_cfg, h, w):
    emb = VisionEmbeddings(tiny_cfg.vision).double()
    side = tiny_cfg.vision.position_table_side
    table = emb.position_embedding.weight.view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
    expected = torch.nn.functional.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)
    expected = expected.squeeze(0).permute(1, 2, 0).reshape(h * w, -1)
    torch.testing.assert_close(emb.resized_positions(h, w), expected, rtol=0, atol=1e-12)
    assert _bilinear_axis_weights(h, side).sum(1).allclose(torch.ones(h, dtype=torch.float64))
