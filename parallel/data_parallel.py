"""Data parallelism: gradient reduction per replica group, the true global norm, and ZeRO-1.

Who holds a copy of what decides where gradients are summed:

- the ViT and projector live on pipeline stage 0 and are replicated on every rank of it
  (dp x cp x tp ranks; the images of a micro-batch are divided among them), so their
  gradients are summed over ``group("dp", "cp", "tp")``;
- an LLM parameter (a full tensor, or a tensor-parallel shard) is replicated over the
  data- and context-parallel ranks of its stage, so it is summed over ``group("dp", "cp")``.

Each rank's loss is its summed token loss divided by the *global* number of loss tokens
of the step, so summing (not averaging) gradients gives exactly the single-process
gradient in every layout.

ZeRO-1 (``ShardedAdamW``): per parameter group, the gradients are flattened into one
buffer and reduce-scattered over the LLM replica group (dp x cp), so each rank receives
the summed gradient of its 1/N slice; it keeps the fp32 master copy and AdamW state of
that slice only, updates it with ``torch.optim.AdamW`` (the same arithmetic as the
unsharded optimizer), and the updated slices are all-gathered back into the parameters.
ViT/projector parameters are few (<5% of Keye-8B) and replicated over a different group;
they are all-reduced and updated in full on every stage-0 rank.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from keyetron.backend.collectives import all_gather_tensor, reduce_scatter_tensor
from keyetron.parallel.mixed_precision import MasterWeights, clear_grads, grad_of, set_grad, zero_grad_of
from keyetron.parallel.topology import Topology

VISION_MODULES = ("vit", "projector")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def replica_group_of(name: str) -> tuple[str, ...]:
    return ("dp", "cp", "tp") if name.split(".")[0] in VISION_MODULES else ("dp", "cp")


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_gradients(model: nn.Module, topo: Topology, skip: Iterable[str] = ()) -> None:
    """Sum every gradient over the ranks that hold a replica of its parameter (in place)."""
    if not topo.distributed:
        return
    skip = set(skip)
    buckets: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or name in skip:
            continue
        if grad_of(p) is None:  # e.g. a ViT that saw no image on this rank: every rank must send the same buffers
            set_grad(p, zero_grad_of(p))
        buckets.setdefault(replica_group_of(name), []).append(_local(grad_of(p)))
    for key in sorted(buckets):
        _all_reduce_coalesced(buckets[key], topo.group(*key))


def counted_once(name: str, p: torch.Tensor, topo: Topology) -> bool:
    """Whether this rank counts parameter ``name`` in the global norm (each value once)."""
    placements = getattr(p, "placements", None)
    tp_sharded = placements is not None and any(pl.is_shard() for pl in placements)
    if name.split(".")[0] in VISION_MODULES:
        return topo.dp_rank == 0 and topo.cp_rank == 0 and topo.tp_rank == 0
    # LLM: after reduction a value is identical over dp x cp; TP-replicated ones also over tp.
    return topo.dp_rank == 0 and topo.cp_rank == 0 and (tp_sharded or topo.tp_rank == 0)


def global_grad_norm(model: nn.Module, topo: Topology, norm_type: float = 2.0) -> torch.Tensor:
    """The 2-norm of the full-model gradient, every value counted once across all ranks.

    Call after ``reduce_gradients`` (or after ZeRO's reduce-scatter, with ``shards``)."""
    grads = [_local(grad_of(p)) for name, p in model.named_parameters()
             if grad_of(p) is not None and counted_once(name, p, topo)]
    return _all_ranks_norm(grads, topo)


def _all_ranks_norm(grads: list[torch.Tensor], topo: Topology) -> torch.Tensor:
    """sqrt of the sum over all ranks of this rank's ``grads``' squared norms (float64)."""
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    if grads:
        total += torch.stack(torch._foreach_norm(grads, 2.0)).double().pow(2).sum()
    if topo.distributed:
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def scale_gradients(param_groups: list[dict], coef: float) -> None:
    """Multiply every gradient of the optimizer's groups by ``coef`` (global-norm clipping)."""
    if coef == 1.0:
        return
    for g in param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.mul_(coef)


def clip_coefficient(norm: torch.Tensor, max_norm: float | None) -> float:
    if not max_norm or not math.isfinite(float(norm)):
        return 1.0
    return min(1.0, max_norm / (float(norm) + 1e-6))


def is_tp_sharded(p) -> bool:
    """Whether parameter ``p`` is split by tensor parallelism (a DTensor with a Shard placement)."""
    placements = getattr(p, "placements", None)
    return placements is not None and any(pl.is_shard() for pl in placements)


def range_norm_sq(params, numels, values: torch.Tensor, start: int, stop: int, tp_rank: int) -> torch.Tensor:
    """Squared norm of positions [start, stop) of ``params`` laid end to end (``values`` holds just
    those positions), counting each value once: TP-replicated parameters on TP rank 0 only."""
    out = torch.zeros((), dtype=torch.float64, device=values.device)
    offset = 0
    for p, n in zip(params, numels):
        lo, hi = max(offset, start), min(offset + n, stop)
        if lo < hi and (is_tp_sharded(p) or tp_rank == 0):
            out += values[lo - start:hi - start].double().pow(2).sum()
        offset += n
    return out


class PlainAdamW:
    """Unsharded AdamW behind the same interface as ``ShardedAdamW`` (one process, or every rank
    holding the whole optimizer state). Low-precision parameters are stepped as fp32 masters."""

    def __init__(self, model: nn.Module, named_groups: list[dict], topo: Topology, betas, eps):
        self.model, self.topo = model, topo
        self.masters = MasterWeights()
        named_groups = [{**g, "params": self.masters.wrap(list(g["params"]))} for g in named_groups]
        params = [p for g in named_groups for p in g["params"]]
        # The fused kernel updates all tensors in one pass (on a CPU the per-tensor loop cost ~0.3 s a step
        # for the 63M-parameter demo model); DTensor parameters take the default implementation.
        fused = bool(params) and not any(hasattr(p, "placements") for p in params) and \
            all(p.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for p in params)
        self.inner = torch.optim.AdamW(named_groups, betas=betas, eps=eps, fused=fused or None)
        self.param_groups = self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)
        clear_grads(self.masters.of)

    def reduce_and_norm(self) -> torch.Tensor:
        reduce_gradients(self.model, self.topo)
        return global_grad_norm(self.model, self.topo)

    def step(self, clip_coef: float = 1.0) -> None:
        self.masters.attach_grads()
        scale_gradients(self.param_groups, clip_coef)
        self.inner.step()
        self.masters.publish()

    def publish(self) -> None:
        """Round the masters into the parameters (after loading a checkpoint into the masters)."""
        self.masters.publish()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class ShardedAdamW:
    """ZeRO-1 AdamW: LLM optimizer state and fp32 master weights sharded over dp x cp.

    ``param_groups`` are torch-style dicts (params, lr, weight_decay, name); the LR
    scheduler drives ``self.param_groups`` as with any optimizer. Vision parameters are
    all-reduced and stepped in full (see the module docstring).
    """

    def __init__(self, named_groups: list[dict], topo: Topology, betas=(0.9, 0.95), eps: float = 1e-8):
        self.topo = topo
        self.group = topo.group("dp", "cp")
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.vision_group = topo.group("dp", "cp", "tp")
        self.masters = MasterWeights()  # of the replicated (vision) parameters; LLM slices are masters already
        self.layouts = []  # per group: (params, numels, padded total, shard slice)
        shard_groups = []
        for g in named_groups:
            params = list(g["params"])
            vision = g["name"].split("/")[0] in VISION_MODULES
            if vision:
                shard_groups.append({**g, "params": self.masters.wrap(params)})
                self.layouts.append(None)
                continue
            dtype = torch.float32 if params[0].dtype != torch.float64 else torch.float64
            layout = self.make_layout(params, [_local(p).numel() for p in params])
            master = self.master_slice(layout, dtype, topo.device).requires_grad_(True)
            self.layouts.append(layout)
            shard_groups.append({**g, "params": [master]})
        self.inner = torch.optim.AdamW(shard_groups, betas=betas, eps=eps)
        self.param_groups = self.inner.param_groups

    def make_layout(self, params: list, numels: list[int]) -> tuple:
        """``(params, numels, padded total, slice size)``: the group's flattened TP-local
        parameters, padded to a multiple of the ranks; rank r holds ``[r * size, (r + 1) * size)``."""
        padded = math.ceil(sum(numels) / self.world) * self.world
        return (params, numels, padded, padded // self.world)

    def owned_ranges(self, layout) -> list[tuple[int, int, int]]:
        """This rank's ranges of a group's flattened parameters as ``(start, stop, position in
        its master slice)`` (checkpoints map them to parameter blocks)."""
        size = layout[3]
        return [(self.rank * size, self.rank * size + size, 0)]

    @torch.no_grad()
    def master_slice(self, layout, dtype: torch.dtype, device) -> torch.Tensor:
        """This rank's slice of a group's parameters, flattened and padded, in master precision."""
        params, _numels, padded, size = layout
        flat = torch.zeros(padded, dtype=dtype, device=device)
        local = torch.cat([_local(p).detach().reshape(-1).to(dtype) for p in params])
        flat[:local.numel()] = local
        return flat[self.rank * size:(self.rank + 1) * size].clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layout in self.layouts:
            if layout is not None:
                clear_grads(layout[0])
        clear_grads(self.masters.of)
        self.inner.zero_grad(set_to_none)

    def reduce_and_norm(self) -> torch.Tensor:
        """Reduce-scatter LLM gradients into the shards, all-reduce vision gradients;
        returns the global gradient norm (each value once)."""
        total = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        for layout, g in zip(self.layouts, self.param_groups):
            if layout is None:
                total += self.reduce_replicated(self._replicated_params(g))
                continue
            params, numels, padded, size = layout
            master = g["params"][0]
            flat = torch.zeros(padded, dtype=master.dtype, device=master.device)
            offset = 0
            for p, n in zip(params, numels):
                if grad_of(p) is not None:
                    flat[offset:offset + n] = _local(grad_of(p)).reshape(-1).to(flat.dtype)
                offset += n
            shard = torch.empty(size, dtype=flat.dtype, device=flat.device)
            if self.group is not None:
                reduce_scatter_tensor(shard, flat, group=self.group)
            else:
                shard.copy_(flat)
            master.grad = shard
            # Each shard value is counted once over dp x cp; TP-replicated values would repeat
            # over tp, so count LLM shards on every tp rank only for TP-sharded parameters.
            total += self._shard_norm_sq(params, numels, shard, size)
        if self.topo.distributed:
            dist.all_reduce(total)
        return total.sqrt()

    def reduce_replicated(self, params: list) -> torch.Tensor:
        """All-reduce the gradients of an unsharded (vision) group over its replicas; returns
        their squared norm where this rank counts them (once over all ranks)."""
        for p in params:
            if grad_of(p) is None:  # every rank must send the same buffers
                set_grad(p, zero_grad_of(p))
        grads = [grad_of(p) for p in params]
        if self.vision_group is not None:
            _all_reduce_coalesced(grads, self.vision_group)
        out = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        if self.topo.dp_rank == 0 and self.topo.cp_rank == 0 and self.topo.tp_rank == 0:
            out += sum((gr.double().pow(2).sum() for gr in grads), torch.zeros((), dtype=torch.float64))
        return out

    def _shard_norm_sq(self, params, numels, shard, size) -> torch.Tensor:
        start = self.rank * size
        return range_norm_sq(params, numels, shard, start, start + size, self.topo.tp_rank)

    def _replicated_params(self, group: dict) -> list:
        """The model parameters behind a replicated group's (master) tensors."""
        model_of = {id(m): p for p, m in self.masters.of.items()}
        return [model_of.get(id(t), t) for t in group["params"]]

    def step(self, clip_coef: float = 1.0) -> None:
        self.masters.attach_grads()
        scale_gradients(self.param_groups, clip_coef)
        self.inner.step()
        self.publish()

    def publish(self) -> None:
        """Write the (stepped or loaded) masters into the parameters: all-gather the slices."""
        self.masters.publish()
        for layout, g in zip(self.layouts, self.param_groups):
            if layout is None:
                continue
            params, numels, padded, size = layout
            master = g["params"][0]
            master.grad = None  # the step is done with this rank's gradient slice
            # gathered in the parameters' dtype (bf16 parameters: half the bytes of the fp32 masters)
            flat = torch.empty(padded, dtype=params[0].dtype, device=master.device)
            if self.group is not None:
                all_gather_tensor(flat, master.detach().to(flat.dtype), group=self.group)
            else:
                flat.copy_(master.detach())
            offset = 0
            with torch.no_grad():
                for p, n in zip(params, numels):
                    local = _local(p)
                    local.copy_(flat[offset:offset + n].view_as(local).to(local.dtype))
                    offset += n

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


__all__ = ["PlainAdamW", "ShardedAdamW", "clip_coefficient", "scale_gradients", "global_grad_norm", "reduce_gradients", "replica_group_of"]
