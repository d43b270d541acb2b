"""Multi-process training runs of a recipe on the demo data: the layouts that read the same
data as one process (dp=1) follow its loss curve, and a checkpoint written under one layout
resumes under another."""
import json

import pytest

from distributed import run_ranks
from keyetron.data.demo import make_demo
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.train.recipe import load_recipe
from keyetron.train.trainer import Trainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=3, train_size=40, eval_size=6)
    return out


def recipe_file(path, demo, out, steps, **parallel):
    path.write_text(json.dumps({
        "name": "p", "output_dir": str(out), "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")], "eval": str(demo / "eval.jsonl"),
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 256, "buffer_docs": 8, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
        "train": {"steps": steps, "grad_accum": 2}, "log": {"every": 1, "tensorboard": False},
        "eval": {"max_new_tokens": 2}, "parallel": parallel}))
    return str(path)


def _train(rank, world, recipe_path, dims):
    recipe = load_recipe(recipe_path)
    topo = Topology.from_process_group(dims, "cpu")
    summary = Trainer(recipe, topo=topo).fit()
    return summary.get("eval"), logged_losses(recipe) if rank == 0 else None


def logged_losses(recipe) -> list[float]:
    """The per-step training losses rank 0 wrote to metrics.jsonl."""
    with open(f"{recipe.output_dir}/metrics.jsonl") as f:
        return [m["train/loss"] for m in map(json.loads, f) if "train/loss" in m]


@pytest.fixture(scope="module")
def single(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    recipe = load_recipe(recipe_file(tmp / "r.yaml", demo, tmp / "out", 4))
    Trainer(recipe).fit()
    return logged_losses(recipe)


@pytest.mark.parametrize("dims,world", [(ParallelDims(cp=2), 2), (ParallelDims(pp=2, tp=2), 4)])
def test_a_layout_without_data_parallelism_follows_the_single_process_curve(demo, single, tmp_path, dims, world):
    path = recipe_file(tmp_path / "r.yaml", demo, tmp_path / "out", 4, tp=dims.tp, pp=dims.pp, cp=dims.cp)
    results = run_ranks(world, _train, path, dims)
    evaluation, losses = results[0]
    assert losses == pytest.approx(single, rel=2e-4)  # fp32: the same data, a different summation order
    assert evaluation is not None and evaluation["samples"] == 6  # rank 0 evaluates the gathered model


def test_a_checkpoint_from_one_layout_resumes_under_another(demo, single, tmp_path):
    first = recipe_file(tmp_path / "a.yaml", demo, tmp_path / "out", 2, tp=2)
    run_ranks(2, _train, first, ParallelDims(tp=2))
    assert (tmp_path / "out" / "checkpoints" / "step-000002" / "state.json").is_file()
    then = recipe_file(tmp_path / "b.yaml", demo, tmp_path / "out", 4, cp=2)
    _, losses = run_ranks(2, _train, then, ParallelDims(cp=2))[0]
    assert losses == pytest.approx(single, rel=2e-4)  # history of steps 1-2 restored, 3-4 continued


def test_data_parallel_training_runs_and_learns(demo, single, tmp_path):
    path = recipe_file(tmp_path / "r.yaml", demo, tmp_path / "out", 4, dp=2)
    _, losses = run_ranks(2, _train, path, ParallelDims(dp=2))[0]
    assert len(losses) == 4 and losses[-1] < losses[0]  # each rank reads its own half of the records


def _train_summary(rank, world, recipe_path, dims):
    trainer = Trainer(load_recipe(recipe_path), topo=Topology.from_process_group(dims, "cpu"))
    own = {}
    gather = trainer._gather_skips

    def counted():
        own["total"] = trainer.dataset.skips.total  # this rank's own, before the job's are gathered
        gather()

    trainer._gather_skips = counted
    summary = trainer.fit()
    return own["total"], summary["skips"]["total"]


def test_the_summary_counts_the_skips_of_every_data_parallel_rank(demo, tmp_path):
    from keyetron.data.loader import LoaderConfig, epoch_order

    lines = (demo / "train.jsonl").read_text().splitlines()
    bad = ['{"id": "bad-json-1", ', '{"id": "bad-json-2", ', '{"id": "bad-json-3", ', '{"id": "bad-json-4", ']
    manifest = tmp_path / "with-bad.jsonl"
    manifest.write_text("\n".join(lines + bad) + "\n")
    order = epoch_order(list(range(len(lines) + len(bad))), LoaderConfig(seed=0), 0)
    readers = {order.index(len(lines) + k) % 2 for k in range(len(bad))}
    assert readers == {0, 1}, "the bad records must fall to both data-parallel readers"
    path = recipe_file(tmp_path / "r.yaml", demo, tmp_path / "out", 4)
    recipe = json.loads((tmp_path / "r.yaml").read_text())
    recipe["data"]["sources"] = [str(manifest)]
    recipe["eval"] = {"max_new_tokens": 1, "max_samples": 1}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    (own0, job), (own1, _) = run_ranks(2, _train_summary, path, ParallelDims(dp=2))
    assert own0 > 0 and own1 > 0 and job == own0 + own1  # rank 0's summary has both ranks' skips
