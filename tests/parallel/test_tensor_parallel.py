"""Tensor parallelism of the LLM equals the single-process model: forward, loss, gradients, AdamW steps.

Each layout runs with sequence parallelism on and off in the same ranks (fp64, tiny model):
TP2 splits tiny's 2 KV heads; TP4 replicates each KV head on 2 ranks; a 1-KV-head variant at
TP2 replicates it on both, with tied embeddings.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed import run_ranks
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.model import build_model, load_model_config
from synthetic import make_document

TOL = 1e-10
STEPS = 3


def _config(**text):
    cfg = load_model_config("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text)) if text else cfg


def _row(cfg, multiple: int) -> PackedBatch:
    """Text, an image (3D positions) and text again, padded to a multiple of ``multiple`` tokens."""
    gen = torch.Generator().manual_seed(7)
    docs = [make_document(cfg, gen, text=5, images=[(4, 4)]), make_document(cfg, gen, text=4)]
    row = PackedBatch.from_documents(docs)
    pad = -row.num_tokens % multiple
    if pad:  # what the engine does under sequence parallelism: a padding document without loss
        pad_doc = dataclasses.replace(docs[-1], input_ids=torch.zeros(pad, dtype=torch.long),
                                      targets=torch.full((pad,), IGNORE_INDEX),
                                      position_ids=torch.arange(pad).expand(3, pad).clone())
        row = PackedBatch.from_documents(docs + [pad_doc])
    return row


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def _loss(llm, row):
    """The LLM's final hidden states of the row, the summed loss of its targets and their count."""
    hidden = llm(llm.embed_tokens(row.input_ids), row)
    keep = row.targets != IGNORE_INDEX
    loss_sum = -llm.lm_head.token_logprobs(hidden[keep], row.targets[keep]).sum()
    return hidden, loss_sum, keep.sum()


def _reference(cfg, row):
    """Single process: step-0 hidden, loss and grads, and the LLM parameters after STEPS AdamW steps."""
    model = build_model(cfg, dtype=torch.float64, seed=0)
    llm = model.llm
    opt = _optimizer(llm.parameters())
    for step in range(STEPS):
        hidden, loss_sum, num_tokens = _loss(llm, row)
        (loss_sum / num_tokens).backward()
        if step == 0:
            first = (hidden.detach(), loss_sum.detach(), int(num_tokens),
                     {n: p.grad.clone() for n, p in llm.named_parameters()})
        opt.step()
        opt.zero_grad()
    return first, {n: p.detach().clone() for n, p in llm.named_parameters()}


def _tp_rank(rank, world, cfg, row, reference):
    from keyetron.parallel.tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads
    from keyetron.parallel.topology import ParallelDims, Topology

    (ref_hidden, ref_loss, ref_count, ref_grads), ref_params = reference
    topo = Topology.from_process_group(ParallelDims(tp=world), "cpu")
    diffs = {}
    for sp in (True, False):
        llm = build_model(cfg, dtype=torch.float64, seed=0).llm
        apply_tensor_parallel(llm, topo.submesh("tp"), sequence_parallel=sp)
        assert (llm.lm_head.weight is llm.embed_tokens.weight) == cfg.text.tie_word_embeddings
        opt = _optimizer(llm.parameters())
        held = []  # the residual stream's tokens on this rank, inside the decoder layers
        llm.layers[0].register_forward_pre_hook(lambda layer, args: held.append(args[0].shape[0]))
        for step in range(STEPS):
            hidden, loss_sum, num_tokens = _loss(llm, row)
            (loss_sum / num_tokens).backward()
            if step == 0:
                assert int(num_tokens) == ref_count
                if sp:  # each rank holds its 1/tp of the tokens
                    assert held[0] * world == row.num_tokens
                diffs[f"sp={sp} hidden"] = (hidden - ref_hidden).abs().max().item()
                diffs[f"sp={sp} loss"] = abs(loss_sum.item() - ref_loss.item())
                diffs[f"sp={sp} grads"] = max((p.grad.full_tensor() - ref_grads[n]).abs().max().item()
                                              for n, p in llm.named_parameters())
            reduce_tp_partial_grads(llm)
            assert all(p.grad.placements == p.placements for p in llm.parameters())
            opt.step()
            opt.zero_grad()
        diffs[f"sp={sp} params after {STEPS} steps"] = max(
            (p.full_tensor() - ref_params[n]).abs().max().item() for n, p in llm.named_parameters())
    return diffs


LAYOUTS = {
    "tp2-split-kv": (2, {}),
    "tp4-kv-replicated-over-2": (4, {}),
    "tp2-one-kv-head-tied-embeddings": (2, {"num_kv_heads": 1, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tensor_parallel_matches_single_process(layout):
    tp, text = LAYOUTS[layout]
    cfg = _config(**text)
    row = _row(cfg, tp)
    results = run_ranks(tp, _tp_rank, cfg, row, _reference(cfg, row))
    for rank, diffs in enumerate(results):
        for what, diff in diffs.items():
            assert diff < TOL, f"rank {rank} {what}: max abs diff {diff:.3e}"


def _unpadded_row_rank(rank, world, cfg, row):
    from keyetron.parallel.tensor_parallel import apply_tensor_parallel
    from keyetron.parallel.topology import ParallelDims, Topology

    topo = Topology.from_process_group(ParallelDims(tp=world), "cpu")
    llm = build_model(cfg, dtype=torch.float64, seed=0).llm
    apply_tensor_parallel(llm, topo.submesh("tp"), sequence_parallel=True)
    with pytest.raises(ValueError, match="pad the packed row to a multiple of 2"):
        llm(llm.embed_tokens(row.input_ids), row)


def test_sequence_parallel_rejects_a_row_not_divisible_by_tp():
    cfg = _config()
    row = PackedBatch.from_documents([make_document(cfg, torch.Generator().manual_seed(0), text=3, images=[(2, 2)])])
    assert row.num_tokens == 9
    run_ranks(2, _unpadded_row_rank, cfg, row)


def test_layouts_that_cannot_split_the_heads_are_refused():
    from keyetron.parallel.tensor_parallel import kv_heads_replicated

    cfg = _config(num_heads=12, num_kv_heads=4)
    assert kv_heads_replicated(cfg.text, 2) is False and kv_heads_replicated(cfg.text, 4) is False
    assert kv_heads_replicated(_config(num_heads=8, num_kv_heads=2).text, 8) is True
    with pytest.raises(ValueError, match="must divide num_heads 12"):
        kv_heads_replicated(cfg.text, 8)
    with pytest.raises(ValueError, match="num_kv_heads 4: one must divide the other"):
        kv_heads_replicated(cfg.text, 6)
