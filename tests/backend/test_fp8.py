"""FP8 training of the LLM decoder's linears (torchao float8) against the high-precision model.

On CPU, torchao's emulation runs the same casts as a GPU (float8 rounding with dynamic
scales) and does the matmul in fp32, so these tests pin what GPUs compute up to the GEMM's
own accumulation: which modules are converted, that an FP8 linear is exactly the product of
its float8-rounded operands, that a converted model stays close to the fp32 one, and that
tensor parallelism, FSDP2 (with float8 all-gather) and pipeline stages with ZeRO-1 give the
same result as one process.
The real FP8 GEMMs need a GPU of compute capability >= 8.9 (skipped elsewhere).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from distributed import run_ranks
from keyetron.backend import fp8
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.model import build_model
from synthetic import accumulate_gradients, lm_loss, make_document

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao not installed (pip install -c constraints.txt -e '.[fp8]')")
has_fp8_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY

# Tolerances of FP8 against fp32 (measured on this model: loss 1e-4 relative, gradients 5-15%
# per tensor). e4m3 keeps 3 mantissa bits (up to 6% rounding per value) and tensorwise
# gradients are e5m2 (2 bits), so per-tensor gradient errors of ~10% are what FP8 is; the
# whole gradient still points the same way.
LOSS_RTOL = 1e-3
GRAD_RTOL = 0.25  # per parameter tensor, ||g8 - g|| / ||g||
GRAD_COSINE = 0.98  # the whole LLM gradient


def _rows(cfg, n=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [PackedBatch.from_documents([make_document(cfg, gen, text=9 + i, images=[(4, 4)] if i == 0 else (),
                                                      dtype=dtype),
                                        make_document(cfg, gen, text=5 + 2 * i, dtype=dtype)]) for i in range(n)]


def _loss_and_grads(model, rows):
    """Mean token loss over ``rows`` (one backward per row, as the engine does) and the gradients."""
    count = sum(r.num_loss_tokens for r in rows)
    loss = accumulate_gradients(model, rows) / count
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


DECODER_LINEARS = {f"llm.layers.{i}.{name}" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@needs_torchao
def test_only_the_llm_decoder_linears_become_fp8(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    assert set(fp8.fp8_linear_names(model)) == DECODER_LINEARS
    assert set(fp8.convert_llm_to_fp8(model, emulate=True)) == DECODER_LINEARS
    converted = {name for name, m in model.named_modules() if fp8.is_fp8_linear(m)}
    assert converted == DECODER_LINEARS  # not the ViT, projector, embedding or output head
    assert type(model.llm.lm_head).__name__ == "OutputHead" and type(model.projector.linear_1) is nn.Linear
    # Checkpoints and the optimizer see the same parameters under the same names.
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())


@needs_torchao
def test_emulated_fp8_linear_is_the_product_of_float8_rounded_operands():
    """Tensorwise recipe: each operand scaled by (float8 max / its amax), rounded to e4m3 (inputs,
    weights) or e5m2 (output gradients), the product taken in fp32."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    net = fp8.torchao_float8().convert_to_float8_training(nn.Sequential(linear),
                                                          config=fp8.fp8_config("tensorwise", emulate=True))
    linear = net[0]
    x = torch.randn(24, 64, requires_grad=True)
    grad_out = torch.randn(24, 32)
    y = linear(x)
    y.backward(grad_out)

    def rounded(t, dtype):
        scale = (torch.finfo(dtype).max / t.abs().max().double()).float()
        return (t.float() * scale).to(dtype).float() / scale

    xq, wq = rounded(x.detach(), torch.float8_e4m3fn), rounded(linear.weight.detach(), torch.float8_e4m3fn)
    gq = rounded(grad_out, torch.float8_e5m2)
    torch.testing.assert_close(y.detach(), xq @ wq.T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(linear.weight.grad, gq.T @ xq, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y.detach(), x.detach() @ linear.weight.detach().T, rtol=1e-4, atol=0)


@needs_torchao
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_emulated_fp8_model_loss_and_gradients_close_to_fp32(tiny_cfg, recipe):
    reference = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    model = copy.deepcopy(reference)
    fp8.convert_llm_to_fp8(model, recipe=recipe, emulate=True)
    rows = _rows(tiny_cfg)
    ref_loss, ref_grads = _loss_and_grads(reference, rows)
    loss, grads = _loss_and_grads(model, rows)
    assert loss != ref_loss  # FP8 rounding happened
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss)
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= GRAD_RTOL * g.norm(), name
    llm = [n for n in ref_grads if n.startswith("llm.")]
    flat_ref, flat = (torch.cat([gs[n].flatten() for n in llm]) for gs in (ref_grads, grads))
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) >= GRAD_COSINE


def _tp_row(cfg):
    """Two documents padded to an even length (sequence parallelism over 2 ranks)."""
    gen = torch.Generator().manual_seed(7)
    docs = [make_document(cfg, gen, text=5, images=[(4, 4)], dtype=torch.float32),
            make_document(cfg, gen, text=4, dtype=torch.float32)]
    row = PackedBatch.from_documents(docs)
    if row.num_tokens % 2:
        pad = dataclasses.replace(docs[-1], input_ids=torch.zeros(1, dtype=torch.long),
                                  targets=torch.full((1,), IGNORE_INDEX),
                                  position_ids=torch.zeros(3, 1, dtype=torch.long))
        row = PackedBatch.from_documents(docs + [pad])
    return row


def _llm_loss(llm, row):
    hidden = llm(llm.embed_tokens(row.input_ids), row)
    keep = row.targets != IGNORE_INDEX
    return -llm.lm_head.token_logprobs(hidden[keep], row.targets[keep]).sum() / keep.sum()


def _fp8_llm(cfg, recipe):
    llm = build_model(cfg, dtype=torch.float32, seed=0).llm
    fp8.convert_llm_to_fp8(llm, recipe=recipe, emulate=True)
    return llm


def _tp_rank(rank, world, cfg, row, references):
    from keyetron.parallel.tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads
    from keyetron.parallel.topology import ParallelDims, Topology

    topo = Topology.from_process_group(ParallelDims(tp=world), "cpu")
    worst = {}
    for recipe, (ref_loss, ref_grads) in references.items():
        for sp in (True, False):
            llm = _fp8_llm(cfg, recipe)
            apply_tensor_parallel(llm, topo.submesh("tp"), sequence_parallel=sp)
            assert fp8.is_fp8_linear(llm.layers[0].self_attn.q_proj)
            loss = _llm_loss(llm, row)
            loss.backward()
            reduce_tp_partial_grads(llm)
            errors = [abs(float(loss.detach()) - ref_loss) / abs(ref_loss)]
            for name, p in llm.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                errors.append(float((g - ref_grads[name]).norm() / ref_grads[name].norm()))
            worst[(recipe, sp)] = max(errors)
    return worst


@needs_torchao
def test_fp8_under_tensor_parallelism_equals_one_process(tiny_cfg):
    """TP2 with and without sequence parallelism: DTensor computes each scale over the whole
    tensor (its amax is reduced over the ranks), so the shards round exactly as one process does."""
    row = _tp_row(tiny_cfg)
    references = {}
    for recipe in fp8.RECIPES:
        llm = _fp8_llm(tiny_cfg, recipe)
        loss = _llm_loss(llm, row)
        loss.backward()
        references[recipe] = (float(loss.detach()), {n: p.grad.clone() for n, p in llm.named_parameters()})
    for rank_worst in run_ranks(2, _tp_rank, tiny_cfg, row, references):
        for layout, error in rank_worst.items():
            assert error < 1e-5, (layout, error)


def _fsdp_rank(rank, world, cfg, rows, reference):
    from keyetron.parallel.fsdp import apply_fsdp
    from keyetron.parallel.topology import ParallelDims, Topology

    topo = Topology.from_process_group(ParallelDims(dp=world), "cpu")
    model = build_model(cfg, dtype=torch.float32, seed=0)
    fp8.convert_llm_to_fp8(model, emulate=True, fsdp_float8_all_gather=True)
    apply_fsdp(model, topo)
    count = sum(r.num_loss_tokens for r in rows)
    for row in rows[rank::world]:  # each rank its row; FSDP sums the gradients
        (lm_loss(model, row).loss_sum / count).backward()
    weight = model.llm.layers[0].mlp.up_proj.weight
    assert type(weight.to_local()).__name__ == "WeightWithDynamicFloat8CastTensor"
    plain = fp8.high_precision(weight)  # what a checkpoint should write: no torchao class to unpickle
    assert type(plain.to_local()) is torch.Tensor and plain.placements == weight.placements
    initial = build_model(cfg, dtype=torch.float32, seed=0).llm.layers[0].mlp.up_proj.weight
    assert torch.equal(plain.full_tensor(), initial)
    errors = {}
    for name, p in model.named_parameters():
        if name.startswith("llm."):
            errors[name] = float((p.grad.full_tensor() - reference[name]).norm() / reference[name].norm())
    fp8.precompute_fp8_scales(model)  # after the optimizer step in training; runs its all-reduce here
    return errors


@needs_torchao
def test_fp8_with_fsdp2_float8_all_gather_equals_one_process(tiny_cfg):
    """FSDP2 over 2 ranks all-gathers the FP8 weights in float8 (scales from the global amax)."""
    rows = _rows(tiny_cfg)
    model = build_model(tiny_cfg, dtype=torch.float32, seed=0)
    fp8.convert_llm_to_fp8(model, emulate=True)
    _, grads = _loss_and_grads(model, rows)
    reference = {n: g for n, g in grads.items() if n.startswith("llm.")}
    for errors in run_ranks(2, _fsdp_rank, tiny_cfg, rows, reference):
        assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])


PP_ROW = 64  # pipeline stages need one static row length


def _pp_setup(tiny_cfg):
    from keyetron.data.packing import build_row

    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, num_layers=4))
    gen = torch.Generator().manual_seed(5)
    rows = [build_row([make_document(cfg, gen, text=6 + r, images=[(4, 4)], dtype=torch.float32),
                       make_document(cfg, gen, text=9, dtype=torch.float32)], PP_ROW) for r in range(2)]
    return cfg, rows


def _fp8_model(cfg):
    model = build_model(cfg, dtype=torch.float32, seed=0)
    fp8.convert_llm_to_fp8(model, emulate=True)
    return model


def _pp_rank(rank, world, cfg, rows):
    from keyetron.objectives import LanguageModelObjective
    from keyetron.optim import OptimSection
    from keyetron.parallel.config import ParallelConfig
    from keyetron.parallel.engine import ParallelEngine
    from keyetron.parallel.parallelize import parallelize_keye
    from keyetron.parallel.topology import ParallelDims, Topology

    topo = Topology.from_process_group(ParallelDims(pp=world), "cpu")
    par = parallelize_keye(_fp8_model(cfg), topo, ParallelConfig(sharding="zero1", schedule="1f1b"),
                           row_tokens=PP_ROW, micro_batches=len(rows))
    stats = ParallelEngine(par, LanguageModelObjective(), OptimSection()).step(rows)
    return stats.loss, stats.grad_norm


@needs_torchao
def test_fp8_through_pipeline_stages_with_zero1_equals_one_process(tiny_cfg):
    """2 pipeline stages (1F1B, 2 micro-batches): the stages' FP8 linears exchange high-precision
    activations; the step's loss and gradient norm are the single process's."""
    cfg, rows = _pp_setup(tiny_cfg)
    model = _fp8_model(cfg)
    loss = accumulate_gradients(model, rows) / sum(r.num_loss_tokens for r in rows)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    for rank_loss, rank_norm in run_ranks(2, _pp_rank, cfg, rows):
        assert rank_loss == pytest.approx(loss, rel=1e-6)
        assert rank_norm == pytest.approx(norm, rel=1e-5)  # the engine sums squares in fp64


def test_fp8_problem_says_what_to_install_without_torchao(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    problem = fp8.fp8_problem("cpu", emulate=True)
    assert "torchao" in problem and "pip install" in problem and ".[fp8]" in problem


@pytest.mark.skipif(has_fp8_gpu, reason="this machine can run FP8")
def test_fp8_problem_names_the_device_that_cannot_run_fp8():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = fp8.fp8_problem(device)
    assert "compute capability >= 8.9" in problem
    assert ("runs on cpu" in problem) if device == "cpu" else (" has " in problem)


def test_fp8_problem_names_layers_whose_dimensions_are_not_multiples_of_16(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, intermediate_size=40))
    model = build_model(cfg, device="meta")
    problem = fp8.fp8_problem(None, model)
    for name in ("llm.layers.0.mlp.gate_proj", "llm.layers.1.mlp.down_proj"):
        assert name in problem
    assert "40 x 32" in problem and "multiples of 16" in problem
    assert "q_proj" not in problem and "vit" not in problem
    assert fp8.fp8_problem(None, build_model(tiny_cfg, device="meta")) is None


@needs_torchao
def test_fp8_problem_accepts_emulation_anywhere_and_refuses_unknown_recipes(tiny_cfg):
    model = build_model(tiny_cfg, device="meta")
    assert fp8.fp8_problem("cpu", model, emulate=True) is None
    assert "unknown FP8 recipe 'blockwise'" in fp8.fp8_problem("cpu", model, recipe="blockwise", emulate=True)


@needs_torchao
@pytest.mark.skipif(has_fp8_gpu, reason="this machine can run FP8")
def test_converting_where_fp8_cannot_run_raises_with_the_reason(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="train.fp8: FP8 matmuls need .*compute capability"):
        fp8.convert_llm_to_fp8(model)
    assert not any(fp8.is_fp8_linear(m) for m in model.modules())


@needs_torchao
@pytest.mark.skipif(not has_fp8_gpu, reason="needs an NVIDIA GPU of compute capability >= 8.9 (FP8 tensor cores)")
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_gemms_on_gpu_close_to_bf16(tiny_cfg, recipe):
    """The real FP8 GEMMs (torch._scaled_mm) on a packed row whose length is a multiple of 16."""
    reference = build_model(tiny_cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    model = copy.deepcopy(reference)
    fp8.convert_llm_to_fp8(model, recipe=recipe)
    gen = torch.Generator().manual_seed(3)
    row = PackedBatch.from_documents([make_document(tiny_cfg, gen, text=16, dtype=torch.bfloat16)]).to("cuda")
    assert row.num_tokens % 16 == 0, row.num_tokens
    losses, grads = [], []
    for m in (reference, model):
        out = lm_loss(m, row)
        (out.loss_sum / out.count).backward()
        losses.append(float(out.loss_sum / out.count))
        grads.append(torch.cat([p.grad.float().flatten() for n, p in m.named_parameters()
                                if n.startswith("llm.layers")]))
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) >= GRAD_COSINE
