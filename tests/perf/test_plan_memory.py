"""``keyetron plan --precision`` counts the bytes the engine really holds: parameters, gradients
and optimizer state per rank of the ``small`` model after a step, under DP2 ZeRO-1 and under
TP2 (``small`` with 4 query and 2 KV heads, so that TP2 divides them), in fp32 and bf16 (5%)."""
import dataclasses

import pytest
import torch

from distributed import run_ranks
from keyetron.model import build_model, load_model_config
from keyetron.objectives import LanguageModelObjective
from keyetron.optim import OptimSection
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.engine import ParallelEngine
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.perf.plan import Hardware, Shape, memory, synthetic_workload
from keyetron.batch import PackedBatch
from synthetic import make_document

OPTIM = OptimSection(lr=1e-3)


def small(tp: int):
    cfg = load_model_config("small")
    if tp > 1:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_heads=4, num_kv_heads=2))
    return cfg


def _engine_bytes(rank, world, dims, precision):
    topo = Topology.from_process_group(dims, "cpu")
    cfg = small(dims.tp)
    model = build_model(cfg, dtype=torch.float32, seed=0)
    par = parallelize_keye(model, topo, ParallelConfig(sharding="zero1"),
                           param_dtype=torch.bfloat16 if precision == "bf16" else None)
    engine = ParallelEngine(par, LanguageModelObjective(), OPTIM)
    gen = torch.Generator().manual_seed(topo.dp_rank)
    engine.step([PackedBatch.from_documents([make_document(cfg, gen, text=30, sample_id=f"r{topo.dp_rank}")])])
    return engine.held_bytes()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dims", [ParallelDims(dp=2), ParallelDims(tp=2)], ids=["DP2-ZeRO1", "TP2"])
def test_the_planner_counts_what_the_engine_holds(dims, precision):
    held = run_ranks(2, _engine_bytes, dims, precision)[0]
    w = synthetic_workload(1024, 1024, 0.0, 1024, 4)
    dp = 2 // dims.tp
    planned = memory(Shape.of(small(dims.tp)), dims.tp, 1, 1, dp, 1024, 1, w, Hardware(precision=precision),
                     ac=False)
    for kind in ("weights", "grads", "optimizer"):
        assert held[kind] == pytest.approx(planned[kind], rel=0.05), (kind, held, planned)


def test_bf16_cuts_the_held_bytes_of_small_under_dp2_zero1():
    fp32 = run_ranks(2, _engine_bytes, ParallelDims(dp=2), "fp32")[0]
    bf16 = run_ranks(2, _engine_bytes, ParallelDims(dp=2), "bf16")[0]
    # 4 + 4 + 12/2 = 14 bytes per LLM parameter in fp32; 2 + 4 + 12/2 = 12 in bf16
    assert sum(bf16.values()) < 0.9 * sum(fp32.values())
