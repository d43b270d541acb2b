"""Data parallel (with and without ZeRO-1) equals one process over 3 optimizer steps in fp64."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.topology import ParallelDims, Topology
from layouts import OPTIM, build_engine, fresh_model, reference_run, step_rows

STEPS, ROWS = 3, 4


def _dp_run(rank, world, zero1):
    topo = Topology.from_process_group(ParallelDims(dp=world), "cpu")
    model = fresh_model()
    engine = build_engine(model, topo, sharding="zero1" if zero1 else "none")
    losses = []
    per_rank = ROWS // world
    for step in range(STEPS):
        rows = step_rows(step, ROWS)[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
        losses.append(engine.step(rows).loss)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, ROWS)


@pytest.mark.parametrize("world,zero1", [(2, False), (2, True), (4, True)])
def test_data_parallel_equals_single_process(reference, world, zero1):
    ref_losses, ref_params = reference
    results = run_ranks(world, _dp_run, zero1)
    for losses, params in results:
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-10, msg=name)


def test_clipping_was_active_in_the_reference(reference):
    """The comparison is only meaningful if the global-norm clip changed the update."""
    model = fresh_model()
    from synthetic import accumulate_gradients
    accumulate_gradients(model, step_rows(0, ROWS), "cpu", None)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert float(norm) > OPTIM.clip_grad
    assert Topology.single().world_size == 1
