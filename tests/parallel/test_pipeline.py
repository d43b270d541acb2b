"""Pipeline parallel layouts equal one process over 3 fp64 optimizer steps (loss and every
parameter to 1e-10): GPipe, 1F1B and interleaved 1F1B, alone and with TP, CP and DP."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.pipeline import split_layers
from keyetron.parallel.topology import ParallelDims, Topology
from layouts import PP_LAYERS, PP_ROW, build_engine, fresh_model, reference_run, step_rows, tiny_config

STEPS, ROWS = 3, 4


def _run(rank, world, dims, schedule, virtual, zero1):
    cfg = tiny_config(PP_LAYERS)
    topo = Topology.from_process_group(dims, "cpu")
    model = fresh_model(cfg)
    per_rank = ROWS // topo.dims.dp
    engine = build_engine(model, topo, sharding="zero1" if zero1 else "none", schedule=schedule, virtual=virtual,
                          row_tokens=PP_ROW, micro_batches=per_rank)
    losses = []
    for step in range(STEPS):
        rows = step_rows(step, ROWS, cfg, PP_ROW)[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
        losses.append(engine.step(rows).loss)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, params, topo.pp_rank


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, ROWS, tiny_config(PP_LAYERS), PP_ROW)


LAYOUTS = {  # name: (dims, world, schedule, virtual, zero1)
    "PP2-1F1B": (ParallelDims(pp=2), 2, "1f1b", 1, True),
    "PP2-GPipe-noZeRO": (ParallelDims(pp=2), 2, "gpipe", 1, False),
    "PP2-interleaved": (ParallelDims(pp=2), 2, "interleaved", 2, True),
    "PP2xTP2": (ParallelDims(pp=2, tp=2), 4, "1f1b", 1, True),
    "PP2xCP2": (ParallelDims(pp=2, cp=2), 4, "1f1b", 1, True),
    "PP2xTP2xDP2": (ParallelDims(pp=2, dp=2, tp=2), 8, "1f1b", 1, True),
    "PP2xCP2xTP2": (ParallelDims(pp=2, cp=2, tp=2), 8, "1f1b", 1, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_layout_equals_single_process(reference, name):
    dims, world, schedule, virtual, zero1 = LAYOUTS[name]
    ref_losses, ref_params = reference
    seen = set()
    for losses, params, pp_rank in run_ranks(world, _run, dims, schedule, virtual, zero1):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        for pname, value in params.items():
            torch.testing.assert_close(value, ref_params[pname], rtol=0, atol=1e-10, msg=f"{name}: {pname}")
            seen.add(pname)
    assert seen == set(ref_params)  # the stages together hold every parameter


def test_layer_split_counts_the_vit_on_stage_zero():
    assert split_layers(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_layers(8, 2, first_stage_extra=2.0) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert split_layers(4, 4, first_stage_extra=10.0) == [[0], [1], [2], [3]]  # every stage keeps a layer
    with pytest.raises(ValueError, match="at least as many decoder layers"):
        split_layers(2, 4)
