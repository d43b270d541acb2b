"""Model merging: every tensor is the weighted average, across every checkpoint format, and
the output loads back (our layout and the Hugging Face one); mismatches name files and key."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_ranks
from keyetron.cli import main
from keyetron.config import ConfigError
from keyetron.model import build_model, load_model_config
from keyetron.batch import PackedBatch
from keyetron.model.hf_checkpoint import load_hf_model, save_hf_checkpoint
from keyetron.parallel.sharded_checkpoint import save_distributed
from keyetron.parallel.topology import Topology
from keyetron.checkpoint import mark_distributed_checkpoint, save_checkpoint
from keyetron.train.merge import MergeError, load_merge_recipe, merge, recipe_from_cli

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = "model:\n  config: tiny\n"  # what a run's recipe.yaml says about the model


def save_as(fmt: str, model, root: Path) -> Path:
    """Write ``model`` as a keyetron single-process step folder, a distributed one, or the HF layout."""
    if fmt == "keyetron":
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return save_checkpoint(root / "checkpoints", 2, model, opt, sched, {}, recipe_text=TINY_RECIPE)
    if fmt == "distributed":
        path = save_distributed(root / "checkpoints" / "step-000002", model, None, Topology.single(), {"step": 2})
        mark_distributed_checkpoint(path, 2, keep=2, recipe_text=TINY_RECIPE)
        return path
    return save_hf_checkpoint(model, root / "hf", max_shard_bytes=4_000_000)  # sharded, with an index


@pytest.fixture(scope="module")
def models():
    return [build_model(load_model_config("tiny"), seed=s) for s in (1, 2, 3)]


def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("fmt_a,fmt_b", [("keyetron", "huggingface"), ("distributed", "keyetron"),
                                         ("huggingface", "distributed")])
def test_merge_of_two_formats_is_the_weighted_average_of_every_tensor(models, tmp_path, fmt_a, fmt_b):
    a, b = save_as(fmt_a, models[0], tmp_path / "a"), save_as(fmt_b, models[1], tmp_path / "b")
    summary = merge(recipe_from_cli([str(a), str(b)], "0.25,0.75", str(tmp_path / "out")))
    assert [i["format"] for i in summary["inputs"]] == [fmt_a if fmt_a != "distributed" else "keyetron-distributed",
                                                       fmt_b if fmt_b != "distributed" else "keyetron-distributed"]
    got = merged_tensors(tmp_path / "out")
    sa, sb = models[0].state_dict(), models[1].state_dict()
    assert set(got) == set(sa) and summary["tensors"] == len(sa)
    for name, t in got.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.25 * sa[name] + 0.75 * sb[name], rtol=1e-6, atol=1e-8, msg=name)


def test_three_inputs_weights_are_normalised_and_streaming_groups_do_not_change_the_result(models, tmp_path):
    paths = [str(save_as(f, m, tmp_path / f)) for f, m in zip(("keyetron", "distributed", "huggingface"), models)]
    summary = merge(recipe_from_cli(paths, "1,1,2", str(tmp_path / "out")))
    assert [i["normalised_weight"] for i in summary["inputs"]] == [0.25, 0.25, 0.5]
    merge(recipe_from_cli(paths, "1,1,2", str(tmp_path / "out-grouped")), group_bytes=1)  # one tensor at a time
    got, grouped = merged_tensors(tmp_path / "out"), merged_tensors(tmp_path / "out-grouped")
    states = [m.state_dict() for m in models]
    for name, t in got.items():
        assert torch.equal(t, grouped[name]), name
        expected = 0.25 * states[0][name] + 0.25 * states[1][name] + 0.5 * states[2][name]
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-8, msg=name)
    assert json.loads((tmp_path / "out" / "merge.json").read_text()) == summary


@pytest.mark.parametrize("fmt", ["keyetron", "distributed", "huggingface"])
def test_one_checkpoint_with_weight_one_comes_back_bitwise_and_loads_into_the_model(models, tiny_cfg, tmp_path, fmt):
    path = save_as(fmt, models[0], tmp_path / "in")
    merge(recipe_from_cli([str(path)], "1", str(tmp_path / "out")))
    got = merged_tensors(tmp_path / "out")
    for name, t in models[0].state_dict().items():
        assert torch.equal(got[name], t), name
    fresh = build_model(tiny_cfg, seed=9)
    fresh.load_state_dict(got, strict=True)  # the single-process checkpoint's model.safetensors, weights only
    assert load_model_config(tmp_path / "out" / "model.yaml") == tiny_cfg  # the architecture travels with it


def _save_under_tp2(rank, world, path):
    from keyetron.parallel.parallelize import parallelize_keye
    from keyetron.parallel.topology import ParallelDims

    topo = Topology.from_process_group(ParallelDims(tp=2), "cpu")
    model = build_model(load_model_config("tiny"), dtype=torch.float64, seed=5)
    parallelize_keye(model, topo)
    save_distributed(path, model, None, topo, {})
    return True


def test_a_tensor_parallel_checkpoint_is_read_as_its_full_tensors(tiny_cfg, tmp_path):
    run_ranks(2, _save_under_tp2, str(tmp_path / "tp2"))
    merge(recipe_from_cli([str(tmp_path / "tp2")], "1", str(tmp_path / "out")))
    got = merged_tensors(tmp_path / "out")
    for name, t in build_model(tiny_cfg, dtype=torch.float64, seed=5).state_dict().items():
        assert got[name].dtype == torch.float64 and torch.equal(got[name], t), name


def test_hf_output_loads_back_through_the_hf_loader_and_bf16_output_is_the_rounded_average(models, tmp_path):
    a, b = save_as("keyetron", models[0], tmp_path / "a"), save_as("huggingface", models[1], tmp_path / "b")
    merge(recipe_from_cli([str(a), str(b)], "0.25,0.75", str(tmp_path / "out"), hf_output=str(tmp_path / "hf")))
    loaded = load_hf_model(tmp_path / "hf")  # architecture from the written config.json
    got = merged_tensors(tmp_path / "out")
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, got[name]), name
    merge(recipe_from_cli([str(a), str(b)], "0.25,0.75", str(tmp_path / "bf16"), dtype="bfloat16"))
    for name, t in merged_tensors(tmp_path / "bf16").items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, got[name].to(torch.bfloat16)), name


def test_different_architectures_name_both_files_and_the_first_differing_key(models, tiny_cfg, tmp_path):
    a = save_as("keyetron", models[0], tmp_path / "a")
    deeper = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, num_layers=3))
    wider = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, intermediate_size=96))
    b = save_as("huggingface", build_model(deeper), tmp_path / "b")
    with pytest.raises(MergeError, match="not the same architecture") as err:
        merge(recipe_from_cli([str(a), str(b)], None, str(tmp_path / "out")))
    message = str(err.value)
    assert str(a) in message and str(b) in message and "llm.layers.2." in message and "no such tensor" in message
    c = save_as("distributed", build_model(wider), tmp_path / "c")
    with pytest.raises(MergeError, match=r"llm.layers.0.mlp.down_proj.weight: .*shape \[32, 64\].*shape \[32, 96\]"):
        merge(recipe_from_cli([str(a), str(c)], None, str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing is written unless every check passes


def test_bad_weights_missing_paths_and_non_checkpoints_are_clear_errors(models, tmp_path):
    a = str(save_as("keyetron", models[0], tmp_path / "a"))
    with pytest.raises(ConfigError, match="weights must be positive"):
        recipe_from_cli([a, a], "1,0", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="2 value"):
        recipe_from_cli([a], "0.5,0.5", str(tmp_path / "out"))
    with pytest.raises(MergeError, match="nowhere/step-000001 does not exist"):
        merge(recipe_from_cli([a, str(tmp_path / "nowhere" / "step-000001")], None, str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="empty is not a checkpoint"):
        merge(recipe_from_cli([str(tmp_path / "empty")], None, str(tmp_path / "out")))
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge(recipe_from_cli([a], None, a))
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge(recipe_from_cli([a], None, str(tmp_path / "out"), hf_output=a))
    unnamed = save_as("keyetron", models[0], tmp_path / "unnamed")
    (unnamed / "recipe.yaml").unlink()
    with pytest.raises(MergeError, match="pass --config"):
        merge(recipe_from_cli([str(unnamed)], None, str(tmp_path / "out"), hf_output=str(tmp_path / "hf")))
    assert not (tmp_path / "out").exists()


def test_cli_merges_from_arguments_and_from_the_tiny_recipe(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths are taken from here
    save_as("keyetron", models[0], Path("runs/tiny-a"))
    save_as("huggingface", models[1], Path("runs/tiny-b"))
    Path("runs/tiny-b/hf").rename("runs/tiny-b-hf")
    assert main(["merge", "--recipe", str(ROOT / "recipes" / "tiny" / "merge.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [i["normalised_weight"] for i in summary["inputs"]] == [0.25, 0.75]
    assert main(["merge", "--out", "runs/cli", "--weights", "0.25,0.75", "--hf", "runs/cli-hf",
                 "runs/tiny-a/checkpoints/step-000002", "runs/tiny-b-hf"]) == 0
    from_recipe, from_args = merged_tensors(Path("runs/tiny-merged")), merged_tensors(Path("runs/cli"))
    assert from_recipe.keys() == from_args.keys() and all(torch.equal(from_recipe[k], from_args[k]) for k in from_args)
    assert load_hf_model("runs/tiny-merged-hf").cfg.name == "tiny"
    capsys.readouterr()
    assert main(["merge", "--out", "runs/x", "runs/missing"]) == 1
    assert "runs/missing does not exist" in capsys.readouterr().err
    assert main(["merge", "--recipe", "r.yaml", "--out", "runs/x"]) == 2


def test_the_example_recipe_is_a_valid_merge_recipe():
    recipe = load_merge_recipe(ROOT / "recipes" / "merge.yaml")
    assert len(recipe.inputs) == 2 and recipe.hf_output and recipe.dtype == "auto"


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory):
    """One step of a context-extended run (``model.rope_theta: 8e6``) through the trainer."""
    from keyetron.data.demo import make_demo
    from keyetron.train.recipe import load_recipe
    from keyetron.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("extended")
    make_demo(tmp / "demo", seed=0, train_size=12, eval_size=2)
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "stage1_align.yaml",
                         [f"data.sources=[{tmp / 'demo' / 'train.jsonl'}]", f"output_dir={tmp / 'run'}",
                          "model.rope_theta=8.0e+6", "model.init=null", "train.steps=2", "train.freeze=[]",
                          "eval.every=0",
                          "data.eval=null", "data.loader.balance=false"])
    trainer = Trainer(recipe)
    trainer.fit()
    return trainer, tmp / "run" / "checkpoints" / "step-000002"


def test_a_context_extended_checkpoint_exports_with_its_rope_base_and_logits(extended_run, tmp_path):
    """keyetron merge --hf of a checkpoint trained with a raised RoPE base writes that base, and the
    reloaded model gives the trained model's logits."""
    from synthetic import make_document

    trainer, checkpoint = extended_run
    assert load_model_config(checkpoint / "model.yaml").text.rope_theta == 8e6  # the checkpoint says what it is
    assert main(["merge", "--out", str(tmp_path / "out"), "--hf", str(tmp_path / "hf"), str(checkpoint)]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_theta"] == 8e6
    assert load_model_config(tmp_path / "out" / "model.yaml").text.rope_theta == 8e6
    exported = load_hf_model(tmp_path / "hf")
    batch = PackedBatch.from_documents([make_document(trainer.cfg, torch.Generator().manual_seed(0), text=30,
                                                      images=[(4, 4)], dtype=torch.float32)])
    with torch.no_grad():
        torch.testing.assert_close(exported.logits(batch), trainer.model.logits(batch), rtol=0, atol=1e-6)
    # A checkpoint written before model.yaml existed: the recipe's override still counts.
    (checkpoint / "model.yaml").unlink()
    assert main(["merge", "--out", str(tmp_path / "old"), str(checkpoint)]) == 0
    assert load_model_config(tmp_path / "old" / "model.yaml").text.rope_theta == 8e6


def test_merging_checkpoints_of_different_rope_bases_is_refused_naming_both_and_the_field(extended_run, models,
                                                                                         tmp_path, capsys):
    _, extended = extended_run
    plain = save_as("keyetron", models[0], tmp_path / "plain")  # tiny at its own RoPE base, 1e6
    assert main(["merge", "--out", str(tmp_path / "out"), str(plain), str(extended)]) == 1
    err = capsys.readouterr().err
    assert str(plain) in err and str(extended) in err and "text.rope_theta: 1000000.0 != 8000000.0" in err
