"""SigLIP text tower and pooling head equal transformers'; SiglipModel checkpoints load and save."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead  # noqa: E402

from keyetron.config import ConfigError  # noqa: E402
from keyetron.model.hf_checkpoint import CheckpointError  # noqa: E402
from keyetron.model.siglip_text import (  # noqa: E402
    SiglipTextConfig,
    SiglipTextTower,
    available_text_configs,
    load_siglip_checkpoint,
    load_text_config,
    save_siglip_checkpoint,
    text_config_from_hf,
)
from keyetron.objectives.contrastive import build_contrastive_objective  # noqa: E402

TEXT = SiglipTextConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                        max_length=16, projection_size=24, layer_norm_eps=1e-6)
TEXT32 = dataclasses.replace(TEXT, projection_size=32)  # projects to the tiny ViT's width


def hf_siglip(tiny_cfg, text=TEXT, use_head=True, seed=0):
    v = tiny_cfg.vision
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                         num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
                         max_position_embeddings=text.max_length, projection_size=text.projection_size),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                           image_size=v.position_table_side * v.patch_size, vision_use_head=use_head),
    )
    # sdpa, not eager: eager runs its softmax in fp32 even for fp64 inputs (~3e-7 off).
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP's init gives zero biases; random ones catch a dropped bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("length", [16, 9])
def test_text_tower_matches_transformers(tiny_cfg, dtype, tol, length):
    ref = hf_siglip(tiny_cfg).text_model.to(dtype)
    tower = SiglipTextTower(TEXT).to(dtype)
    state = {k.replace("encoder.layers.", "layers."): v for k, v in ref.state_dict().items()
             if not k.endswith("position_ids")}
    tower.load_state_dict(state, strict=True)
    ids = torch.randint(0, TEXT.vocab_size, (3, length))
    out = ref(input_ids=ids)
    torch.testing.assert_close(tower.hidden_states(ids), out.last_hidden_state, rtol=0, atol=tol)
    torch.testing.assert_close(tower(ids), out.pooler_output, rtol=0, atol=tol)


def test_text_tower_refuses_captions_longer_than_its_positions():
    with pytest.raises(ValueError, match="16 positions"):
        SiglipTextTower(TEXT)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_pooling_head_on_packed_images_equals_transformers_head_per_image(tiny_cfg, dtype, tol):
    ref = hf_siglip(tiny_cfg).vision_model.head.to(dtype)
    assert isinstance(ref, SiglipMultiheadAttentionPoolingHead)
    objective = build_contrastive_objective(tiny_cfg.vision, TEXT32, seed=3, dtype=dtype)
    objective.pool_head.load_state_dict(ref.state_dict(), strict=True)
    grids = torch.tensor([[1, 4, 6], [1, 1, 1], [1, 7, 3], [2, 2, 2]])  # the last: a 2-frame clip, pooled as one
    sizes = grids.prod(1).tolist()
    feats = torch.randn(sum(sizes), tiny_cfg.vision.hidden_size, dtype=dtype)
    ours = objective.pool_head(feats, grids)
    theirs = torch.cat([ref(chunk.unsqueeze(0)) for chunk in feats.split(sizes)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


def test_loading_a_saved_siglip_model_gives_transformers_text_features_and_head(tiny_cfg, tmp_path):
    ref = hf_siglip(tiny_cfg, text=TEXT)
    ref.save_pretrained(tmp_path)
    text_cfg = text_config_from_hf(tmp_path)
    assert (text_cfg.vocab_size, text_cfg.num_layers, text_cfg.max_length, text_cfg.projection_size) == (99, 2, 16, 24)
    objective = build_contrastive_objective(tiny_cfg.vision, dataclasses.replace(text_cfg, projection_size=32))
    with pytest.raises(CheckpointError, match="text_model.head.weight"):  # 24-wide head vs a 32-wide ViT
        load_siglip_checkpoint(objective, tmp_path)

    text = TEXT32
    ref = hf_siglip(tiny_cfg, text=text)
    ref.save_pretrained(tmp_path)
    objective = build_contrastive_objective(tiny_cfg.vision, text_config_from_hf(tmp_path), seed=5)
    before = {n: p.clone() for n, p in objective.vit.named_parameters()}
    loaded = load_siglip_checkpoint(objective, tmp_path)
    assert {"logit_scale", "logit_bias", "pool_head.probe", "text_tower.head.weight"} <= set(loaded)
    assert not any(n.startswith("vit.") for n in loaded)
    for n, p in objective.vit.named_parameters():
        assert torch.equal(p, before[n]), n  # vision=False leaves the ViT alone
    ids = torch.randint(0, text.vocab_size, (4, text.max_length))
    with torch.no_grad():
        theirs = ref.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(objective.text_tower(ids), theirs, rtol=0, atol=2e-6)
        feats = torch.randn(1, 20, tiny_cfg.vision.hidden_size)
        torch.testing.assert_close(objective.pool_head(feats[0], torch.tensor([[1, 4, 5]])), ref.vision_model.head(feats),
                                   rtol=0, atol=2e-6)
    assert torch.equal(objective.logit_scale, ref.logit_scale) and torch.equal(objective.logit_bias, ref.logit_bias)

    load_siglip_checkpoint(objective, tmp_path, vision=True)
    state = ref.state_dict()
    for n, p in objective.vit.named_parameters():
        assert torch.equal(p, state["vision_model." + n.replace("layers.", "encoder.layers.", 1)]), n


def test_a_checkpoint_without_a_head_loads_the_rest_and_a_missing_text_tower_is_named(tiny_cfg, tmp_path):
    text = TEXT32
    hf_siglip(tiny_cfg, text=text, use_head=False).save_pretrained(tmp_path / "nohead")
    objective = build_contrastive_objective(tiny_cfg.vision, text, seed=5)
    probe = objective.pool_head.probe.clone()
    loaded = load_siglip_checkpoint(objective, tmp_path / "nohead")
    assert not any(n.startswith("pool_head.") for n in loaded) and torch.equal(objective.pool_head.probe, probe)

    tensors = load_file(tmp_path / "nohead" / "model.safetensors")
    (tmp_path / "broken").mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_model.encoder.layers.1.")},
              tmp_path / "broken" / "model.safetensors")
    before = objective.text_tower.head.weight.clone()
    with pytest.raises(CheckpointError, match=r"text_tower\.layers\.1\.mlp\.fc1\.weight"):
        load_siglip_checkpoint(objective, tmp_path / "broken")
    assert torch.equal(objective.text_tower.head.weight, before)  # nothing copied on failure


def test_saved_checkpoint_loads_in_transformers_and_back_bit_exact(tiny_cfg, tmp_path):
    text = TEXT32
    objective = build_contrastive_objective(tiny_cfg.vision, text, seed=7)
    with torch.no_grad():
        objective.logit_bias.fill_(-3.5)
    save_siglip_checkpoint(objective, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip"
    ref = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, text.vocab_size, (2, text.max_length))
    with torch.no_grad():
        torch.testing.assert_close(objective.text_tower(ids), ref.get_text_features(input_ids=ids).pooler_output,
                                   rtol=0, atol=2e-6)
    assert float(ref.logit_bias.detach()) == -3.5
    again = build_contrastive_objective(tiny_cfg.vision, text_config_from_hf(tmp_path), seed=8)
    load_siglip_checkpoint(again, tmp_path, vision=True)
    for (n, a), (_, b) in zip(objective.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_named_text_configs_load_and_match_their_vision_widths():
    from keyetron.model import load_model_config

    assert {"tiny", "small", "keye-8b", "siglip2-so400m"} <= set(available_text_configs())
    for name in ("tiny", "small", "keye-8b"):
        assert load_text_config(name).projection_size == load_model_config(name).vision.hidden_size
    so400m = load_text_config("keye-8b")
    assert (so400m.hidden_size, so400m.num_layers, so400m.num_heads, so400m.intermediate_size, so400m.vocab_size,
            so400m.max_length) == (1152, 27, 16, 4304, 32000, 64)
    assert load_text_config("siglip2-so400m").vocab_size == 256000
    with pytest.raises(ConfigError, match="unknown SigLIP text tower config 'nope'"):
        load_text_config("nope")
