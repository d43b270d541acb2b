"""``train.compile``: per-block ``torch.compile`` gives the eager model's losses and gradients.

The equality test uses the ``aot_eager`` backend: Dynamo's capture (graph breaks at the
varlen attention, dynamic token counts) and AOTAutograd's joint forward/backward graphs,
everything but inductor's code generation, which on CPU means a C++ build per graph (tens of
seconds on two cores). One small inductor test checks that code generation on a forward
pass; GPU kernels (Triton) are checked where a GPU is.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from keyetron.backend.attention import varlen_attention
from keyetron.backend.compile import compile_blocks, compile_problem, opaque_varlen_attention, transformer_blocks
from keyetron.batch import PackedBatch
from keyetron.model import build_model, set_activation_checkpointing
from synthetic import lm_loss, make_document

# fp32: a compiled graph may reorder sums; losses and gradients agree to float32 rounding.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _row(cfg, seed, texts, images):
    gen = torch.Generator().manual_seed(seed)
    return PackedBatch.from_documents([make_document(cfg, gen, text=t, images=i, dtype=torch.float32)
                                       for t, i in zip(texts, images)])


def _loss_and_grads(model, row):
    model.zero_grad()
    out = lm_loss(model, row)
    (out.loss_sum / out.count).backward()
    return out.loss_sum.detach() / out.count, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager_on_rows_of_different_lengths(tiny_cfg):
    eager = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    # Compile goes after activation checkpointing: one checkpointed decoder layer, one not.
    set_activation_checkpointing(eager, llm=[1])
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    assert compile_blocks(model, backend="aot_eager") == tiny_cfg.vision.num_layers + tiny_cfg.text.num_layers
    assert list(model.state_dict()) == keys  # no _orig_mod: checkpoints load either way
    rows = [_row(tiny_cfg, 1, [5, 4], [[(4, 4)], []]),  # 24 tokens, 16 patches
            _row(tiny_cfg, 2, [8, 3], [[(2, 4)], []])]  # 26 tokens, 8 patches
    assert len({r.num_tokens for r in rows}) == len(rows)
    for row in rows:  # the second length recompiles with a symbolic token count
        ref_loss, ref_grads = _loss_and_grads(eager, row)
        loss, grads = _loss_and_grads(model, row)
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=ATOL, msg=name)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did run compiled


def test_blocks_are_the_vit_and_llm_layers_a_stage_holds(tiny_cfg):
    model = build_model(tiny_cfg, device="meta")
    assert transformer_blocks(model) == [*model.vit.layers, *model.llm.layers]
    assert transformer_blocks(model, parts=("llm",)) == list(model.llm.layers)
    model.vit = None  # a later pipeline stage
    del model.llm.layers[0]
    assert transformer_blocks(model) == [model.llm.layers[1]]
    with pytest.raises(ValueError, match="unknown part"):
        transformer_blocks(model, parts=("projector",))


def test_fullgraph_stops_at_the_data_dependent_attention(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    compile_blocks(model, parts=("llm",), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="(?i)data.dependent|graph break"):
        lm_loss(model, _row(tiny_cfg, 1, [5], [[]]))


def test_compile_problem_names_a_missing_cpp_compiler(monkeypatch, tiny_cfg):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    problem = compile_problem("cpu")
    assert "C++ compiler" in problem and "g++" in problem and "train.compile: false" in problem
    assert compile_problem("cpu", backend="aot_eager") is None
    model = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="train.compile: torch.compile on CPU generates C"):
        compile_blocks(model)
    assert not any(getattr(b, "_compiled_call_impl", None) for b in transformer_blocks(model))


@pytest.mark.skipif(compile_problem("cpu") is not None, reason=str(compile_problem("cpu")))
def test_inductor_compiled_decoder_layer_matches_eager_forward(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, num_layers=1))
    eager = build_model(cfg, dtype=torch.float32, seed=0)
    model = copy.deepcopy(eager)
    compile_blocks(model, parts=("llm",))  # inductor: C++ kernels for the regions around attention
    row = _row(cfg, 1, [6], [[]])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(row), eager.logits(row), rtol=RTOL, atol=ATOL)


def _packed(lens, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 8, generator=gen, dtype=dtype) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_opaque_attention_op_equals_varlen_attention():
    q, k, v, cu = _packed([5, 1, 9])
    outs = []
    for fn in (lambda *t: varlen_attention(*t, cu, causal=True, scale=0.3, kernel="sdpa"),
               lambda *t: opaque_varlen_attention(*t, cu, cu, True, 0.3, "sdpa")):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_opaque_attention_compiles_in_one_graph_with_checkpointing_and_any_length():
    """What the model gains once its attention is this op: fullgraph, checkpointed, dynamic."""
    from torch.utils.checkpoint import checkpoint

    proj = torch.nn.Linear(32, 32, dtype=torch.float32)

    def block(x, cu):
        q = proj(x).view(-1, 4, 8)
        kv = x.view(-1, 4, 8)[:, :2]
        return x + opaque_varlen_attention(q, kv, kv, cu, cu, True, 0.35, "sdpa").reshape(x.shape)

    def checkpointed(x, cu):
        return checkpoint(block, x, cu, use_reentrant=False)

    compiled = torch.compile(checkpointed, backend="aot_eager", fullgraph=True)
    for lens in ([5, 7], [3, 9, 2], [11]):
        q, _, _, cu = _packed(lens, dtype=torch.float32)
        x = q.reshape(-1, 32)
        grads = []
        for fn in (checkpointed, compiled):
            proj.zero_grad()
            xx = x.clone().requires_grad_()
            out = fn(xx, cu)
            out.pow(2).sum().backward()
            grads.append((out.detach(), xx.grad, proj.weight.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert counters["stats"]["unique_graphs"] <= 2  # static first length, then one symbolic graph
