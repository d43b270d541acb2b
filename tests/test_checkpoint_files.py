"""Checkpoint folders: files readable by the team (the umask, not safetensors' 0600), a manifest of
every file, and ``resume: auto`` passing over a broken newest checkpoint, single-process or sharded."""
import json
import os

import pytest
import torch

from keyetron.checkpoint import (MANIFEST, CheckpointNotFound, checkpoint_problem, mark_distributed_checkpoint,
                                 resolve_checkpoint, save_checkpoint, save_tensors, step_dir)
from keyetron.parallel.sharded_checkpoint import save_distributed
from keyetron.parallel.topology import Topology


def _save(root, step):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(root, step, model, opt, sched, {"cursor": step}, keep=5, model_text="config: tiny\n")


def test_tensor_files_take_the_umask_not_safetensors_0600(tmp_path):
    old = os.umask(0o027)
    try:
        save_tensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
        path = _save(tmp_path / "ck", 1)
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_the_manifest_lists_every_file_and_a_cut_or_missing_one_is_named(tmp_path):
    path = _save(tmp_path, 1)
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optim.pt", "state.json", "recipe.yaml", "model.yaml"} <= set(files)
    assert checkpoint_problem(path) is None
    (path / "optim.pt").write_bytes((path / "optim.pt").read_bytes()[:10])
    assert checkpoint_problem(path).startswith("optim.pt has 10 bytes")
    (path / "optim.pt").unlink()
    assert checkpoint_problem(path) == "optim.pt is missing"


def test_a_sharded_checkpoint_with_a_cut_shard_is_broken(tmp_path):
    path = save_distributed(step_dir(tmp_path, 3), torch.nn.Linear(4, 3), None, Topology.single(), {"step": 3})
    mark_distributed_checkpoint(path, 3, keep=5, recipe_text="model:\n  config: tiny\n")
    assert checkpoint_problem(path) is None
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-4])
    assert checkpoint_problem(path).startswith(f"{shard.name} has")


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_refuses_when_none_is(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert resolve_checkpoint("auto", tmp_path) == step_dir(tmp_path, 3)
    (step_dir(tmp_path, 3) / "model.safetensors").write_bytes(b"not a tensor file")
    assert resolve_checkpoint("auto", tmp_path) == step_dir(tmp_path, 2)
    with pytest.raises(CheckpointNotFound, match="step-000003 cannot be resumed: model.safetensors has 17 bytes"):
        resolve_checkpoint(str(step_dir(tmp_path, 3)), tmp_path)
    for step in (1, 2):
        (step_dir(tmp_path, step) / "state.json").write_text("{")
    with pytest.raises(CheckpointNotFound, match="no checkpoint under .* can be resumed"):
        resolve_checkpoint("auto", tmp_path)
