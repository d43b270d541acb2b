"""The pre-training stages' tiny twins through the real training path: stage 1 trains only the
projector; stage 2 runs data parallel with ZeRO-2; stage 3 continues the stage-2 checkpoint
under a new row length, RoPE base and parallel layout (context extension) with the 24/50/26
token mixture logged per step, and follows a one-process run of the same continuation."""
import json
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from keyetron.data.demo import make_demo
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.checkpoint import step_dir
from keyetron.train.recipe import load_recipe
from keyetron.train.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=0, train_size=40, eval_size=2)
    return out / "train.jsonl"


def overrides(demo, out, *more):
    """The twin on the test's demo data, from random weights (the twins chain through model.init)."""
    return [f"data.sources=[{demo}]", f"output_dir={out}", "model.init=null", *more]


def _train(rank, world, name, sets, dims):
    recipe = load_recipe(RECIPES / f"{name}.yaml", sets)
    Trainer(recipe, topo=Topology.from_process_group(dims, "cpu")).fit()


def losses(out) -> list[dict]:
    with open(Path(out) / "metrics.jsonl") as f:
        return [m for m in map(json.loads, f) if "train/loss" in m]


def test_stage1_trains_the_projector_only(demo, tmp_path):
    trainer = Trainer(load_recipe(RECIPES / "stage1_align.yaml", overrides(demo, tmp_path / "s1")))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("projector."), name


def test_context_extension_continues_stage2_under_a_new_row_length_rope_base_and_layout(demo, tmp_path):
    run_ranks(2, _train, "stage2_pretrain", overrides(demo, tmp_path / "s2"), ParallelDims(dp=2))
    start = step_dir(tmp_path / "s2" / "checkpoints", 3)
    stage3 = overrides(demo, tmp_path / "s3", f"checkpoint.start_from={start}")
    run_ranks(4, _train, "stage3_anneal_128k", stage3, ParallelDims(pp=2, dp=1, cp=2))

    reference = Trainer(load_recipe(RECIPES / "stage3_anneal_128k.yaml",
                                    overrides(demo, tmp_path / "ref", f"checkpoint.start_from={start}")))
    assert reference.cfg.text.rope_theta == 8e6 and reference.step == 0  # new base, the schedule restarts
    assert reference.optimizer.state, "the stage-2 AdamW moments are carried over"
    reference.fit()
    got, want = losses(tmp_path / "s3"), losses(tmp_path / "ref")
    assert [m["step"] for m in got] == [1, 2]
    for g, w in zip(got, want):  # PP2 x CP2 from the DP2 ZeRO-2 checkpoint == one process
        assert g["train/loss"] == pytest.approx(w["train/loss"], rel=2e-4)
        shares = [g[f"data/mix_{k}"] for k in ("video", "image", "text")]
        assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
    with open(tmp_path / "s3" / "recipe.yaml") as f:
        assert "row_tokens: 2048" in f.read()
