"""A training run checkpointed under 2 data-parallel ranks and resumed in one process hands
out every sample exactly once: the samples the steps logged (``log.sample_ids``) are
exactly those the final loader state says were read and not still in flight — streaming
and cost-balanced loading alike."""
import json
from collections import Counter

import pytest

from distributed import run_ranks
from keyetron.data.demo import make_demo
from keyetron.data.loader import LoaderConfig, epoch_order
from keyetron.data.packing import PIECE_SEPARATOR
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.checkpoint import step_dir
from keyetron.train.recipe import load_recipe
from keyetron.train.trainer import Trainer

N_RECORDS = 50


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=11, train_size=N_RECORDS, eval_size=2)
    return out


def write_recipe(path, demo, out, balance):
    loader = {"row_tokens": 512, "buffer_docs": 8, "seed": 2, "balance": balance}
    path.write_text(json.dumps({
        "name": "resize", "output_dir": str(out), "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")],
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0}, "loader": loader},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
        "train": {"steps": 3, "grad_accum": 2}, "checkpoint": {"every": 0, "resume": "auto"},
        "log": {"every": 1, "tensorboard": False, "sample_ids": True}, "eval": {"max_new_tokens": 1}}))
    return str(path)


def _train(rank, world, recipe_path):
    Trainer(load_recipe(recipe_path), topo=Topology.from_process_group(ParallelDims(dp=2), "cpu")).fit()


def logged_ids(out) -> Counter:
    ids = Counter()
    for path in sorted(out.glob("sample_ids.dp*.jsonl")):
        for line in path.read_text().splitlines():
            ids.update(json.loads(line)["ids"])
    return ids


def handed_out(state: dict, n: int, cfg: LoaderConfig, id_of: list[str]) -> Counter:
    """What a one-reader loader state says was handed out: taken positions minus those in flight."""
    order = lambda p: epoch_order(list(range(n)), cfg, p // n)[p % n]  # noqa: E731
    if state.get("kind") == "balanced":
        carry = [p for _, p in state["carry"]]
        return Counter(id_of[order(p)] for p in range(state["cursors"]["all"]) if p not in carry)
    assert state["stride"] == 1
    taken = Counter(id_of[order(p)] for p in range(state["cursor"]) if p not in state["queue"])
    in_flight = Counter(id_of[i] for i in state["buffer_records"])
    in_flight.update(id_of[i] for row in state["pending"] for _, i in row)
    return taken - in_flight


@pytest.mark.parametrize("balance", [False, True], ids=["streaming", "balanced"])
def test_a_run_resumed_with_fewer_data_parallel_ranks_hands_out_every_sample_once(demo, tmp_path, balance):
    recipe_path = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "out", balance)
    run_ranks(2, _train, recipe_path)  # steps 1-3 on 2 ranks, checkpoint at step 3
    recipe = load_recipe(recipe_path, ["train.steps=6"])
    trainer = Trainer(recipe)  # one process resumes the 2-rank checkpoint
    assert trainer.step == 3
    trainer.fit()
    final = json.loads((step_dir(recipe.checkpoint_dir, 6) / "state.json").read_text())["loader"]
    with open(demo / "train.jsonl") as f:
        id_of = [json.loads(line)["id"] for line in f]
    logged = logged_ids(tmp_path / "out")
    assert not any(PIECE_SEPARATOR in s for s in logged), "a split document makes this count inexact"
    assert sum(logged.values()) > N_RECORDS  # the run went past one epoch
    assert logged == handed_out(final, N_RECORDS, recipe.data.loader, id_of)
