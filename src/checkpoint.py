"""Training checkpoint folders, and the checkpoint of a single-process run.

Every run writes ``<output_dir>/checkpoints/step-NNNNNN/`` folders and a ``latest`` file;
``resolve_checkpoint`` finds them again. A multi-process run writes the folder with
``keyetron.parallel.sharded_checkpoint`` (any layout loads it); a single-process run writes
the layout below (model, optimizer, schedule, step, data position).

Layout of ``<output_dir>/checkpoints/step-000120/``:
``model.safetensors`` (our parameter names), ``optim.pt`` (optimizer + LR schedule state),
``state.json`` (step, loader position, skip counts, RNG, metrics) and ``recipe.yaml``.
A checkpoint is written into ``step-N.tmp`` and renamed when complete, so a run killed
mid-save never leaves a checkpoint that looks whole; ``latest`` names the newest one.
The model can be exported in the Hugging Face layout with ``keyetron.model.hf_checkpoint``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointNotFound(FileNotFoundError):
    """No checkpoint where the recipe or caller said one would be."""


@dataclass
class TrainState:
    step: int
    loader: dict
    rng: list[int]
    extra: dict


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, loader_state: dict, extra: dict | None = None, recipe_text: str = "",
                    keep: int = 2, tensor_files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """``tensor_files``: more safetensors files written beside the model (file name -> tensors), e.g.
    stage 0's text tower and pooling head, which are not Keye-VL parameters."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # tied weights: own copies
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    for name, more in (tensor_files or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in more.items()}, str(tmp / name),
                  metadata={"step": str(step)})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    state = {"step": step, "loader": loader_state, "rng": torch.get_rng_state().tolist(), "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "recipe.yaml").write_text(recipe_text)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (root / "latest").write_text(final.name + "\n")
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A torch.distributed.checkpoint folder (keyetron.parallel.sharded_checkpoint), not a single-process one."""
    return not (Path(path) / "model.safetensors").is_file()


def mark_distributed_checkpoint(path: Path, step: int, keep: int, recipe_text: str) -> None:
    """Make a finished distributed checkpoint findable like a single-process one (rank 0 only)."""
    (path / "state.json").write_text(json.dumps({"step": step, "format": "torch.distributed.checkpoint"}))
    (path / "recipe.yaml").write_text(recipe_text)
    (path.parent / "latest").write_text(path.name + "\n")
    for old in list_checkpoints(path.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(choice: str, root: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint under ``root`` or None; ``none``: None; else that path."""
    if choice == "none":
        return None
    if choice == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(choice)
    if not (path / "state.json").is_file():
        raise CheckpointNotFound(f"checkpoint {path} not found (no state.json); give a step-N folder, 'auto' or "
                                 f"'none' as checkpoint.resume")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None) -> TrainState:
    """Load a single-process checkpoint into ``model`` (and the optimizer and schedule). Every
    tensor of ``model`` must be in ``model.safetensors`` with its shape; tensors of parts
    ``model`` does not hold at all (a ViT-only run's projector and LLM) are left unread."""
    path = Path(path)
    tensors = load_file(str(path / "model.safetensors"))
    want = model.state_dict()
    parts = {name.split(".")[0] for name in want}
    mine = {k: v for k, v in tensors.items() if k.split(".")[0] in parts}
    missing = sorted(set(want) - set(mine))
    unexpected = sorted(set(mine) - set(want))
    wrong = [f"{k} {tuple(mine[k].shape)} != {tuple(want[k].shape)}" for k in want if k in mine
             and mine[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}; was it saved with another model config?")
    model.load_state_dict(mine)
    if optimizer is not None:
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optim["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(optim["scheduler"])
    state = json.loads((path / "state.json").read_text())
    return TrainState(state["step"], state["loader"], state["rng"], state["extra"])


__all__ = ["CheckpointNotFound", "TrainState", "is_distributed_checkpoint",
           "list_checkpoints", "mark_distributed_checkpoint", "step_dir", "load_checkpoint", "resolve_checkpoint",
           "save_checkpoint"]
