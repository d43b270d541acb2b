"""The LLM equals transformers' Qwen3ForCausalLM on text-only input (3D RoPE reduces to 1D RoPE)."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from keyetron.batch import Document, PackedBatch  # noqa: E402
from keyetron.model import build_model  # noqa: E402
from synthetic import lm_loss  # noqa: E402


def reference_qwen3(cfg):
    t = cfg.text
    hf_cfg = Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"},
        tie_word_embeddings=False, attention_bias=False,
    )
    hf_cfg._attn_implementation = "eager"
    return Qwen3ForCausalLM(hf_cfg)


def hf_name(name: str) -> str:
    """Names inside our `llm` module -> Qwen3ForCausalLM names."""
    return name if name.startswith("lm_head.") else "model." + name


def text_batch(ids: torch.Tensor) -> PackedBatch:
    n = ids.numel()
    doc = Document(ids, Document.shift_targets(ids, torch.ones(n, dtype=torch.bool)), torch.arange(n).expand(3, n).clone())
    return PackedBatch.from_documents([doc])


@pytest.mark.parametrize("theta", [1e6, 8e6])
def test_llm_logits_loss_and_grads_match_qwen3(tiny_cfg, theta):
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, rope_theta=theta))
    model = build_model(cfg, dtype=torch.float32, seed=3)
    ref = reference_qwen3(cfg)
    missing, unexpected = ref.load_state_dict({hf_name(k): v for k, v in model.llm.state_dict().items()}, strict=False)
    assert not missing and not unexpected

    ids = torch.randint(0, cfg.text.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    batch = text_batch(ids)
    ours_logits = model.logits(batch)
    out = ref(input_ids=ids[None], labels=ids[None])
    assert (ours_logits - out.logits[0]).abs().max().item() <= 1e-5

    loss = lm_loss(model, batch)
    assert int(loss.count) == 36
    ours_mean = loss.loss_sum / loss.count
    assert abs(ours_mean.item() - out.loss.item()) <= 1e-5

    ours_mean.backward()
    out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    worst = max((p.grad - ref_grads[hf_name(n)].grad).abs().max().item() for n, p in model.llm.named_parameters())
    assert worst <= 1e-5
    # The ViT and projector took no part in a text-only batch.
    assert all(p.grad is None for p in model.vit.parameters())
