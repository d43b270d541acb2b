"""The keyetron command."""
import json
import subprocess
import sys

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
    summary = json.loads(capsys.readouterr().out)
    assert summary["sizes"] == {"train": 12, "eval": 4} and summary["seed"] == 2
    assert len((out / "train.jsonl").read_text().splitlines()) == 12
    assert json.loads((out / "demo.json").read_text())["baselines"] == summary["baselines"]
