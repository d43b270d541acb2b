"""FSDP2 (sharded LLM weights, gradients and optimizer state over dp x cp) equals one process
over 3 fp64 optimizer steps (loss and every parameter to 1e-10), alone and with CP and TP."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.fsdp import apply_fsdp
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.topology import ParallelDims, Topology
from synthetic import accumulate_gradients
from layouts import build_engine, fresh_model, reference_run, step_rows

STEPS, ROWS = 3, 2


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _run(rank, world, dims):
    topo = Topology.from_process_group(dims, "cpu")
    model = fresh_model()
    engine = build_engine(model, topo, sharding="fsdp2")
    per_rank = ROWS // topo.dims.dp
    losses, norms = [], []
    for step in range(STEPS):
        rows = step_rows(step, ROWS)[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
        stats = engine.step(rows)
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    return losses, norms[0], {n: full(p) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, ROWS)


@pytest.fixture(scope="module")
def reference_first_norm():
    """The unclipped gradient norm of step 0 in one process. AdamW and norm clipping barely see a
    uniform gradient scale, so this pins that FSDP sums (not averages) and counts each value once."""
    model = fresh_model()
    accumulate_gradients(model, step_rows(0, ROWS), "cpu", None)
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))


LAYOUTS = {  # name: (dims, world)
    "FSDP2-DP2": (ParallelDims(dp=2), 2),
    "FSDP2-CP2": (ParallelDims(cp=2), 2),
    "FSDP2-TP2xDP2": (ParallelDims(dp=2, tp=2), 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fsdp2_layout_equals_single_process(reference, reference_first_norm, name):
    dims, world = LAYOUTS[name]
    ref_losses, ref_params = reference
    for losses, first_norm, params in run_ranks(world, _run, dims):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        assert first_norm == pytest.approx(reference_first_norm, rel=1e-12)
        for pname, ref in ref_params.items():
            torch.testing.assert_close(params[pname], ref, rtol=0, atol=1e-10, msg=f"{name}: {pname}")


def _local_storage(rank, world, dims):
    topo = Topology.from_process_group(dims, "cpu")
    model = fresh_model()
    full_llm = sum(p.numel() for p in model.llm.parameters())
    full_vit = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("llm."))
    build_engine(model, topo, sharding="fsdp2")
    local_llm = sum(p.to_local().numel() for p in model.llm.parameters())
    local_vit = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("llm."))
    return full_llm, local_llm, full_vit, local_vit


@pytest.mark.parametrize("dims,world", [(ParallelDims(dp=2), 2), (ParallelDims(dp=2, tp=2), 4)])
def test_fsdp2_shards_the_llm_weights(dims, world):
    """Each rank stores about 1/world of the LLM (FSDP over dp x cp, times TP); the ViT stays whole."""
    for full_llm, local_llm, full_vit, local_vit in run_ranks(world, _local_storage, dims):
        assert abs(local_llm - full_llm / world) <= 0.01 * full_llm / world, (local_llm, full_llm, world)
        assert local_vit == full_vit


def test_fsdp2_refuses_pipeline_stages_and_unknown_shardings():
    pp2 = Topology(ParallelDims(pp=2, dp=1), 0, "cpu")  # refused before any collective
    with pytest.raises(ValueError, match="FSDP2 with pipeline parallelism"):
        parallelize_keye(fresh_model(), pp2, ParallelConfig(sharding="fsdp2"))
    with pytest.raises(ValueError, match="sharding='zero3'"):
        ParallelConfig(sharding="zero3")
    with pytest.raises(ValueError, match="needs a distributed topology"):
        apply_fsdp(fresh_model(), Topology.single())
