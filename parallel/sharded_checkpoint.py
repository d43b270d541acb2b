"""Sharded training checkpoints that load under any parallel layout (torch.distributed.checkpoint).

A checkpoint holds the *logical* training state, named as in the single-process model, so
one written under one layout (ZeRO-1 over N ranks, TP2, CP2 x DP2, ...) loads under any
other, or into one process with plain ``torch.optim.AdamW``:

- ``model.<name>``: ``model.state_dict()``. Tensor-parallel parameters are DTensors, so DCP
  records which block of the full tensor each rank holds and reshards on load; replicated
  tensors (ViT, norms, replicated KV projections) are written once (DCP drops duplicates).
- ``optim.<parameter name>.exp_avg / exp_avg_sq / step / master``: AdamW state per parameter
  in the parameter's full logical shape, never ZeRO's flat buffer. A ZeRO-1 rank holds a
  contiguous 1/N range of its group's flattened TP-local parameters; it describes its part
  of each parameter as a few rectangular blocks of the full tensor (``flat_range_blocks``)
  and hands DCP views of its own buffers. Nothing is gathered: each rank writes and reads
  only the state it holds (the writer makes a transient copy of one block at a time).
  ``master`` (ZeRO's fp32/fp64 master weights) is written by ZeRO only; an optimizer
  without master weights ignores it, and ZeRO loading a checkpoint without it rebuilds
  the master from the loaded parameters.
- ``optim_groups.<group name>``: the group's ``lr`` / ``initial_lr`` (what the LR scheduler
  drives; betas, eps and weight decay come from the recipe).
- ``extra``: the caller's JSON-serialisable plain data (step counter, scheduler state,
  data-loader position).

Pipeline parallelism: a stage's model and optimizer hold only its layers, so each rank's
state dict holds only their keys; DCP merges the ranks' keys on save and every rank reads
only its own on load; the key checks are made over the union of all ranks. PP only
needs each stage to keep the single-process parameter names (``llm.layers.17...``, not
renumbered per stage) and its optimizer groups to be named as in the single process.

Every rank writes its own file into the checkpoint folder (several nodes need a shared
filesystem). The folder is written as ``<path>.tmp`` and renamed when complete, so a run
killed mid-save never leaves a checkpoint that looks whole.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                  TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from keyetron.parallel.data_parallel import ShardedAdamW
from keyetron.parallel.mixed_precision import full_precision_state, is_low_precision, master_targets
from keyetron.parallel.topology import Topology
from keyetron.checkpoint import CheckpointNotFound

STATE_KEYS = ("exp_avg", "exp_avg_sq")


# -- a parameter's state as blocks of its full tensor ---------------------------------------------
def flat_range_blocks(shape, start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Rectangular blocks ``(offsets, sizes, flat start)`` tiling elements [start, stop) of a
    row-major tensor of ``shape``: a partial first row, whole rows, a partial last row,
    recursively. Each block is contiguous in flat order, so it is a view of the flat range
    reshaped to ``sizes``. At most 2 * ndim - 1 blocks."""
    if start >= stop:
        return []
    if len(shape) == 0:
        return [((), (), 0)]
    if len(shape) == 1:
        return [((start,), (stop - start,), start)]
    inner = math.prod(shape[1:])
    first, last, lo, hi = start // inner, stop // inner, start % inner, stop % inner

    def part_of_row(r: int, a: int, b: int):
        return [((r, *o), (1, *s), r * inner + f) for o, s, f in flat_range_blocks(shape[1:], a, b)]

    if first == last:
        return part_of_row(first, lo, hi)
    blocks = []
    if lo:
        blocks += part_of_row(first, lo, inner)
        first += 1
    if last > first:
        blocks.append(((first, *[0] * (len(shape) - 1)), (last - first, *shape[1:]), first * inner))
    if hi:
        blocks += part_of_row(last, 0, hi)
    return blocks


class Blocks:
    """This rank's blocks of one logical tensor, for DCP: ``[(global offsets, tensor)]``.

    DCP saves each block as a chunk of a tensor of ``size`` and, on load, reads into each
    block whatever saved chunks overlap it (the same protocol DTensor implements, with
    several chunks per rank). The tensors are views of optimizer buffers, so loading is
    in place."""

    def __init__(self, size, blocks: list[tuple[tuple[int, ...], torch.Tensor]]):
        self._size, self.blocks = torch.Size(size), blocks

    def size(self) -> torch.Size:
        return self._size

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), t.shape) for o, t in self.blocks]

    def __create_write_items__(self, fqn: str, _obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets, i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(t),
                                                      size=self._size))
                for i, (chunk, (_, t)) in enumerate(zip(self.__create_chunk_list__(), self.blocks))]

    def block(self, index: MetadataIndex) -> torch.Tensor:
        for o, t in self.blocks:
            if torch.Size(o) == index.offset:
                return t
        raise AssertionError(f"{index.fqn}: no block at {index.offset}")


# The state dicts are built flat ("optim.<param>.exp_avg"): one naming for save, load and
# the key checks, and the loaded non-tensor values come back under the same keys.
_FLAT = {"flatten_state_dict": False, "flatten_sharded_tensors": False}


def _prefixed(prefix: str, nested: dict) -> dict:
    """``{prefix.key: value}``, one level of nested dicts joined with dots too."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}.{key}"] = value
    return out


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.block(index) if isinstance(obj, Blocks) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        blocks = {k: v for k, v in state_dict.items() if isinstance(v, Blocks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.state_dict.update(blocks)  # DCP's meta-tensor initialisation sets unknown types to None

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.block(index) if isinstance(obj, Blocks) else super().lookup_tensor(index)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_offset(p: torch.Tensor) -> tuple[int, ...]:
    """Where the rank's TP-local tensor of ``p`` starts in the full tensor."""
    if not isinstance(p, DTensor):
        return (0,) * p.dim()
    return tuple(compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1])


def _writes_replica(p: torch.Tensor) -> bool:
    """Whether this rank writes ``p``'s ZeRO blocks: the first rank along every mesh dim
    that replicates it (TP ranks with one ZeRO slicing would write equal chunks; with any
    other, overlapping ones that DCP rejects)."""
    if not isinstance(p, DTensor):
        return True
    return all(p.device_mesh.get_local_rank(d) == 0 for d, pl in enumerate(p.placements) if pl.is_replicate())


def _zero_blocks(opt: ShardedAdamW, layout) -> list[tuple[torch.Tensor, list]]:
    """Per parameter of a ZeRO group: ``[(global offsets, sizes, start in this rank's shard)]``.
    ZeRO-1 owns one contiguous range of the group's flat parameters, ZeRO-2 one per bucket."""
    params, numels = layout[0], layout[1]
    ranges, offset, out = opt.owned_ranges(layout), 0, []
    for p, n in zip(params, numels):
        shift, blocks = _shard_offset(p), []
        for start, stop, at in ranges:
            lo, hi = max(offset, start), min(offset + n, stop)
            blocks += [(tuple(a + b for a, b in zip(o, shift)), s, at + offset + f - start)
                       for o, s, f in flat_range_blocks(_local(p).shape, lo - offset, hi - offset)]
        out.append((p, blocks))
        offset += n
    return out


def _view_blocks(flat: torch.Tensor, p: torch.Tensor, blocks) -> Blocks:
    flat = flat.detach()  # in-place loads into a leaf that requires grad must not be recorded
    return Blocks(p.shape, [(o, flat[i:i + math.prod(s)].view(s)) for o, s, i in blocks])


# -- the optimizer's state, per parameter name ----------------------------------------------------
def _adamw(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (``PlainAdamW``/``ShardedAdamW`` wrap one)."""
    return getattr(optimizer, "inner", optimizer)


def _new_state(like: torch.Tensor, group: dict) -> dict:
    """The state ``torch.optim.AdamW`` creates at a parameter's first step."""
    on_device = group.get("fused") or group.get("capturable")
    step = torch.zeros((), dtype=torch.float32, device=like.device if on_device else "cpu")
    return {"step": step, "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format)}


def _masters(optimizer):
    return getattr(optimizer, "masters", None)


def _names(model: nn.Module, optimizer) -> dict[int, str]:
    """``{id(tensor): parameter name}`` for the model's parameters and their fp32 masters."""
    names = {id(p): n for n, p in model.named_parameters()}
    masters = _masters(optimizer)
    return {**names, **(masters.names(names) if masters is not None else {})}


def optimizer_state(model: nn.Module, optimizer, *, saving: bool) -> tuple[dict, dict]:
    """This rank's optimizer state as DCP values: ``({param name: {key: tensor}}, {group: {lr}})``.

    Saving, parameters without state yet are left out. Loading, missing state is created
    first (as AdamW would at the first step) and the returned tensors alias it, so DCP
    loads in place; ``step`` is then a fresh tensor, applied by ``_apply_steps``.
    """
    names = _names(model, optimizer)
    inner = _adamw(optimizer)
    layouts = optimizer.layouts if isinstance(optimizer, ShardedAdamW) else [None] * len(inner.param_groups)
    per_param, groups = {}, {}
    master_ids = {id(m) for m in _masters(optimizer).of.values()} if _masters(optimizer) is not None else set()
    for gi, (g, layout) in enumerate(zip(inner.param_groups, layouts)):
        groups[g.get("name", str(gi))] = {k: float(g[k]) for k in ("lr", "initial_lr") if k in g}
        if layout is None:  # one state tensor per parameter, in its own shape (DTensor or not)
            for p in g["params"]:
                if not saving and p not in inner.state:
                    inner.state[p] = _new_state(p, g)
                if p in inner.state:
                    st = inner.state[p]
                    per_param[names[id(p)]] = {**{k: st[k] for k in STATE_KEYS}, "step": _step_value(st, saving)}
                    if id(p) in master_ids:  # an fp32 master of a bf16 parameter
                        per_param[names[id(p)]]["master"] = p
            continue
        master = g["params"][0]  # ZeRO: this rank's 1/N of the group's flat buffer
        if not saving and master not in inner.state:
            inner.state[master] = _new_state(master, g)
        if master not in inner.state:
            continue
        st = inner.state[master]
        buffers = {**{k: st[k] for k in STATE_KEYS}, "master": master}
        for p, blocks in _zero_blocks(optimizer, layout):
            entry = {"step": _step_value(st, saving)}
            if blocks and (not saving or _writes_replica(p)):
                entry.update({k: _view_blocks(buf, p, blocks) for k, buf in buffers.items()})
            per_param[names[id(p)]] = entry
    return per_param, groups


def _step_value(state: dict, saving: bool) -> torch.Tensor:
    return state["step"].detach().to("cpu", torch.float64) if saving else torch.zeros((), dtype=torch.float64)


def _apply_steps(model: nn.Module, optimizer, loaded: dict) -> None:
    """Copy the loaded per-parameter ``step`` into the optimizer (one per ZeRO group)."""
    names = _names(model, optimizer)
    inner = _adamw(optimizer)
    layouts = optimizer.layouts if isinstance(optimizer, ShardedAdamW) else [None] * len(inner.param_groups)
    for g, layout in zip(inner.param_groups, layouts):
        if layout is None:
            for p in g["params"]:
                if "step" in loaded.get(names[id(p)], {}):
                    inner.state[p]["step"].fill_(loaded[names[id(p)]]["step"].item())
            continue
        steps = {loaded[names[id(p)]]["step"].item() for p in layout[0] if "step" in loaded.get(names[id(p)], {})}
        if len(steps) > 1:
            raise ValueError(f"optimizer group {g.get('name')}: the checkpoint has different AdamW steps {sorted(steps)} "
                             "for its parameters; ZeRO-1 keeps one step per group")
        if steps:
            inner.state[g["params"][0]]["step"].fill_(steps.pop())


@torch.no_grad()
def _master_from_params(opt: ShardedAdamW) -> None:
    """Rebuild ZeRO's master slices from the (loaded) parameters, as ``ShardedAdamW`` does at start."""
    for layout, g in zip(opt.layouts, opt.param_groups):
        if layout is None:
            continue
        master = g["params"][0]
        master.copy_(opt.master_slice(layout, master.dtype, master.device))


# -- save and load ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_if_single(topo: Topology):
    """DCP warns that it "assumes" one process; here one process is what was asked for."""
    with warnings.catch_warnings():
        if not topo.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(topo: Topology) -> None:
    if topo.distributed:
        dist.barrier()


def save_distributed(path: str | Path, model: nn.Module, optimizer, topo: Topology, extra: dict | None = None) -> Path:
    """Write this run's model, optimizer state and ``extra`` to the folder ``path`` (all ranks call it).

    ``optimizer``: the engine's ``ShardedAdamW``/``PlainAdamW``, a ``torch.optim.AdamW``, or
    None (model only). ``extra`` must be JSON-serialisable (step, scheduler state, ...)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if topo.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(topo)
    model_state = full_precision_state(model, _masters(optimizer))  # bf16 parameters: their fp32 masters
    state = {"extra": json.dumps(extra or {}), **_prefixed("model", model_state)}
    if optimizer is not None:
        per_param, groups = optimizer_state(model, optimizer, saving=True)
        state.update({**_prefixed("optim", per_param), **_prefixed("optim_groups", groups)})
    with _quiet_if_single(topo):
        dcp.save(state, checkpoint_id=tmp, planner=_SavePlanner(**_FLAT), no_dist=not topo.distributed)
    if topo.rank == 0:  # dcp.save returns on every rank after rank 0 wrote the metadata
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier(topo)
    return path


def _check_fits(path: Path, saved: dict, model_state: dict, topo: Topology) -> None:
    """Raise (on every rank alike) if this model's keys or shapes differ from the checkpoint's."""
    saved_model = {k[len("model."):]: md for k, md in saved.items() if k.startswith("model.")}
    problems = []
    for key, t in model_state.items():
        md = saved_model.get(key)
        if md is None:
            problems.append(f"{key} is missing from the checkpoint")
        elif not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(t.shape):
            problems.append(f"{key} has shape {tuple(getattr(md, 'size', ()))} in the checkpoint, {tuple(t.shape)} "
                            "in this model")
    keys = [set(model_state)]
    if topo.distributed:  # under pipeline parallelism every stage holds some of the keys
        gathered = [None] * topo.world_size
        dist.all_gather_object(gathered, (set(model_state), problems))
        keys = [k for k, _ in gathered]
        problems = [p for _, ps in gathered for p in ps]
    problems = sorted(set(problems))
    unexpected = sorted(set(saved_model) - set().union(*keys))
    problems += [f"{key} is in the checkpoint but not in this model" for key in unexpected]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"checkpoint {path} does not fit this model: {shown}. Was it saved with another model "
                         "config? Load it with the config of the run that wrote it.")


def load_distributed(path: str | Path, model: nn.Module, optimizer, topo: Topology) -> dict:
    """Load a checkpoint written by ``save_distributed`` under any layout into this one (all
    ranks call it, after ``parallelize_keye`` and building the optimizer); returns ``extra``.

    Model keys must match exactly (else a ``ValueError`` naming the checkpoint and the
    keys). Optimizer state is loaded for every parameter the checkpoint has state for;
    the groups' ``lr``/``initial_lr`` are restored by group name."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointNotFound(f"distributed checkpoint {path} not found (no .metadata file); give the folder "
                                 "that save_distributed wrote")
    saved = FileSystemReader(path).read_metadata().state_dict_metadata
    model_state = model.state_dict()
    _check_fits(path, saved, model_state, topo)
    state = {"extra": "", **_prefixed("model", model_state)}
    per_param = {}
    if optimizer is not None:
        per_param, groups = optimizer_state(model, optimizer, saving=False)
        per_param = {n: {k: v for k, v in entry.items() if f"optim.{n}.{k}" in saved} for n, entry in per_param.items()}
        groups = {name: {k: v for k, v in lrs.items() if f"optim_groups.{name}.{k}" in saved}
                  for name, lrs in groups.items()}
        state.update({**_prefixed("optim", per_param), **_prefixed("optim_groups", groups)})
    if optimizer is not None:
        _load_weights_into_masters(state, saved, model, optimizer, per_param)
    with _quiet_if_single(topo):
        dcp.load(state, checkpoint_id=path, planner=_LoadPlanner(**_FLAT), no_dist=not topo.distributed)
    model.load_state_dict(model_state)
    if optimizer is not None:
        _apply_steps(model, optimizer, per_param)
        for g in _adamw(optimizer).param_groups:  # non-tensor values come back in ``state``
            g.update({k: state[f"optim_groups.{g.get('name')}.{k}"] for k in ("lr", "initial_lr")
                      if f"optim_groups.{g.get('name')}.{k}" in state})
        if isinstance(optimizer, ShardedAdamW) and not any(k.startswith("optim.") and k.endswith(".master")
                                                           for k in saved) and not _low_precision(model):
            _master_from_params(optimizer)
        if _low_precision(model) and hasattr(optimizer, "publish"):
            optimizer.publish()  # the bf16 parameters from the loaded fp32 masters
    return json.loads(state["extra"])


def _low_precision(model: nn.Module) -> bool:
    return any(p.requires_grad and is_low_precision(p) for p in model.parameters())


def _load_weights_into_masters(state: dict, saved: dict, model: nn.Module, optimizer, per_param: dict) -> None:
    """Point the load at full-precision values wherever they exist, whatever wrote the checkpoint.

    - a bf16 parameter with a master here: its master gets ``optim.<name>.master`` when saved
      (``per_param`` already holds it), else ``model.<name>`` (an fp32 run's exact weights);
      the parameter is rounded from it afterwards (``publish``);
    - an fp32 parameter with no master here, from a checkpoint whose ``model.<name>`` is bf16:
      it gets the saved master instead.
    """
    for key, master in master_targets(model, _masters(optimizer)).items():
        if "master" not in per_param.get(key, {}) and f"model.{key}" in saved:
            state[f"model.{key}"] = master
    if isinstance(optimizer, ShardedAdamW):
        names = {id(p): n for n, p in model.named_parameters()}
        for gi, layout in enumerate(optimizer.layouts):
            if layout is None:
                continue
            buffer = optimizer.param_groups[gi]["params"][0]
            for p, blocks in _zero_blocks(optimizer, layout):
                name = names[id(p)]
                if not is_low_precision(p) or f"optim.{name}.master" in saved:
                    continue
                if blocks:  # an fp32 run's weights straight into this rank's master slice
                    state[f"model.{name}"] = _view_blocks(buffer, p, blocks)
                else:
                    state.pop(f"model.{name}", None)
    for name, p in model.named_parameters():
        md = saved.get(f"model.{name}")
        if (not is_low_precision(p) and f"optim.{name}.master" in saved and f"optim.{name}.master" not in state
                and getattr(getattr(md, "properties", None), "dtype", p.dtype) != p.dtype):
            state.pop(f"model.{name}", None)
            state[f"optim.{name}.master"] = p


def load_into_single_process(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Continue a distributed run in one process: load ``path`` into a plain model and a
    ``torch.optim.AdamW`` built with the same parameter groups; returns ``extra``. Needs no
    process group and reads the whole state into this process (the model's full size)."""
    return load_distributed(path, model, optimizer, Topology.single())


__all__ = ["Blocks", "flat_range_blocks", "load_distributed", "load_into_single_process", "optimizer_state",
           "save_distributed"]
