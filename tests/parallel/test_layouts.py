"""Layout matrix: every parallel layout equals one process over 3 fp64 optimizer steps
(loss and every parameter to 1e-10), with images and a Slow-Fast video in every row."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.topology import ParallelDims, Topology
from layouts import build_engine, fresh_model, reference_run, step_rows

STEPS, ROWS = 3, 2


def _run(rank, world, dims, zero1, sp):
    topo = Topology.from_process_group(dims, "cpu")
    model = fresh_model()
    engine = build_engine(model, topo, sharding="zero1" if zero1 else "none", sequence_parallel=sp)
    dp = topo.dims.dp
    losses = []
    for step in range(STEPS):
        rows = step_rows(step, ROWS)
        mine = rows[topo.dp_rank * (ROWS // dp):(topo.dp_rank + 1) * (ROWS // dp)]
        losses.append(engine.step(mine).loss)
    return losses, {n: full(p) for n, p in model.named_parameters()}


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, ROWS)


LAYOUTS = {  # name: (dims, world, zero1, sequence_parallel)
    "CP2": (ParallelDims(cp=2), 2, True, True),
    "CP2-noZeRO": (ParallelDims(cp=2), 2, False, True),
    "DP2xCP2": (ParallelDims(dp=2, cp=2), 4, True, True),
    "TP2": (ParallelDims(tp=2), 2, True, True),
    "TP2-noSP-noZeRO": (ParallelDims(tp=2), 2, False, False),
    "TP2xCP2": (ParallelDims(cp=2, tp=2), 4, True, True),
    "TP2xDP2": (ParallelDims(dp=2, tp=2), 4, True, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_process(reference, name):
    dims, world, zero1, sp = LAYOUTS[name]
    ref_losses, ref_params = reference
    for losses, params in run_ranks(world, _run, dims, zero1, sp):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        for pname, ref in ref_params.items():
            torch.testing.assert_close(params[pname], ref, rtol=0, atol=1e-10, msg=f"{name}: {pname}")
