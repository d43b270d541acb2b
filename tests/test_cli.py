"""The keyetron command."""
import json
import os
import subprocess
import sys
from pathlib import Path

from keyetron.cli import main


def test_model_info_keye_8b_counts(capsys):
    assert main(["model-info", "--config", "keye-8b", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"total", "vit", "projector", "llm"}
    assert abs(counts["total"] / 8.64e9 - 1) < 0.005
    assert abs(counts["vit"] / 413e6 - 1) < 0.005
    assert abs(counts["projector"] / 40e6 - 1) < 0.01
    assert abs(counts["llm"] / 8.19e9 - 1) < 0.005
    assert counts["total"] == counts["vit"] + counts["projector"] + counts["llm"]


def test_console_script_is_installed_and_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "keyetron.cli", "model-info", "--config", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model config 'nope'" in out.stderr


def test_data_slowfast_prints_the_plan_as_json(tmp_path, capsys):
    import numpy as np

    from keyetron.data.video import write_video

    frames = np.zeros((30, 112, 140, 3), dtype=np.uint8)
    frames[:15, :, :, 0] = 200  # a red scene, then a cut to a dark one (the public metric
    # finds red and blue "similar": their HSV vectors differ only in hue)
    for i in range(30):
        frames[i, 40:60, 4 * i:4 * i + 20] = 255  # a moving white square
    path = write_video(tmp_path / "cut.mp4", frames, 10)
    assert main(["data", "slowfast", str(path), "--profile", "keye-vl-utils", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == {"n_frames", "frame_types", "timestamps", "slow_hw", "fast_hw", "visual_tokens", "source_hw"}
    assert plan["n_frames"] == len(plan["frame_types"]) == len(plan["timestamps"]) == 6  # 3 s at 2 fps
    assert plan["source_hw"] == [112, 140] and plan["frame_types"][0] == 0
    assert 1 in plan["frame_types"]  # within a scene, frames are fast
    first_after_cut = next(i for i, t in enumerate(plan["timestamps"]) if t >= 1.5)
    assert plan["frame_types"][first_after_cut] == 0  # the first frame after the cut is slow
    slow, fast = (h * w // 784 for h, w in (plan["slow_hw"], plan["fast_hw"]))
    n_fast = sum(plan["frame_types"])
    assert plan["visual_tokens"] == (6 - n_fast) * slow + n_fast * fast


def test_data_slowfast_on_a_broken_file_names_it(tmp_path, capsys):
    (tmp_path / "fake.mp4").write_text("not a video")
    assert main(["data", "slowfast", str(tmp_path / "fake.mp4")]) == 1
    assert "fake.mp4" in capsys.readouterr().err


def test_data_make_demo_writes_the_dataset_and_prints_its_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "make-demo", str(out), "--train-size", "12", "--eval-size", "4", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 2 and "train 12 samples" in printed and "eval 4 samples" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["sizes"] == {"train": 12, "eval": 4} and summary["seed"] == 2
    assert f"{summary['baselines']['overall']['accuracy']:.1%}" in printed and str(out / "demo.json") in printed
    assert len((out / "train.jsonl").read_text().splitlines()) == 12


def tiny_recipe(folder, **sections):
    """A recipe of the tiny model whose data file exists (relative to ``folder``, the working directory)."""
    (folder / "train.jsonl").write_text("")
    path = folder / "r.yaml"
    path.write_text(json.dumps({"name": "t", "output_dir": str(folder / "out"), "model": {"config": "tiny"},
                                "data": {"sources": ["train.jsonl"]}, **sections}))
    return path


def refuses(argv, capsys, entry=main, status=2) -> str:
    """Run ``entry(argv)``: it must exit with ``status`` printing one line on stderr and nothing else; returns it."""
    assert entry(argv) == status
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out
    return out.err.rstrip("\n")


def test_train_with_a_layout_of_several_processes_in_one_says_the_torchrun_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = tiny_recipe(tmp_path)
    assert refuses(["train", "r.yaml", "--tp", "2", "--set", "train.steps=3"], capsys) == (
        "keyetron: config error: the layout parallel.tp=2 needs 2 processes and this is one (WORLD_SIZE unset or 1); "
        "run: torchrun --nproc-per-node 2 -m keyetron.train --recipe r.yaml --tp 2 --set train.steps=3 (on SLURM: "
        "keyetron launch --recipe r.yaml --tp 2 --set train.steps=3 --gpus-per-node 2)")
    from keyetron.train.__main__ import main as train_main

    assert refuses(["--recipe", "r.yaml", "--cp", "2", "--dp", "2", "--set", "name=a b"], capsys, train_main) == (
        "keyetron: config error: the layout parallel.cp=2, parallel.dp=2 needs 4 processes and this is one "
        "(WORLD_SIZE unset or 1); run: torchrun --nproc-per-node 4 -m keyetron.train --recipe r.yaml --cp 2 --dp 2 "
        "--set 'name=a b' (on SLURM: keyetron launch --recipe r.yaml --cp 2 --set parallel.dp=2 --set 'name=a b' "
        "--gpus-per-node 4)")
    # the recipe's own parallel section counts too
    tiny_recipe(tmp_path, parallel={"tp": 2, "pp": 2}, train={"grad_accum": 2})
    assert refuses(["train", str(recipe)], capsys) == (
        "keyetron: config error: the layout parallel.tp=2, parallel.pp=2 needs 4 processes and this is one "
        f"(WORLD_SIZE unset or 1); run: torchrun --nproc-per-node 4 -m keyetron.train --recipe {recipe} (on SLURM: "
        f"keyetron launch --recipe {recipe} --gpus-per-node 4)")
    assert not (tmp_path / "out").exists()


def test_train_names_a_layout_the_model_cannot_take_before_the_process_count(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tiny_recipe(tmp_path)
    assert refuses(["train", "r.yaml", "--tp", "3"], capsys) == (
        "keyetron: config error: parallel.tp=3 does not divide the attention heads: model config 'tiny' has "
        "num_heads 4, num_kv_heads 2, vocab_size 151936; choose parallel.tp from 1, 2 or 4")


def test_train_names_a_missing_data_file_before_building_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tiny_recipe(tmp_path)
    assert refuses(["train", "r.yaml", "--set", "data.sources=[train.jsonl, trian.jsonl]"], capsys, status=1) == (
        f"keyetron: data.sources[1] trian.jsonl does not exist (in {tmp_path}: relative paths are read from where the "
        "job starts); fix the path in the recipe or with --set data.sources=[...]")
    assert not (tmp_path / "out").exists()


def test_fp8_where_it_cannot_run_is_one_line_naming_the_key_and_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tiny_recipe(tmp_path)
    line = refuses(["train", "r.yaml", "--set", "train.fp8=true"], capsys, status=2)
    assert line.startswith("keyetron: config error: train.fp8: FP8 matmuls need an NVIDIA GPU of compute capability "
                           ">= 8.9") and line.endswith("or set train.fp8: false"), line
    assert not (tmp_path / "out").exists()


def test_under_torchrun_only_local_rank_0_prints_the_config_error(tmp_path, capsys, monkeypatch):
    """Every rank finds the error before a process group exists; one line per node, every rank exits 2."""
    import torch.distributed as dist

    from keyetron.train.recipe import load_recipe
    from keyetron.train.run import run

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was created before the layout was checked")

    monkeypatch.setattr(dist, "init_process_group", no_group)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(tiny_recipe(tmp_path), ["parallel.tp=3"])
    line = ("keyetron: config error: parallel.tp=3 does not divide the attention heads: model config 'tiny' has "
            "num_heads 4, num_kv_heads 2, vocab_size 151936; choose parallel.tp from 1, 2 or 4\n")
    for rank, printed in ((1, ""), (0, line), (5, ""), (4, line)):  # two nodes of four: local rank 0 speaks
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank % 4))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"elastic/{rank}/error.json"))
        assert run(recipe) == 2
        assert capsys.readouterr() == ("", printed)
        # every rank leaves the line where torchrun's failure summary reads it (instead of "To enable traceback")
        error = json.loads((tmp_path / f"elastic/{rank}/error.json").read_text())["message"]
        assert error["message"] == error["extraInfo"]["py_callstack"] == line.rstrip("\n")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the world is checked too: tp 2 x cp 2 does not divide 6
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert run(load_recipe(tmp_path / "r.yaml", ["parallel.tp=2", "parallel.cp=2"])) == 2
    assert capsys.readouterr().err == (
        "keyetron: config error: parallel.pp x cp x tp = 1 x 2 x 2 = 4 does not divide the 6 processes; start a "
        "multiple of 4 processes or choose a layout whose product divides 6\n")


def test_torchrun_shows_the_config_error_as_its_workers_failure_with_no_worker_traceback(tmp_path):
    tiny_recipe(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "keyetron.train", "--recipe", "r.yaml",
                           "--tp", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"KEYETRON_DEVICE": "cpu"})
    line = ("keyetron: config error: parallel.tp=3 does not divide the attention heads: model config 'tiny' has "
            "num_heads 4, num_kv_heads 2, vocab_size 151936; choose parallel.tp from 1, 2 or 4")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    # local rank 0's line (unless torchrun stopped it first, when the other rank ended sooner) and torchrun's summary
    assert out.splitlines().count(line) <= 1 and f"  traceback : {line}" in out, out
    assert "ValueError" not in out and out.count("Traceback (most recent call last)") <= 1, out  # torchrun's own


def test_data_index_counts_and_names_the_unusable_samples(tmp_path, capsys):
    from keyetron.data.demo import make_demo

    make_demo(tmp_path / "demo", seed=1, train_size=8, eval_size=1)
    lines = (tmp_path / "demo" / "train.jsonl").read_text().splitlines()
    broken = json.loads(next(ln for ln in lines if '"image"' in ln).replace('"image": "', '"image": "missing-'))
    broken["id"] = "broken-image"
    (tmp_path / "demo" / "mixed.jsonl").write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "t", "output_dir": str(tmp_path / "out"), "model": {"config": "tiny"},
                                  "data": {"sources": [str(tmp_path / "demo" / "mixed.jsonl")]}}))
    assert main(["data", "index", str(recipe)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["records"] == 9 and summary["unusable"] == 1 and summary["llm_tokens"] > 0
    assert "broken-image (" in captured.err and "mixed.jsonl:9, bad_media" in captured.err
