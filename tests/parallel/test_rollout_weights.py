"""Rollout weights from a training layout (``keyetron.parallel.rollout_weights``): after an optimizer
step under DP2 + ZeRO-1, TP2 and PP2 (+ ZeRO-1), every rank's generation replica holds exactly the
weights one process has after the same fp64 step (1e-10), and generates the same tokens with the
same log-probs as that process's model."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.rollout_weights import generation_replica
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.rollout import SamplingParams, generate
from layouts import PP_LAYERS, PP_ROW, build_engine, fresh_model, reference_run, step_rows, tiny_config
from synthetic import make_document

ROWS = 2


def _prompts(cfg):
    gen = torch.Generator().manual_seed(5)
    return [make_document(cfg, gen, text=4, images=[(4, 4)], sample_id="img"),
            make_document(cfg, gen, text=3, video=[(4, 4), (2, 2)], sample_id="vid")]


def _rollout(model, cfg):
    results, _ = generate(model, _prompts(cfg), SamplingParams(temperature=1.0, max_new_tokens=4), stop_ids=[],
                          samples=2, seed=3)
    return [(r.token_ids, r.logprobs) for per in results for r in per]


def _run(rank, world, dims, sharding, pp):
    cfg = tiny_config(PP_LAYERS) if pp else tiny_config()
    topo = Topology.from_process_group(dims, "cpu")
    model = fresh_model(cfg)
    engine = build_engine(model, topo, sharding=sharding, row_tokens=PP_ROW if pp else None,
                          micro_batches=ROWS // topo.dims.dp)
    share = ROWS // topo.dims.dp
    rows = step_rows(0, ROWS, cfg, PP_ROW if pp else None)
    engine.step(rows[topo.dp_rank * share:(topo.dp_rank + 1) * share])
    replica = generation_replica(engine.par, cfg)
    return {n: p.detach().clone() for n, p in replica.named_parameters()}, _rollout(replica, cfg)


LAYOUTS = {  # name: (dims, world, sharding, pipeline)
    "DP2-ZeRO1": (ParallelDims(dp=2), 2, "zero1", False),
    "TP2": (ParallelDims(tp=2), 2, "none", False),
    "PP2-ZeRO1": (ParallelDims(pp=2), 2, "zero1", True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_generates_with_the_weights_one_process_trained(name):
    dims, world, sharding, pp = LAYOUTS[name]
    cfg = tiny_config(PP_LAYERS) if pp else tiny_config()
    _, ref_params = reference_run(1, ROWS, cfg, PP_ROW if pp else None)
    reference = fresh_model(cfg)
    reference.load_state_dict(ref_params, strict=False)
    ref_rollout = _rollout(reference.eval(), cfg)
    for params, rollout in run_ranks(world, _run, dims, sharding, pp):
        assert set(params) == set(ref_params)
        for pname, ref in ref_params.items():
            torch.testing.assert_close(params[pname], ref, rtol=0, atol=1e-10, msg=f"{name}: {pname}")
        for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(rollout, ref_rollout):
            assert tokens == ref_tokens
            torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-9)


def _prompt_set(cfg):
    gen = torch.Generator().manual_seed(8)
    return [make_document(cfg, gen, text=3 + i, images=[(4, 4)] * (i % 2), video=[(4, 4), (2, 2)] if i == 3 else (),
                          sample_id=f"p{i}") for i in range(5)]


def _run_shared(rank, world, dims):
    from keyetron.parallel.rollout_weights import data_parallel_rollouts

    cfg = tiny_config()
    topo = Topology.from_process_group(dims, "cpu")
    engine = build_engine(fresh_model(cfg), topo, sharding="zero1")
    share = ROWS // topo.dims.dp
    engine.step(step_rows(0, ROWS, cfg)[topo.dp_rank * share:(topo.dp_rank + 1) * share])
    results, stats = data_parallel_rollouts(engine.par, cfg, _prompt_set(cfg), SamplingParams(temperature=1.0,
                                            max_new_tokens=4), stop_ids=[], samples=2, seed=6)
    return [[(r.prompt_index, r.token_ids, r.logprobs) for r in per] for per in results], [s.prompts for s in stats]


@pytest.mark.parametrize("dims, world", [(ParallelDims(dp=2), 2), (ParallelDims(dp=2, tp=2), 4)])
def test_prompts_shared_over_data_parallel_ranks_give_the_one_process_rollouts(dims, world):
    cfg = tiny_config()
    _, ref_params = reference_run(1, ROWS, cfg)
    reference = fresh_model(cfg)
    reference.load_state_dict(ref_params, strict=False)
    ref, _ = generate(reference.eval(), _prompt_set(cfg), SamplingParams(temperature=1.0, max_new_tokens=4),
                      stop_ids=[], samples=2, seed=6)
    for results, per_rank in run_ranks(world, _run_shared, dims):
        assert sorted(per_rank) == [2, 3]  # the balancer dealt the 5 prompts 2 + 3
        for p, (per, ref_per) in enumerate(zip(results, ref)):
            for (index, tokens, logprobs), r in zip(per, ref_per):
                assert index == p and tokens == r.token_ids
                torch.testing.assert_close(logprobs, r.logprobs, rtol=0, atol=1e-9)
