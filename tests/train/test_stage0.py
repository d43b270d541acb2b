"""Stage 0 (train.objective: siglip) through the real `keyetron train` path: the tiny twin trains,
resumes exactly, hands its ViT to a stage-1 recipe bit for bit, runs data parallel as one process
over the union batch, and refuses model-parallel layouts."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_ranks
from keyetron.cli import main
from keyetron.data.demo import make_demo
from keyetron.model import build_model, load_model_config
from keyetron.model.siglip_text import load_text_config, save_siglip_checkpoint
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.checkpoint import step_dir
from keyetron.objectives.contrastive import ContrastiveObjective, build_contrastive_objective
from keyetron.train.recipe import load_recipe
from keyetron.train.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TWIN = RECIPES / "tiny" / "stage0_vit.yaml"
CONTRASTIVE_FILE = f"{ContrastiveObjective.name}.safetensors"  # the objective's parameters, beside the model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=0, train_size=24, eval_size=2)
    return out


def overrides(demo, out, *more):
    return [f"data.sources=[{demo / 'train.jsonl'}]", f"data.eval={demo / 'eval.jsonl'}", f"output_dir={out}", *more]


def train_cli(demo, out, *more) -> int:
    args = ["train", str(TWIN)]
    for assignment in overrides(demo, out, *more):
        args += ["--set", assignment]
    return main(args)


def losses(out) -> dict[int, float]:
    with open(Path(out) / "metrics.jsonl") as f:
        return {m["step"]: m["train/loss"] for m in map(json.loads, f) if "train/loss" in m}


@pytest.fixture(scope="module")
def twin_run(demo, tmp_path_factory):
    """The tiny twin's 30 steps, checkpoints every 10, through `keyetron train`."""
    out = tmp_path_factory.mktemp("stage0")
    assert train_cli(demo, out) == 0
    return out


def test_the_tiny_twin_trains_through_keyetron_train(twin_run):
    got = losses(twin_run)
    assert sorted(got) == list(range(1, 31)) and all(math.isfinite(v) for v in got.values())
    first, last = [got[s] for s in range(1, 6)], [got[s] for s in range(26, 31)]
    assert sum(last) / 5 < sum(first) / 5 - 2, got  # 8.3 (SigLIP's bias -10 at start) -> below 3
    metrics = [json.loads(ln) for ln in (twin_run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss" in m]
    assert all(m["train/pairs"] == 8 and m["perf/pairs_per_s"] > 0 and m["perf/tflops"] > 0 for m in train)
    assert train[-1]["data/epoch"] >= 10  # 15 pairs among 24 records: an epoch every two steps or so
    evals = [m for m in metrics if "eval/i2t_top1" in m]
    assert len(evals) == 1 and evals[0]["eval/pairs"] == 2
    summary = json.loads((twin_run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["objective"] == "siglip" and summary["eval"]["pairs"] == 2
    for step in (10, 20, 30):
        folder = step_dir(twin_run / "checkpoints", step)
        assert (folder / "model.safetensors").is_file() and (folder / CONTRASTIVE_FILE).is_file()
    head = load_file(str(step_dir(twin_run / "checkpoints", 30) / CONTRASTIVE_FILE))
    assert {k.split(".")[0] for k in head} == {"pool_head", "text_tower", "logit_scale", "logit_bias"}


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_losses(demo, twin_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(step_dir(twin_run / "checkpoints", 10), step_dir(out / "checkpoints", 10))
    assert train_cli(demo, out) == 0  # checkpoint.resume: auto finds step 10
    straight, resumed = losses(twin_run), losses(out)
    assert sorted(resumed) == list(range(11, 31))
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # exactly
    for name in ("model.safetensors", CONTRASTIVE_FILE):
        a = load_file(str(step_dir(twin_run / "checkpoints", 30) / name))
        b = load_file(str(step_dir(out / "checkpoints", 30) / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_stage1_recipe_starts_from_the_stage0_checkpoint_with_its_vit_bit_for_bit(demo, twin_run, tmp_path):
    stage0 = step_dir(twin_run / "checkpoints", 30)
    saved = load_file(str(stage0 / "model.safetensors"))
    recipe = load_recipe(RECIPES / "tiny" / "stage1_align.yaml",
                         [f"data.sources=[{demo / 'train.jsonl'}]", f"output_dir={tmp_path / 's1'}",
                          f"model.init={stage0}"])
    stage1 = Trainer(recipe).model.state_dict()
    initial = build_model(load_model_config("tiny"), seed=0).state_dict()  # stage 0 started from this
    for name, value in stage1.items():
        assert torch.equal(value, saved[name]), name
        # Stage 0 trained the ViT and carried the projector and LLM as they were.
        assert torch.equal(value, initial[name]) != name.startswith("vit."), name


def twin_recipe(demo, out, batch_size, *more):
    return load_recipe(TWIN, overrides(demo, out, f"contrastive.batch_size={batch_size}", "optim.clip_grad=null",
                                       "train.steps=2", "eval.every=0", "parallel.sharding=none", *more))


def _dp_first_step_then_fit(rank, world, demo, out):
    trainer = Trainer(twin_recipe(demo, out, 4), topo=Topology.from_process_group(ParallelDims(dp=2), "cpu"))
    first = trainer.train_step()
    grads = {n: p.grad.clone() for n, p in trainer.engine.modules.named_parameters() if p.grad is not None}
    trainer.fit()  # the second step, a checkpoint by rank 0, the end of the run
    return first.loss, first.count, grads, losses(out)[2] if rank == 0 else None


def test_two_data_parallel_ranks_step_like_one_process_over_the_union_batch(demo, tmp_path):
    results = run_ranks(2, _dp_first_step_then_fit, demo, tmp_path / "dp")
    one = Trainer(twin_recipe(demo, tmp_path / "one", 8))
    first = one.train_step()
    want = {n: p.grad for n, p in one.engine.modules.named_parameters() if p.grad is not None}
    second = one.train_step()
    for loss, pairs, grads, _ in results:
        assert pairs == first.count == 8 and loss == pytest.approx(first.loss, rel=1e-5)
        assert grads.keys() == want.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert results[0][3] == pytest.approx(second.loss, rel=1e-4)
    # One process resumes the data-parallel checkpoint where it ended.
    checkpoint = step_dir(tmp_path / "dp" / "checkpoints", 2)
    resumed = Trainer(twin_recipe(demo, tmp_path / "again", 8, "train.steps=3",
                                             f"checkpoint.resume={checkpoint}"))
    assert resumed.step == 2 and resumed.loader.state_dict() == one.loader.state_dict()


def test_a_siglip_checkpoint_supplies_the_text_tower_head_logits_and_optionally_the_vit(demo, tmp_path):
    siglip = build_contrastive_objective(load_model_config("tiny").vision, load_text_config("tiny"), seed=7)
    with torch.no_grad():
        siglip.logit_scale.fill_(2.5)
        siglip.logit_bias.fill_(-4.0)
    save_siglip_checkpoint(siglip, tmp_path / "siglip")  # no tokenizer files: captions use Qwen3's
    want = siglip.state_dict()
    for load_vit in (False, True):
        trainer = Trainer(twin_recipe(demo, tmp_path / f"run{load_vit}", 8,
                                                 f"contrastive.siglip_checkpoint={tmp_path / 'siglip'}",
                                                 f"contrastive.load_vit={str(load_vit).lower()}"))
        assert trainer.checkpointed.vit is trainer.model.vit  # what stage 0 trains is what its checkpoints hold
        for name, value in trainer.engine.modules.state_dict().items():
            if value.dim() >= 2 or name.startswith("logit_"):  # (zero biases and unit norms match anyway)
                assert torch.equal(value, want[name]) == (load_vit or not name.startswith("vit.")), name


def test_model_parallel_layouts_and_accumulation_are_refused_naming_the_key(demo, tmp_path, capsys):
    assert train_cli(demo, tmp_path, "parallel.tp=2") == 2
    assert "parallel.tp=2: stage 0 (train.objective: siglip) is data parallel only" in capsys.readouterr().err
    assert train_cli(demo, tmp_path, "parallel.pp=2") == 2
    assert "parallel.pp" in capsys.readouterr().err
    assert train_cli(demo, tmp_path, "train.grad_accum=2") == 2
    assert "train.grad_accum=2" in capsys.readouterr().err
    assert train_cli(demo, tmp_path, "contrastive.lr_scale={head: 2}") == 2
    assert "unknown part(s) ['head']" in capsys.readouterr().err


def test_the_full_recipe_is_stage0_of_keye_8b_against_the_so400m_text_tower():
    full, twin = load_recipe(RECIPES / "stage0_vit.yaml"), load_recipe(TWIN)
    assert full.train.objective == twin.train.objective == "siglip"
    assert full.model.config == "keye-8b" and load_text_config(full.contrastive.text_tower).vocab_size == 32000
    assert full.optim.lr == 1e-5 and full.contrastive.lr_scale["pool_head"] > 1
