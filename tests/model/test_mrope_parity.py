"""The LLM's sectioned 3D RoPE equals transformers' Qwen2-VL M-RoPE on image and video positions.

Text-only parity (test_llm_parity.py) cannot see how the head's frequency pairs are split
between the t, h and w axes: on text the three axes are equal. Here every document has
non-square images or a Slow-Fast video, so inside each visual block h and w differ from t
and from each other, and a pair given to the wrong axis changes its angle.

References, all transformers' own code:
- positions: ``Qwen2VLModel.get_rope_index``, with every image and every video frame given
  as one image grid (Keye-VL-1.5's frames are separate blocks of t = 1 with text between);
- the rotary: ``Qwen2VLRotaryEmbedding`` and ``Qwen2_5_VLRotaryEmbedding`` (both sectioned)
  and ``apply_rotary_pos_emb``;
- the whole LLM: transformers has no class that is Keye-VL-1.5's LLM. Qwen2-VL's text
  model has the sectioned rotary but no q/k norm; Qwen3-VL's text model has Qwen3's layers
  (q/k norm) but interleaves the sections. The reference is Qwen3-VL's text decoder with its
  rotary module replaced by Qwen2-VL's, which is the Keye-VL-1.5 LLM built from transformers
  parts only.

Qwen2-VL's rotary computes its angles in fp32. Where the comparison runs in fp64, the
reference keeps transformers' section split (``recomposition_frequencies``) and only the
angles themselves are computed in fp64 (``Fp64SectionedRotary``); the unmodified fp32
forward is compared separately. The reference decoder's RMSNorm takes its statistics in fp32
even for fp64 inputs, which bounds the whole-LLM comparison near 1e-7 (measured: logits
6e-8, gradients 7e-7 of a largest gradient 6.5); a pair given to the wrong axis moves them
by orders of magnitude more.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import Qwen2VLConfig, Qwen3VLTextConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VLModel,
    Qwen2VLRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLTextRotaryEmbedding  # noqa: E402

from keyetron.batch import IGNORE_INDEX, PackedBatch  # noqa: E402
from keyetron.model import build_model, load_model_config  # noqa: E402
from keyetron.model.rope import apply_rotary, sectioned_rope  # noqa: E402
from synthetic import make_document  # noqa: E402


def visual_documents(cfg):
    """Two images with more columns than rows and the reverse, and a Slow-Fast video."""
    gen = torch.Generator().manual_seed(5)
    return [
        make_document(cfg, gen, text=5, images=[(4, 10), (12, 4)], sample_id="images"),
        make_document(cfg, gen, text=4, video=[(6, 8), (2, 4), (2, 4), (6, 8)], sample_id="slow-fast video"),
    ]


def text_config(cfg, theta: float | None = None) -> Qwen3VLTextConfig:
    t = cfg.text
    hf = Qwen3VLTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta or t.rope_theta,
                         "mrope_section": list(t.mrope_section)},
    )
    hf._attn_implementation = "eager"
    return hf


class Fp64SectionedRotary(Qwen2VLRotaryEmbedding):
    """transformers' Qwen2-VL rotary with its own section split, angles in fp64."""

    def forward(self, x, position_ids):
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids.expand(3, -1, -1)[..., None].to(torch.float64) * inv_freq
        return (self.recomposition_frequencies(freqs.cos()).to(x.dtype),
                self.recomposition_frequencies(freqs.sin()).to(x.dtype))


def rope_index(cfg, doc) -> torch.Tensor:
    """(3, T) positions from transformers' Qwen2VLModel.get_rope_index for one document."""
    hf = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, spatial_merge_size=cfg.projector.merge_size),
        text_config=dict(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    )
    visual = torch.isin(doc.input_ids, torch.tensor([cfg.image_token_id, cfg.video_token_id]))
    positions, _ = Qwen2VLModel(hf).get_rope_index(
        doc.input_ids[None], visual.int()[None], image_grid_thw=doc.vision_grid_thw)
    return positions[:, 0]


def test_visual_positions_match_qwen2vl_rope_index_and_separate_the_axes(tiny_cfg):
    for doc in visual_documents(tiny_cfg):
        assert torch.equal(doc.position_ids, rope_index(tiny_cfg, doc)), doc.sample_id
        t, h, w = doc.position_ids
        # Otherwise the tests below could not tell one axis from another.
        assert (h != t).any() and (w != t).any() and (w != h).any() and (w - h).abs().max() >= 2, doc.sample_id


@pytest.mark.parametrize("name,theta", [("keye-8b", None), ("keye-8b", 8e6), ("keye-8b", 100.0), ("small", None),
                                        ("tiny", None)])
def test_rotated_queries_and_keys_match_qwen2vl_mrope(tiny_cfg, name, theta):
    """keye-8b: head_dim 128 split [16, 24, 24]; theta 1e6 and 8e6 as trained, 100 so that
    every pair turns by a large angle (at 1e6 the width pairs turn by at most 2e-4 per step)."""
    cfg = load_model_config(name)
    t = cfg.text
    theta = theta or t.rope_theta
    ref = Fp64SectionedRotary(text_config(cfg, theta))
    gen = torch.Generator().manual_seed(1)
    for doc in visual_documents(tiny_cfg):
        pos = doc.position_ids
        n = pos.shape[1]
        q = torch.randn(n, t.num_heads, t.head_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(n, t.num_kv_heads, t.head_dim, generator=gen, dtype=torch.float64)

        cos, sin = sectioned_rope(pos, t.head_dim, theta, t.mrope_section, torch.float64)
        ref_cos, ref_sin = ref(q, pos[:, None])
        torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=1e-13)
        ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin)
        torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1), rtol=0, atol=1e-12)

        # transformers' own fp32 forwards, unmodified: their angles are the same fp32 products as ours.
        cos32, sin32 = sectioned_rope(pos, t.head_dim, theta, t.mrope_section, torch.float32)
        for rotary in (Qwen2VLRotaryEmbedding, Qwen2_5_VLRotaryEmbedding):
            ref32_cos, ref32_sin = rotary(text_config(cfg, theta))(q.float(), pos[:, None])
            torch.testing.assert_close(cos32, ref32_cos[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(sin32, ref32_sin[0], rtol=0, atol=1e-6)

        # Qwen3-VL's interleaved layout is a different model on these positions.
        inter_cos, _ = Qwen3VLTextRotaryEmbedding(text_config(cfg, theta))(q.float(), pos[:, None])
        assert (cos32 - inter_cos[0]).abs().max() > 1e-3, doc.sample_id


def keye_llm_reference(model) -> tuple[Qwen3VLTextModel, torch.nn.Linear]:
    """Qwen3-VL's text decoder with Qwen2-VL's sectioned rotary, and a head, holding our LLM's weights."""
    cfg = model.cfg
    ref = Qwen3VLTextModel(text_config(cfg))
    ref.rotary_emb = Fp64SectionedRotary(ref.config)
    state = {k: v for k, v in model.llm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    head = torch.nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
    head.weight.data.copy_(model.llm.lm_head.weight)
    return ref.to(torch.float64), head.to(torch.float64)


@pytest.mark.parametrize("theta", [1e6, 8e6])
def test_llm_logits_and_grads_on_images_and_video_match_the_transformers_parts(tiny_cfg, theta):
    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, rope_theta=theta))
    model = build_model(cfg, dtype=torch.float64, seed=3)
    ref, ref_head = keye_llm_reference(model)
    docs = visual_documents(cfg)
    batch = PackedBatch.from_documents(docs)

    # The same input embeddings (the ViT's features at the pad tokens) into both decoders.
    embeds = model.embed(batch).detach()
    ours_in = embeds.clone().requires_grad_()
    logits = model.llm.lm_head.logits(model.llm(ours_in, batch))
    loss = F.cross_entropy(logits, batch.targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()

    bounds = batch.cu_seqlens.tolist()
    ref_loss = torch.zeros((), dtype=torch.float64)
    ref_in_grads = []
    for i, doc in enumerate(docs):
        ref_in = embeds[bounds[i]:bounds[i + 1]][None].clone().requires_grad_()
        hidden = ref(inputs_embeds=ref_in, position_ids=doc.position_ids[:, None]).last_hidden_state
        ref_logits = ref_head(hidden)[0]
        torch.testing.assert_close(logits[bounds[i]:bounds[i + 1]], ref_logits, rtol=0, atol=1e-6,
                                   msg=lambda m, d=doc.sample_id: f"{d}: {m}")
        doc_loss = F.cross_entropy(ref_logits, doc.targets, ignore_index=IGNORE_INDEX, reduction="sum")
        doc_loss.backward()
        ref_loss = ref_loss + doc_loss.detach()
        ref_in_grads.append(ref_in.grad[0])
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-8, atol=0)
    torch.testing.assert_close(ours_in.grad, torch.cat(ref_in_grads), rtol=0, atol=2e-6)
    ref_params = dict(ref.named_parameters())
    for n, p in model.llm.named_parameters():
        if n == "embed_tokens.weight":
            assert p.grad is None  # both sides were given embeddings
            continue
        ref_grad = ref_head.weight.grad if n == "lm_head.weight" else ref_params[n].grad
        torch.testing.assert_close(p.grad, ref_grad, rtol=0, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")
