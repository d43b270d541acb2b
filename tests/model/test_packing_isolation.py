"""Documents in a packed row never see each other: packed outputs equal each document run alone."""
import pytest
import torch

from keyetron.batch import PackedBatch
from keyetron.model import build_model, set_activation_checkpointing
from synthetic import lm_loss, make_document


def documents(cfg):
    gen = torch.Generator().manual_seed(7)
    return [
        make_document(cfg, gen, text=9, sample_id="text"),
        make_document(cfg, gen, text=5, images=[(4, 6), (8, 4)], sample_id="images"),
        make_document(cfg, gen, text=4, video=[(6, 6), (2, 4), (2, 4), (6, 6)], sample_id="slow-fast video"),
        make_document(cfg, gen, text=3, images=[(2, 2)], video=[(4, 4), (2, 2)], sample_id="mixed"),
    ]


def test_packed_row_gives_each_documents_own_outputs_and_loss(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    docs = documents(tiny_cfg)
    packed = PackedBatch.from_documents(docs)
    logits = model.logits(packed)
    bounds = packed.cu_seqlens.tolist()
    total = torch.zeros((), dtype=torch.float64)
    for i, doc in enumerate(docs):
        alone = PackedBatch.from_documents([doc])
        torch.testing.assert_close(logits[bounds[i]:bounds[i + 1]], model.logits(alone), rtol=0, atol=1e-10)
        total = total + lm_loss(model, alone).loss_sum
    out = lm_loss(model, packed)
    torch.testing.assert_close(out.loss_sum, total, rtol=1e-12, atol=0)
    assert int(out.count) == packed.num_loss_tokens


def test_gradients_of_packed_row_equal_sum_over_documents(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    docs = documents(tiny_cfg)
    lm_loss(model, PackedBatch.from_documents(docs)).loss_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for doc in docs:
        lm_loss(model, PackedBatch.from_documents([doc])).loss_sum.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_activation_checkpointing_changes_nothing_but_memory(tiny_cfg):
    batch = PackedBatch.from_documents(documents(tiny_cfg))
    grads = []
    for ac in (False, True):
        model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
        set_activation_checkpointing(model, vit=ac, llm=[1] if ac else False)
        calls = {0: 0, 1: 0}
        for i in calls:
            model.llm.layers[i].mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        lm_loss(model, batch).loss_sum.backward()
        # A checkpointed block runs its forward again during backward; the others do not.
        assert calls == ({0: 1, 1: 2} if ac else {0: 1, 1: 1})
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_count_mismatch_between_pad_tokens_and_pixels_is_a_clear_error(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64)
    doc = documents(tiny_cfg)[1]
    doc.input_ids = torch.cat([doc.input_ids, torch.tensor([tiny_cfg.image_token_id])])
    doc.targets = torch.cat([doc.targets, torch.tensor([-100])])
    doc.position_ids = torch.cat([doc.position_ids, doc.position_ids[:, -1:] + 1], dim=1)
    with pytest.raises(ValueError, match=r"5 image/video pad tokens|pad tokens but its visual inputs give"):
        model(PackedBatch.from_documents([doc]))


def test_bad_activation_checkpointing_index_is_rejected(tiny_cfg):
    model = build_model(tiny_cfg, device="meta")
    with pytest.raises(ValueError, match="out of range"):
        set_activation_checkpointing(model, llm=[5])
