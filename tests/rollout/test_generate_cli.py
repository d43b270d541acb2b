"""``keyetron generate`` end to end: a checkpoint and a JSONL of prompts in, responses with log-probs out."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from keyetron.cli import main
from keyetron.model import build_model, load_model_config
from keyetron.model.config import config_yaml


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = load_model_config("tiny")
    model = build_model(cfg, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.yaml").write_text(config_yaml(cfg))
    return folder


def _prompts(tmp_path):
    Image.fromarray(np.full((56, 84, 3), 200, dtype=np.uint8)).save(tmp_path / "grey.png")
    records = [
        {"id": "ask", "messages": [{"role": "user", "content": "What is 2 + 3?"}]},
        {"id": "with-answer", "messages": [{"role": "user", "content": [{"image": "grey.png"}, {"text": "Colour?"}]},
                                          {"role": "assistant", "content": "grey"}]},
        {"id": "missing-image", "messages": [{"role": "user", "content": [{"image": "nope.png"}, {"text": "?"}]}]},
        {"id": "bad", "messages": "not a list"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_generate_writes_sampled_responses_with_logprobs_and_counts_the_bad_prompts(checkpoint, tmp_path, capsys):
    prompts, out = _prompts(tmp_path), tmp_path / "responses.jsonl"
    args = ["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--out", str(out),
            "--samples", "3", "--temperature", "0.9", "--top-p", "0.95", "--max-new-tokens", "5", "--seed", "7"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 2 and summary["responses"] == 6 and summary["skipped"] == 2
    assert set(summary["skips"]) == {"bad_media", "bad_sample"}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in lines] == [(i, j) for i in ("ask", "with-answer") for j in range(3)]
    for r in lines:
        assert 1 <= len(r["token_ids"]) <= 5 and len(r["logprobs"]) == len(r["token_ids"])
        assert all(lp <= 0 for lp in r["logprobs"]) and r["prompt_tokens"] > 0
    # The same seed gives the same responses; the reference answer was not part of the prompt.
    again = tmp_path / "again.jsonl"
    assert main(args[:6] + [str(again)] + args[7:]) == 0
    assert again.read_text() == out.read_text()


def test_generate_names_a_missing_checkpoint(tmp_path, capsys):
    prompts = _prompts(tmp_path)
    code = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "r.jsonl")])
    assert code != 0
    assert "--checkpoint" in capsys.readouterr().err
