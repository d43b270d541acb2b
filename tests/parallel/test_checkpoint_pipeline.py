"""A checkpoint written by a pipeline layout (PP2xTP2, ZeRO-1, after 2 steps) resumes under
CP2xDP2 and in one process, and the 3rd step equals the single-process reference (fp64)."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.sharded_checkpoint import load_distributed, load_into_single_process, save_distributed
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.optim import optimizer_param_groups
from synthetic import accumulate_gradients
from layouts import OPTIM, PP_LAYERS, PP_ROW, build_engine, fresh_model, reference_run, step_rows, tiny_config

ROWS = 2


def _rows(topo, step):
    share = ROWS // topo.dims.dp
    return step_rows(step, ROWS, tiny_config(PP_LAYERS), PP_ROW)[topo.dp_rank * share:(topo.dp_rank + 1) * share]


def _engine(topo):
    model = fresh_model(tiny_config(PP_LAYERS))
    return model, build_engine(model, topo, row_tokens=PP_ROW, micro_batches=ROWS // topo.dims.dp)


def _save_under_pp2xtp2(rank, world, path):
    topo = Topology.from_process_group(ParallelDims(pp=2, tp=2), "cpu")
    model, engine = _engine(topo)
    for step in range(2):
        engine.step(_rows(topo, step))
    save_distributed(path, model, engine.optimizer, topo, {"step": 2})
    return sorted(model.state_dict())  # the keys this pipeline stage holds


def _resume_under_cp2xdp2(rank, world, path):
    topo = Topology.from_process_group(ParallelDims(dp=2, cp=2), "cpu")
    model, engine = _engine(topo)
    assert load_distributed(path, model, engine.optimizer, topo) == {"step": 2}
    engine.step(_rows(topo, 2))
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "pp2xtp2")
    stage_keys = run_ranks(4, _save_under_pp2xtp2, path)
    return path, stage_keys


@pytest.fixture(scope="module")
def reference():
    return reference_run(3, ROWS, tiny_config(PP_LAYERS), PP_ROW)[1]


def test_pipeline_stages_save_only_their_own_keys(saved):
    _, keys = saved
    first, last = set(keys[0]), set(keys[2])  # ranks 0-1: stage 0, ranks 2-3: stage 1
    assert any(k.startswith("vit.") for k in first) and not any(k.startswith("vit.") for k in last)
    assert "llm.lm_head.weight" in last and "llm.lm_head.weight" not in first
    assert not first & last


def test_pp2xtp2_checkpoint_resumes_under_cp2xdp2(saved, reference):
    for params in run_ranks(4, _resume_under_cp2xdp2, saved[0]):
        for name, ref in reference.items():
            torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-10, msg=name)


def test_pp2xtp2_checkpoint_resumes_in_one_process(saved, reference):
    model = fresh_model(tiny_config(PP_LAYERS))
    opt = torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)
    assert load_into_single_process(saved[0], model, opt) == {"step": 2}
    opt.zero_grad(set_to_none=True)
    accumulate_gradients(model, step_rows(2, ROWS, tiny_config(PP_LAYERS), PP_ROW), "cpu", None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=0, atol=1e-10, msg=name)
