"""The single-process trainer: exact accumulation, exact resume, freezing, skips, eval, recipes."""
import json

import pytest
import torch

from keyetron.cli import main
from keyetron.config import ConfigError
from keyetron.batch import PackedBatch
from keyetron.data.demo import make_demo
from keyetron.model import build_model
from keyetron.model.generate import greedy_generate
from keyetron.train.recipe import load_recipe
from keyetron.objectives import LanguageModelObjective
from keyetron.optim import OptimSection
from keyetron.parallel.engine import ParallelEngine
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.topology import Topology
from keyetron.train.trainer import Trainer
from synthetic import make_document


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=1, train_size=40, eval_size=12)
    return out


def write_recipe(path, demo, out, **sections):
    recipe = {
        "name": "t", "output_dir": str(out),
        "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")], "eval": str(demo / "eval.jsonl"),
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 512, "buffer_docs": 16, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "cosine", "warmup_steps": 1},
        "train": {"steps": 4, "grad_accum": 1}, "log": {"every": 1, "tensorboard": False},
        "eval": {"max_samples": 4, "max_new_tokens": 3},
    }
    for key, value in sections.items():
        recipe[key].update(value) if isinstance(value, dict) else recipe.__setitem__(key, value)
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_accumulated_gradients_equal_one_big_batch(tiny_cfg):
    gen = torch.Generator().manual_seed(0)
    docs = [make_document(tiny_cfg, gen, text=t, images=im, dtype=torch.float64, sample_id=f"d{i}")
            for i, (t, im) in enumerate([(5, [(4, 4)]), (9, []), (3, [(2, 4)]), (12, [])])]
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    rows = [PackedBatch.from_documents(docs[:1]), PackedBatch.from_documents(docs[1:])]
    objective = LanguageModelObjective()
    engine = ParallelEngine(parallelize_keye(model, Topology.single()), objective, OptimSection())
    _, sums = engine.forward_backward(rows)  # the trainer's step, before the optimizer update
    total = float(sums[0])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    batch = PackedBatch.from_documents(docs)
    out = objective(model(batch), batch)
    (out.loss_sum / out.count).backward()
    assert total == pytest.approx(float(out.loss_sum.detach()), rel=1e-12)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_resume_continues_exactly_as_an_uninterrupted_run(demo, tmp_path):
    straight = Trainer(load_recipe(write_recipe(tmp_path / "a.yaml", demo, tmp_path / "a", train={"steps": 4})))
    for _ in range(4):
        straight.train_step()
    first = Trainer(load_recipe(write_recipe(tmp_path / "b.yaml", demo, tmp_path / "b", train={"steps": 4})))
    first.train_step()
    first.train_step()
    first.save()
    resumed = Trainer(load_recipe(write_recipe(tmp_path / "b.yaml", demo, tmp_path / "b", train={"steps": 4})))
    assert resumed.step == 2
    resumed.train_step()
    resumed.train_step()
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert resumed.loader.state_dict()["cursor"] == straight.loader.state_dict()["cursor"]


def test_frozen_modules_do_not_change_and_flops_say_so(demo, tmp_path):
    t = Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o",
                                         train={"steps": 2, "freeze": ["vit", "llm.embed_tokens"]})))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_step()
    t.train_step()
    for n, p in t.model.named_parameters():
        frozen = n.startswith("vit.") or n.startswith("llm.embed_tokens.")
        assert torch.equal(before[n], p) == frozen, n
    assert t.trainable == {"vit": False, "projector": True, "llm": True}
    assert t.flops.multipliers == {"vit": 2, "projector": 6, "llm": 6}
    with pytest.raises(ValueError, match="'vision' matches no parameter"):
        Trainer(load_recipe(write_recipe(tmp_path / "r2.yaml", demo, tmp_path / "o2", train={"freeze": ["vision"]})))


def test_bad_samples_are_skipped_and_listed_while_training_goes_on(demo, tmp_path):
    lines = (demo / "train.jsonl").read_text().splitlines()[:20]
    first_image = next(json.loads(ln) for ln in lines if '"image"' in ln)
    broken = json.loads(json.dumps(first_image).replace('"image": "', '"image": "missing-'))
    broken["id"] = "broken-image"
    bad = [json.dumps(broken), '{"id": "no-content", "messages": []}', "not json at all"]
    manifest = demo / "with-bad-lines.jsonl"
    manifest.write_text("\n".join(bad + lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", train={"steps": 6},
                          data={"sources": [str(manifest)],
                                "loader": {"row_tokens": 256, "buffer_docs": 4, "shuffle": False}})
    summary = Trainer(load_recipe(recipe)).fit()
    assert summary["steps"] == 6
    assert summary["skips"]["by_kind"] == {"bad_media": 1, "bad_sample": 1, "bad_record": 1}
    assert {s["sample_id"] for s in summary["skips"]["examples"]} >= {"broken-image", "no-content"}
    log = (tmp_path / "o" / "train.log").read_text()
    assert "skipped samples: 3" in log and "broken-image" in log


def test_balanced_steps_report_unusable_samples_with_their_id_location_and_reason(demo, tmp_path):
    """A sample the cost index finds unusable is skipped as the streaming loader reports it: its
    id, file:line and reason (not '<record 0>'), in the log and in the summary."""
    lines = (demo / "train.jsonl").read_text().splitlines()[:20]
    first_image = next(json.loads(ln) for ln in lines if '"image"' in ln)
    broken = json.loads(json.dumps(first_image).replace('"image": "', '"image": "missing-'))
    broken["id"] = "broken-image"
    manifest = demo / "balanced-with-a-bad-image.jsonl"
    manifest.write_text("\n".join([json.dumps(broken)] + lines) + "\n")
    summaries = {}
    for balance in (False, True):
        recipe = write_recipe(tmp_path / f"r{balance}.yaml", demo, tmp_path / f"o{balance}", train={"steps": 3},
                              eval={"max_samples": 1},
                              data={"sources": [str(manifest)],
                                    "loader": {"row_tokens": 512, "buffer_docs": 4, "shuffle": False,
                                               "balance": balance}})
        summaries[balance] = Trainer(load_recipe(recipe)).fit()["skips"]
    streaming, balanced = summaries[False], summaries[True]
    assert balanced["by_kind"] == streaming["by_kind"] == {"bad_media": 1}
    entry = balanced["examples"][0]
    assert entry == streaming["examples"][0]
    assert entry["sample_id"] == "broken-image" and entry["location"].endswith("balanced-with-a-bad-image.jsonl:1")
    assert "missing-" in entry["reason"] and "not found" in entry["reason"]
    assert "broken-image" in (tmp_path / "oTrue" / "train.log").read_text()


def test_the_logged_learning_rate_is_the_one_each_step_used(demo, tmp_path):
    from keyetron.train.schedule import lr_lambda

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", train={"steps": 4},
                                      eval={"max_samples": 1}))
    Trainer(recipe).fit()
    logged = {m["step"]: m["train/lr"] for m in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text()
                                                    .splitlines()) if "train/lr" in m}
    multiplier = lr_lambda(recipe.schedule, recipe.train.steps)
    assert logged == {k: pytest.approx(recipe.optim.lr * multiplier(k - 1)) for k in range(1, 5)}


def test_a_missing_model_init_is_one_line_naming_the_key_before_anything_is_built(demo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o")
    assert main(["train", str(recipe), "--set", f"model.init={tmp_path / 'nowhere'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"keyetron: model.init {tmp_path / 'nowhere'} does not exist; give a Hugging Face folder, a "
                   "keyetron step-N checkpoint or a `keyetron merge` output")


def test_resuming_under_another_model_config_is_one_line_naming_both(demo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", train={"steps": 2}, eval={"max_samples": 1})
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["train", str(recipe), "--set", "model.config=small", "--set", "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.resume" in err[0] and "step-000002" in err[0], err
    assert "another architecture than model.config small" in err[0] and "vision.hidden_size" in err[0], err
    assert "(tiny, its model.yaml)" in err[0], err


def test_resume_auto_passes_over_a_truncated_newest_checkpoint_and_says_why(demo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", train={"steps": 3}, eval={"max_samples": 1})
    Trainer(load_recipe(recipe, ["checkpoint.every=1", "checkpoint.keep=3"])).fit()
    newest = tmp_path / "o" / "checkpoints" / "step-000003" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    resumed = Trainer(load_recipe(recipe))
    assert resumed.step == 2
    assert "step-000003 cannot be resumed (model.safetensors has" in (tmp_path / "o" / "train.log").read_text()
    capsys.readouterr()  # the runs' own log lines
    assert main(["train", str(recipe), "--set", f"checkpoint.resume={newest.parent}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {newest.parent} cannot be resumed: model.safetensors has" in err[0], err


def test_greedy_generation_matches_full_forward_argmax(tiny_cfg):
    gen = torch.Generator().manual_seed(3)
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0).eval()
    prompts = [make_document(tiny_cfg, gen, text=4, images=[(4, 4)], dtype=torch.float64, sample_id="a"),
               make_document(tiny_cfg, gen, text=7, dtype=torch.float64, sample_id="b")]
    out = greedy_generate(model, prompts, max_new_tokens=4, stop_ids=[-1])
    for doc, ids in zip(prompts, out):
        seq, pos = doc.input_ids.clone(), doc.position_ids.clone()
        for want in ids:  # the reference: one full forward per token
            d = type(doc)(seq, torch.full_like(seq, -100), pos, doc.pixel_values, doc.vision_grid_thw, "x")
            with torch.no_grad():
                nxt = int(model.logits(PackedBatch.from_documents([d]))[-1].argmax())
            assert nxt == want
            seq = torch.cat([seq, torch.tensor([nxt])])
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1).expand(3, 1)], dim=1)


def test_recipe_errors_name_the_file_and_key(demo, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"r\.yaml\.train: unknown key\(s\) \['stepz'\]"):
        load_recipe(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"r\.yaml\.optim\.lr: expected a number"):
        load_recipe(path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="warmup_steps 10 must be below total_steps 4"):
        load_recipe(path, ["schedule.warmup_steps=10"])
    with pytest.raises(ConfigError, match="video_profile|unknown"):
        load_recipe(path, ["data.media.video_profile=fancy"])
    assert load_recipe(path, ["train.freeze=[vit]"]).train.freeze == ["vit"]


def test_cli_train_runs_a_recipe_end_to_end(demo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", log={"every": 2, "tensorboard": True})
    assert main(["train", str(recipe), "--set", "train.steps=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["eval"]["samples"] == 4
    out = tmp_path / "o"
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_points = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_points] == [2, 3]
    assert all(m["perf/tflops"] > 0 and m["perf/tokens_per_s"] > 0 for m in train_points)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert (out / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_a_bf16_checkpoint_resumes_exactly_in_fp32_and_an_fp32_one_in_bf16(demo, tmp_path):
    """bf16 runs write their fp32 masters: resumed in fp32, the weights are the masters bit for bit;
    an fp32 run's weights resumed in bf16 become the masters without rounding."""
    recipe = write_recipe(tmp_path / "r.yaml", demo, tmp_path / "o", train={"steps": 2}, eval={"max_samples": 1})
    bf16 = Trainer(load_recipe(recipe, ["train.precision=bf16"]))
    bf16.fit()
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    masters = {n: bf16.engine.optimizer.masters.of[p].clone() for n, p in bf16.model.named_parameters()
               if p in bf16.engine.optimizer.masters.of}
    assert masters and all(m.dtype == torch.float32 for m in masters.values())
    fp32 = Trainer(load_recipe(recipe, ["train.precision=fp32", "train.steps=3"]))
    assert fp32.step == 2
    for name, p in fp32.model.named_parameters():
        if name in masters:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[name]), name
    fp32.fit()  # one more step in fp32, then back to bf16
    weights = {n: p.detach().clone() for n, p in fp32.model.named_parameters()}
    again = Trainer(load_recipe(recipe, ["train.precision=bf16", "train.steps=4"]))
    assert again.step == 3
    of = again.engine.optimizer.masters.of
    for name, p in again.model.named_parameters():
        if p in of:
            assert torch.equal(of[p], weights[name]), name
            assert torch.equal(p.detach(), weights[name].to(torch.bfloat16)), name
