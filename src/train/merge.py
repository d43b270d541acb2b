"""Model merging: the weighted average of several checkpoints of one architecture.

Inputs may be keyetron single-process checkpoints (a ``step-N`` folder with
``model.safetensors``), keyetron distributed checkpoints (``torch.distributed.checkpoint``
folders of any parallel layout) and Hugging Face folders (released names, sharded or not),
mixed freely: every input is read by our parameter names.

Weights must be positive; they are divided by their sum, so ``1,3`` and ``0.25,0.75`` are
the same merge. Every tensor is accumulated in fp32 (fp64 for fp64 inputs) and written in
``dtype`` (``auto``: the first input's dtype), so one input with weight 1 comes back bitwise.

The output folder holds ``model.safetensors`` (our names, as in a single-process
checkpoint: ``load_checkpoint``'s weights, without optimizer state), ``merge.json`` (the
inputs and normalised weights) and ``model.yaml`` (the model config, when known). With
``hf_output`` the Hugging Face layout is written too; that is what ``model.init`` of a
training recipe and ``load_hf_model`` read.

Memory: the merged model plus one group of tensors (``group_bytes``) per input at a time;
no input is ever held whole.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from keyetron.checkpoint import CheckpointNotFound, save_tensors
from keyetron.config import ConfigError, from_dict, load_yaml
from keyetron.model.config import KeyeConfig, config_differences, config_yaml, load_model_config
from keyetron.model.hf_checkpoint import checkpoint_files, config_from_hf, from_hf_name, save_hf_checkpoint

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
OUR_PREFIXES = ("vit.", "projector.", "llm.")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class MergeError(ValueError):
    """The inputs cannot be merged (missing, not a checkpoint, different architectures)."""


@dataclass
class MergeInput:
    path: str
    weight: float = 1.0


@dataclass
class MergeRecipe:
    inputs: list[MergeInput] = field(default_factory=list)
    output: str = ""  # folder for model.safetensors, merge.json, model.yaml
    hf_output: str | None = None  # also write the Hugging Face layout here
    dtype: str = "auto"  # auto (the first input's) | float32 | bfloat16 | float16
    config: str | None = None  # model config (name or YAML) when no input names one; needed for hf_output

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one checkpoint")
        if not self.output:
            raise ValueError("output is missing: the folder to write the merged checkpoint to")
        bad = [i.weight for i in self.inputs if not (math.isfinite(i.weight) and i.weight > 0)]
        if bad:
            raise ValueError(f"weights must be positive (they are normalised to sum to 1), got {bad}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")


def load_merge_recipe(path: str | Path) -> MergeRecipe:
    """A merge recipe YAML (see recipes/merge.yaml); relative paths are taken from the current directory."""
    return load_yaml(MergeRecipe, path)


def recipe_from_cli(checkpoints: list[str], weights: str | None, output: str | None, **options) -> MergeRecipe:
    """``keyetron merge --out DIR [--weights 0.5,0.5] CKPT...``; equal weights when none are given."""
    try:
        values = [float(w) for w in weights.split(",")] if weights else [1.0] * len(checkpoints)
    except ValueError as err:
        raise ConfigError(f"--weights {weights!r}: expected comma-separated numbers, e.g. 0.5,0.5") from err
    if len(values) != len(checkpoints):
        raise ConfigError(f"--weights has {len(values)} value(s) for {len(checkpoints)} checkpoint(s)")
    data = {"inputs": [{"path": p, "weight": w} for p, w in zip(checkpoints, values)], "output": output or "",
            **{k: v for k, v in options.items() if v is not None}}
    return from_dict(MergeRecipe, data, "keyetron merge")


# -- reading every format by our parameter names ----------------------------------------------
class Checkpoint:
    """One input: ``entries`` maps our parameter names to (shape, dtype); ``read`` loads some of them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise MergeError(f"checkpoint {self.path} does not exist")
        if (self.path / ".metadata").is_file():
            self.format, self.entries = "keyetron-distributed", self._dcp_entries()
            return
        try:
            files = checkpoint_files(self.path)
        except RuntimeError as err:
            raise MergeError(f"{self.path} is not a checkpoint: no .metadata (distributed), model.safetensors "
                             f"(keyetron or Hugging Face) or safetensors index ({err})") from err
        ours = all(name.startswith(OUR_PREFIXES) for name in files)
        self.format = "keyetron" if ours else "huggingface"
        self.source: dict[str, tuple[Path, str]] = {}  # our name -> (file, name in the file)
        for name, f in files.items():
            mine = name if ours else from_hf_name(name)
            if mine is not None and mine.startswith("<unknown>"):
                raise MergeError(f"{f}: tensor {name} is not a Keye-VL parameter; is this a Keye-VL checkpoint?")
            if mine is not None:
                self.source[mine] = (f, name)
        if "llm.lm_head.weight" not in self.source and "llm.embed_tokens.weight" in self.source:
            config = self.model_config()
            if config is not None and config.text.tie_word_embeddings:  # a tied head is saved once
                self.source["llm.lm_head.weight"] = self.source["llm.embed_tokens.weight"]
        self.entries = {}
        for mine, (f, name) in self.source.items():
            with safe_open(f, framework="pt") as handle:
                piece = handle.get_slice(name)
                self.entries[mine] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()])

    def _dcp_entries(self) -> dict:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        saved = FileSystemReader(self.path).read_metadata().state_dict_metadata
        return {k[len("model."):]: (tuple(md.size), md.properties.dtype) for k, md in saved.items()
                if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}

    def where(self, name: str) -> str:
        """The file holding ``name`` (the folder for a distributed checkpoint, or when absent)."""
        return str(self.source[name][0]) if self.format != "keyetron-distributed" and name in self.source \
            else str(self.path)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self.format == "keyetron-distributed":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

            state = {f"model.{n}": torch.empty(self.entries[n][0], dtype=self.entries[n][1]) for n in names}
            with warnings.catch_warnings():  # one process reading on purpose
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=self.path, no_dist=True,
                         planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
            return {n: state[f"model.{n}"] for n in names}
        out = {}
        for n in names:
            f, name = self.source[n]
            with safe_open(f, framework="pt") as handle:
                out[n] = handle.get_tensor(name)
        return out

    def model_config(self) -> KeyeConfig | None:
        """The architecture the checkpoint was trained with: config.json (HF), model.yaml (a run's or a
        merge's: every override included) or, for checkpoints written before model.yaml, the run's
        recipe.yaml (``model.config`` with the section's overrides, such as ``model.rope_theta``)."""
        from keyetron.train.recipe import ModelSection, model_config_of

        folder = self.path if self.path.is_dir() else self.path.parent
        if (folder / "config.json").is_file():
            return config_from_hf(folder)
        if (folder / "model.yaml").is_file():
            return load_model_config(folder / "model.yaml")
        if (folder / "recipe.yaml").is_file():
            recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
            section = recipe.get("model") or {}
            if not section.get("config"):
                return None
            return model_config_of(from_dict(ModelSection, section, str(folder / "recipe.yaml")))
        return None


def init_from_checkpoint(model: torch.nn.Module, path: str, key: str = "model.init") -> None:
    """Weights only (``model.init``) from a Hugging Face folder, a keyetron checkpoint of any
    layout, or a ``keyetron merge`` output; every parameter must be there with its shape.
    ``key``: the recipe key that named ``path``, for the errors."""
    if not Path(path).exists():
        raise CheckpointNotFound(f"{key} {path} does not exist: give a Hugging Face folder, a keyetron step-N "
                                 "checkpoint or a `keyetron merge` output")
    try:
        ck = Checkpoint(path)
    except MergeError as err:
        raise ConfigError(f"{key}: {err}") from err
    want = model.state_dict()
    missing = [n for n in want if n not in ck.entries]
    wrong = [f"{n} {tuple(ck.entries[n][0])} != {tuple(t.shape)}" for n, t in want.items()
             if n in ck.entries and tuple(ck.entries[n][0]) != tuple(t.shape)]
    if missing or wrong:
        saved = ck.model_config()
        trained = f" (trained as {saved.name})" if saved is not None else ""
        raise ConfigError(f"{key} {path} ({ck.format}{trained}) does not fit model config "
                          f"{getattr(getattr(model, 'cfg', None), 'name', '?')}: "
                          f"{len(missing)} tensors missing {missing[:3]}, {len(wrong)} of other shapes {wrong[:3]}; "
                          "set model.config to the architecture it was written for")
    model.load_state_dict(ck.read(list(want)))
    logging.getLogger("keyetron.train").info("initialised the model from %s (%s)", path, ck.format)


def check_same_architecture(inputs: list[Checkpoint]) -> None:
    """Every input has the same parameter names and shapes as the first; else name the first difference."""
    first = inputs[0]
    for other in inputs[1:]:
        for name in sorted(set(first.entries) | set(other.entries)):
            a, b = first.entries.get(name), other.entries.get(name)
            if a is None or b is None or a[0] != b[0]:
                def say(ck, e):
                    return f"{ck.where(name)} has " + (f"shape {list(e[0])}" if e else "no such tensor")
                raise MergeError(f"{first.path} and {other.path} are not the same architecture; first difference at "
                                 f"{name}: {say(first, a)}, {say(other, b)}. Merge checkpoints of one model config.")


def _groups(entries: dict, group_bytes: int):
    group, size = [], 0
    for name, (shape, _dtype) in entries.items():
        nbytes = math.prod(shape) * 4
        if group and size + nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


# -- merging ------------------------------------------------------------------------------------
@torch.no_grad()
def merge(recipe: MergeRecipe, group_bytes: int = 2**30) -> dict:
    """Write the merged checkpoint; returns a summary (inputs with normalised weights, outputs)."""
    inputs = [Checkpoint(i.path) for i in recipe.inputs]
    out = Path(recipe.output)
    for dest in filter(None, (recipe.output, recipe.hf_output)):
        if any(Path(dest).resolve() == ck.path.resolve() for ck in inputs):
            raise MergeError(f"output {dest} is one of the inputs; write the merge to a new folder")
    if out.exists() and any(out.iterdir()) and not (out / "merge.json").is_file():
        raise MergeError(f"output {out} exists and is not an earlier merge; choose a new folder or empty it")
    check_same_architecture(inputs)
    configs = [(ck, ck.model_config()) for ck in inputs]
    known = [(ck, c) for ck, c in configs if c is not None]
    for ck, c in known[1:]:
        differ = config_differences(known[0][1], c)
        if differ:
            raise MergeError(f"{known[0][0].path} and {ck.path} were trained with different architectures: "
                             f"{'; '.join(differ)}. Merge checkpoints of one architecture (a raised RoPE base "
                             "included).")
    config = load_model_config(recipe.config) if recipe.config else (known[0][1] if known else None)
    if recipe.hf_output and config is None:
        raise MergeError("hf_output needs the model config and no input names one; pass --config NAME")
    total = sum(i.weight for i in recipe.inputs)
    weights = [i.weight / total for i in recipe.inputs]
    out_dtype = DTYPES[recipe.dtype]
    merged: dict[str, torch.Tensor] = {}
    for group in _groups(inputs[0].entries, group_bytes):
        acc: dict[str, torch.Tensor] = {}
        for ck, w in zip(inputs, weights):
            for name, t in ck.read(group).items():
                if not t.is_floating_point():
                    if name in acc and not torch.equal(acc[name], t):
                        raise MergeError(f"{name} is an integer tensor that differs between {inputs[0].where(name)} "
                                         f"and {ck.where(name)}; it cannot be averaged")
                    acc.setdefault(name, t)
                elif name in acc:
                    acc[name].add_(t.to(acc[name].dtype), alpha=w)
                else:
                    acc[name] = t.to(torch.promote_types(t.dtype, torch.float32)) * w
        for name in group:
            first_dtype = inputs[0].entries[name][1]
            merged[name] = acc.pop(name).to(out_dtype if out_dtype and first_dtype.is_floating_point else first_dtype)
    summary = {"output": str(out), "hf_output": recipe.hf_output, "dtype": recipe.dtype, "tensors": len(merged),
               "inputs": [{"path": str(ck.path), "format": ck.format, "weight": i.weight, "normalised_weight": w}
                          for ck, i, w in zip(inputs, recipe.inputs, weights)]}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(merged, tmp / "model.safetensors", metadata={"format": "pt", "merged_from": json.dumps(summary)})
    (tmp / "merge.json").write_text(json.dumps(summary, indent=2))
    if config is not None:
        (tmp / "model.yaml").write_text(config_yaml(config))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if recipe.hf_output:
        _save_hf(merged, config, recipe.hf_output)
    return summary


def _save_hf(merged: dict[str, torch.Tensor], config: KeyeConfig, path: str) -> None:
    from keyetron.model.keye import KeyeVLModel

    with torch.device("meta"):
        model = KeyeVLModel(config)
    model.load_state_dict(merged, assign=True)  # the merged tensors become the parameters: no copy
    if config.text.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    save_hf_checkpoint(model, path)


__all__ = ["Checkpoint", "MergeError", "init_from_checkpoint", "MergeInput", "MergeRecipe", "check_same_architecture",
           "load_merge_recipe", "merge", "recipe_from_cli"]
