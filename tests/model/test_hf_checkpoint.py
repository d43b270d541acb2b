"""Hugging Face layout: bit-exact round trip, strict checks naming keys, and init from SigLIP / Qwen3."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from keyetron.model import build_model
from keyetron.model.hf_checkpoint import (
    CheckpointError,
    config_from_hf,
    init_llm_from_qwen3,
    init_vision_from_siglip,
    load_hf_checkpoint,
    load_hf_model,
    save_hf_checkpoint,
    to_hf_name,
)

RELEASED_NAMES = [
    "visual.vision_model.embeddings.patch_embedding.weight",
    "visual.vision_model.embeddings.position_embedding.weight",
    "visual.vision_model.encoder.layers.1.self_attn.q_proj.bias",
    "visual.vision_model.encoder.layers.0.mlp.fc2.weight",
    "visual.vision_model.post_layernorm.weight",
    "mlp_AR.pre_norm.weight", "mlp_AR.linear_1.weight", "mlp_AR.linear_2.bias",
    "model.embed_tokens.weight", "model.layers.1.self_attn.k_norm.weight", "model.layers.0.mlp.down_proj.weight",
    "model.norm.weight", "lm_head.weight",
]


def test_sharded_round_trip_is_bit_exact_and_uses_released_names(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg, seed=11)
    out = save_hf_checkpoint(model, tmp_path / "ck", max_shard_bytes=4_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert set(RELEASED_NAMES) <= set(index["weight_map"])

    loaded = load_hf_model(out)  # architecture read back from config.json
    assert loaded.cfg == tiny_cfg
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n


def test_single_file_round_trip_in_bf16(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg, seed=2, dtype=torch.bfloat16)
    save_hf_checkpoint(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    other = build_model(tiny_cfg, seed=5, dtype=torch.bfloat16)
    load_hf_checkpoint(other, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_key_fails_naming_it_and_copies_nothing(tiny_cfg, tmp_path):
    save_hf_checkpoint(build_model(tiny_cfg, seed=1), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    target = build_model(tiny_cfg, seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(target, tmp_path)
    assert "missing keys" in str(err.value) and "llm.layers.1.mlp.up_proj.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_unexpected_key_and_shape_mismatch_are_listed(tiny_cfg, tmp_path):
    save_hf_checkpoint(build_model(tiny_cfg, seed=1), tmp_path)

    def edit(t):
        t["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
        t["mlp_AR.linear_1.weight"] = torch.zeros(3, 3)

    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(build_model(tiny_cfg), tmp_path)
    msg = str(err.value)
    assert "unexpected keys" in msg and "model.layers.7.mlp.up_proj.weight" in msg
    assert "shape mismatches" in msg and "mlp_AR.linear_1.weight [3, 3] -> projector.linear_1.weight [128, 128]" in msg


def test_released_unused_tensors_are_skipped(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg, seed=1)
    save_hf_checkpoint(model, tmp_path)
    # Values no parameter holds, and the packing table shaped like the ViT's position table, so
    # that a skipped tensor landing anywhere, even where the shapes agree, would be seen.
    table = model.vit.embeddings.position_embedding.weight
    skipped = {
        "visual.vision_model.head.probe": torch.full((1, 1, 32), 7.25),
        "visual.vision_model.embeddings.packing_position_embedding.weight":
            torch.arange(table.numel(), dtype=table.dtype).reshape(table.shape) + 1000.0,
    }
    _rewrite(tmp_path, lambda t: t.update(skipped))

    target = build_model(tiny_cfg, seed=4)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(float("nan"))  # biases and norm scales are equal under every seed: only a copy clears this
    load_hf_checkpoint(target, tmp_path)

    checkpoint = load_file(tmp_path / "model.safetensors")
    ours = dict(target.named_parameters())
    assert set(checkpoint) == {to_hf_name(n) for n in ours} | set(skipped)
    for n, p in ours.items():
        assert torch.equal(p, checkpoint[to_hf_name(n)]), n
    skipped_values = torch.cat([t.flatten() for t in skipped.values()])
    for n, t in target.state_dict().items():
        assert not torch.isin(t, skipped_values).any(), n


def test_missing_folder_and_missing_shard_say_what_is_wrong(tiny_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_hf_checkpoint(build_model(tiny_cfg), tmp_path / "nowhere")
    save_hf_checkpoint(build_model(tiny_cfg), tmp_path, max_shard_bytes=4_000_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf_checkpoint(build_model(tiny_cfg), tmp_path)


def test_init_llm_from_a_transformers_qwen3_checkpoint(tiny_cfg, tmp_path):
    pytest.importorskip("transformers")
    from test_llm_parity import hf_name, reference_qwen3

    ref = reference_qwen3(tiny_cfg)
    ref.save_pretrained(tmp_path)
    model = build_model(tiny_cfg, seed=0)
    loaded = init_llm_from_qwen3(model, tmp_path)
    assert len(loaded) == len(list(model.llm.parameters()))
    ref_state = ref.state_dict()
    for n, p in model.llm.named_parameters():
        assert torch.equal(p, ref_state[hf_name(n)]), n


def test_loading_parts_into_a_meta_model_is_refused_saying_what_to_build(tiny_cfg, tmp_path):
    """README's recipe: build on a real device, then load parts. A meta model holds no values: loading
    into it would leave every parameter empty, so it is an error before anything is read."""
    pytest.importorskip("transformers")
    from test_llm_parity import reference_qwen3

    reference_qwen3(tiny_cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="meta device .* build the model on a real device"):
        init_llm_from_qwen3(build_model(tiny_cfg, device="meta"), tmp_path)


def test_init_llm_from_tied_qwen3_copies_the_embedding_into_the_head(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg, seed=0)
    tensors = {("model." + k): v for k, v in model.llm.state_dict().items() if not k.startswith("lm_head")}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        init_llm_from_qwen3(build_model(tiny_cfg, seed=1), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    other = build_model(tiny_cfg, seed=1)
    init_llm_from_qwen3(other, tmp_path)
    assert torch.equal(other.llm.lm_head.weight, model.llm.embed_tokens.weight)


def test_init_vit_from_a_transformers_siglip_checkpoint(tiny_cfg, tmp_path):
    transformers = pytest.importorskip("transformers")
    v = tiny_cfg.vision
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           patch_size=v.patch_size, image_size=v.position_table_side * v.patch_size),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
    )
    siglip = transformers.SiglipModel(cfg)  # vision tower, text tower, logit scale/bias, pooling head
    siglip.save_pretrained(tmp_path)
    model = build_model(tiny_cfg, seed=0)
    init_vision_from_siglip(model, tmp_path)
    state = siglip.state_dict()
    for n, p in model.vit.named_parameters():
        assert torch.equal(p, state["vision_model." + n.replace("layers.", "encoder.layers.", 1)]), n
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert any(k.startswith("text_model.") for k in f.keys())


def test_config_from_released_fields(tiny_cfg, tmp_path):
    from keyetron.model.hf_checkpoint import hf_config_dict

    raw = hf_config_dict(tiny_cfg)
    raw.pop("keyetron")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = config_from_hf(tmp_path)
    assert cfg.vision == tiny_cfg.vision and cfg.text == tiny_cfg.text and cfg.projector == tiny_cfg.projector
