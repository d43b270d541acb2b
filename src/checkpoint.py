"""Training checkpoint folders, and the checkpoint of a single-process run.

Every run writes ``<output_dir>/checkpoints/step-NNNNNN/`` folders and a ``latest`` file;
``resolve_checkpoint`` finds them again. A multi-process run writes the folder with
``keyetron.parallel.sharded_checkpoint`` (any layout loads it); a single-process run writes
the layout below (model, optimizer, schedule, step, data position).

Layout of ``<output_dir>/checkpoints/step-000120/``:
``model.safetensors`` (our parameter names), ``optim.pt`` (optimizer + LR schedule state),
``state.json`` (step, loader position, skip counts, RNG, metrics), ``recipe.yaml`` and ``model.yaml``
(the architecture trained, the recipe's overrides such as a raised RoPE base included).
A checkpoint is written into ``step-N.tmp`` and renamed when complete, so a run killed
mid-save never leaves a checkpoint that looks whole; ``latest`` names the newest one.
The model can be exported in the Hugging Face layout with ``keyetron.model.hf_checkpoint``.
"""
from __future__ import annotations

import json
import os
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"  # every file of a finished checkpoint with its size, written last

log = logging.getLogger("keyetron.train")


class CheckpointNotFound(FileNotFoundError):
    """No checkpoint where the recipe or caller said one would be."""


@dataclass
class TrainState:
    step: int
    loader: dict
    rng: list[int]
    extra: dict


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode other files get (``0o666`` less the umask):
    safetensors creates 0600 files, which the rest of a team cannot read on a shared cluster."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
                    keep: int = 2, tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
                    model_text: str = "", model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """``tensor_files``: more safetensors files written beside the model (file name -> tensors), e.g.
    stage 0's text tower and pooling head, which are not Keye-VL parameters. ``model_text``: the
    architecture as ``model.yaml`` (``keyetron.model.config.config_yaml``), overrides included.
    ``model_state``: the tensors to write instead of ``model.state_dict()`` (bf16 runs write their
    fp32 master weights)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = model_state if model_state is not None else model.state_dict()
    tensors = {k: v.detach().cpu().clone() for k, v in state.items()}  # tied weights: own copies
    save_tensors(tensors, tmp / "model.safetensors", metadata={"step": str(step)})
    for name, more in (tensor_files or {}).items():
        save_tensors({k: v.detach().cpu().contiguous() for k, v in more.items()}, tmp / name,
                  metadata={"step": str(step)})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    state = {"step": step, "loader": loader_state, "rng": torch.get_rng_state().tolist(), "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "recipe.yaml").write_text(recipe_text)
    if model_text:
        (tmp / "model.yaml").write_text(model_text)
    write_manifest(tmp)
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


def mark_distributed_checkpoint(path: Path, step: int, keep: int, recipe_text: str, model_text: str = "") -> None:
    """Make a finished distributed checkpoint findable like a single-process one (rank 0 only): the
    manifest of every rank's files, then ``state.json`` (what ``list_checkpoints`` looks for) last."""
    (path / "recipe.yaml").write_text(recipe_text)
    if model_text:
        (path / "model.yaml").write_text(model_text)
    write_manifest(path)
    (path / "state.json").write_text(json.dumps({"step": step, "format": "torch.distributed.checkpoint"}))
    (path.parent / "latest").write_text(path.name + "\n")
    for old in list_checkpoints(path.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path) -> None:
    """Record every file of a finished checkpoint folder with its size (``checkpoint_problem`` checks them)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}))


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed (a file missing, truncated or unreadable), or None.

    Checks what is cheap: the manifest's files and sizes, ``state.json``, and the headers of the
    tensor files (safetensors) or the sharded checkpoint's metadata; it never reads the tensors."""
    path = Path(path)
    try:
        if (path / MANIFEST).is_file():
            for name, size in json.loads((path / MANIFEST).read_text())["files"].items():
                f = path / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != size:
                    return f"{name} has {f.stat().st_size} bytes, {size} were written"
        json.loads((path / "state.json").read_text())
        if is_distributed_checkpoint(path):
            from torch.distributed.checkpoint import FileSystemReader

            FileSystemReader(path).read_metadata()
        else:
            from safetensors import safe_open

            for f in sorted(path.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
    except Exception as err:  # any unreadable piece makes the checkpoint unusable; say which and why
        return f"{type(err).__name__}: {err}"
    return None


def resolve_checkpoint(choice: str, root: str | Path) -> Path | None:
    """``auto``: the newest intact checkpoint under ``root`` (a broken newer one is passed over, with a
    warning saying why) or None when there is none; ``none``: None; else that path, which must be intact."""
    if choice == "none":
        return None
    if choice == "auto":
        found = list_checkpoints(root)
        broken = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("checkpoint %s cannot be resumed (%s); trying the one before it", path, problem)
            broken.append(f"{path.name}: {problem}")
        if broken:
            raise CheckpointNotFound(f"no checkpoint under {root} can be resumed ({'; '.join(broken)}); delete them "
                                     "or set checkpoint.resume: none to start over")
        return None
    path = Path(choice)
    if not (path / "state.json").is_file():
        raise CheckpointNotFound(f"checkpoint {path} not found (no state.json); give a step-N folder, 'auto' or "
                                 f"'none' as checkpoint.resume")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointNotFound(f"checkpoint {path} cannot be resumed: {problem}; point checkpoint.resume at "
                                 "another one (auto: the newest intact one)")
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


__all__ = ["CheckpointNotFound", "MANIFEST", "TrainState", "checkpoint_problem", "is_distributed_checkpoint",
           "list_checkpoints", "mark_distributed_checkpoint", "step_dir", "load_checkpoint", "resolve_checkpoint",
           "save_checkpoint", "save_tensors"]
