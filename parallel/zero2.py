"""ZeRO-2: ZeRO-1 plus sharded gradients, reduced bucket by bucket as backward produces them.

ZeRO-1 (``ShardedAdamW``) keeps every LLM gradient in full on every rank until the end of
the step's last micro-batch, then reduce-scatters it. ZeRO-2 (``ZeRO2AdamW``) never holds
the full gradient across micro-batches: each optimizer group's parameters are cut into
buckets of whole parameters (``bucket_numel`` elements or more, in parameter order), and a
post-accumulate-grad hook on every LLM parameter notes when its gradient is ready. When a
bucket's last gradient of a backward arrives, the bucket is flattened, reduce-scattered
over dp x cp, added to this rank's gradient slice (master precision, summed over the
step's micro-batches) and the parameters' ``.grad`` are freed. So a rank holds its 1/N
gradient slices plus, transiently, the full gradients of the buckets still being filled
(``peak_unreduced_numel`` records the most it ever held). Pipelines need nothing special:
the hooks fire inside ``Pipeline.run`` as each micro-batch's backward reaches a parameter.

Each bucket is sharded on its own (padded to a multiple of the ranks): rank r's master
slice of a group is the concatenation of its slice of every bucket, and ``owned_ranges``
tells checkpoints which ranges of the group's flat parameters that is, so the checkpoint
holds the same per-parameter logical state as under ZeRO-1 and loads under any layout.

Tensor parallelism: a replicated weight that each TP rank applies to its own tokens (norms,
replicated KV projections) gets a ``Partial`` gradient; it is summed over tp when its
bucket is reduced (one coalesced all-reduce per bucket that has such gradients).

Every LLM parameter of a stage must receive its gradient in every backward on every rank
(true of the dense decoder): a bucket completed on one rank and not on another would
leave their collectives unmatched. Buckets left incomplete on all ranks alike (a
parameter without gradient) are reduced at the end of the step, after a one-flag-per-
bucket agreement. Vision parameters stay replicated and all-reduced as under ZeRO-1.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from keyetron.backend.collectives import all_gather_tensor, reduce_scatter_tensor
from keyetron.parallel.data_parallel import ShardedAdamW, _all_reduce_coalesced, _local, range_norm_sq
from keyetron.parallel.mixed_precision import grad_of, set_grad
from keyetron.parallel.topology import Topology

DEFAULT_BUCKET_NUMEL = 40_000_000  # elements per gradient bucket (Megatron's default size)


@dataclass(frozen=True)
class Bucket:
    first: int  # parameter indices [first, stop) of the group
    stop: int
    start: int  # offset of its first element in the group's flattened parameters
    numel: int  # its elements (unpadded)
    size: int  # each rank's slice: numel padded to a multiple of the ranks, divided by them
    at: int  # where this rank's slice starts in its master slice


def split_buckets(numels: list[int], world: int, bucket_numel: int) -> list[Bucket]:
    """Contiguous runs of whole parameters of at least ``bucket_numel`` elements (the last may be smaller)."""
    buckets, first, start, at, run = [], 0, 0, 0, 0
    for i, n in enumerate(numels):
        run += n
        if run >= bucket_numel or i == len(numels) - 1:
            size = math.ceil(run / world)
            buckets.append(Bucket(first, i + 1, start, run, size, at))
            first, start, at, run = i + 1, start + run, at + size, 0
    return buckets


class BucketedLayout(tuple):
    """ZeRO-1's ``(params, numels, padded, size)`` of a group, ``size`` being the length of
    this rank's master slice, plus ``buckets``."""

    buckets: list[Bucket]

    def __new__(cls, params: list, numels: list[int], buckets: list[Bucket], world: int):
        size = sum(b.size for b in buckets)
        layout = super().__new__(cls, (params, numels, size * world, size))
        layout.buckets = buckets
        return layout


def _is_partial(grad) -> bool:
    return isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements)


class ZeRO2AdamW(ShardedAdamW):
    """ZeRO-2 AdamW: LLM gradients, optimizer state and fp32 master weights sharded over dp x cp.

    The interface and the optimizer state are ``ShardedAdamW``'s; only where the gradient
    lives differs (see the module docstring). Build it before the step's first backward.
    """

    def __init__(self, named_groups: list[dict], topo: Topology, betas=(0.9, 0.95), eps: float = 1e-8,
                 bucket_numel: int | None = None):
        self.bucket_numel = bucket_numel or DEFAULT_BUCKET_NUMEL
        super().__init__(named_groups, topo, betas=betas, eps=eps)
        self.tp_group = topo.group("tp") if topo.dims.tp > 1 else None
        self.stage_group = topo.group("dp", "cp", "tp")  # every rank holding this stage's LLM parameters
        self._grads: list[torch.Tensor | None] = [None] * len(self.layouts)  # per group: this rank's summed slice
        self._ready: dict[tuple[int, int], dict[int, int]] = {}  # (group, bucket) -> {param index: numel}
        self.unreduced_numel = 0  # gradient elements held in full now, waiting for their bucket
        self.peak_unreduced_numel = 0
        self._hooks = []
        for gi, layout in enumerate(self.layouts):
            if layout is None:
                continue
            for bi, b in enumerate(layout.buckets):
                for pi in range(b.first, b.stop):
                    hook = functools.partial(self._on_grad_ready, gi, bi, pi)
                    self._hooks.append(layout[0][pi].register_post_accumulate_grad_hook(hook))

    # -- layout ------------------------------------------------------------------------------
    def make_layout(self, params: list, numels: list[int]) -> BucketedLayout:
        return BucketedLayout(params, numels, split_buckets(numels, self.world, self.bucket_numel), self.world)

    def owned_ranges(self, layout: BucketedLayout) -> list[tuple[int, int, int]]:
        out = []
        for b in layout.buckets:
            lo, hi = self.rank * b.size, min((self.rank + 1) * b.size, b.numel)
            if lo < hi:
                out.append((b.start + lo, b.start + hi, b.at))
        return out

    @torch.no_grad()
    def master_slice(self, layout: BucketedLayout, dtype: torch.dtype, device) -> torch.Tensor:
        params, parts = layout[0], []
        for b in layout.buckets:
            flat = torch.zeros(b.size * self.world, dtype=dtype, device=device)
            local = torch.cat([_local(p).detach().reshape(-1).to(dtype) for p in params[b.first:b.stop]])
            flat[:b.numel] = local
            parts.append(flat[self.rank * b.size:(self.rank + 1) * b.size])
        return torch.cat(parts).clone()

    # -- gradients -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._grads = [None] * len(self.layouts)
        self._ready.clear()
        self.unreduced_numel = 0

    def _on_grad_ready(self, gi: int, bi: int, pi: int, p: torch.Tensor) -> None:
        ready = self._ready.setdefault((gi, bi), {})
        if pi not in ready:
            ready[pi] = _local(p).numel()
            self.unreduced_numel += ready[pi]
            self.peak_unreduced_numel = max(self.peak_unreduced_numel, self.unreduced_numel)
        b = self.layouts[gi].buckets[bi]
        if len(ready) == b.stop - b.first:
            self._reduce_bucket(gi, bi)

    @torch.no_grad()
    def _reduce_bucket(self, gi: int, bi: int) -> None:
        """Sum bucket ``bi`` of group ``gi`` into this rank's gradient slice and free its ``.grad``."""
        layout = self.layouts[gi]
        b = layout.buckets[bi]
        params, numels = layout[0][b.first:b.stop], layout[1][b.first:b.stop]
        master = self.param_groups[gi]["params"][0]
        partial = [_local(grad_of(p)) for p in params if _is_partial(grad_of(p))]
        if partial and self.tp_group is not None:
            _all_reduce_coalesced(partial, self.tp_group)  # in place: the local tensors are views
        flat = torch.zeros(b.size * self.world, dtype=master.dtype, device=master.device)
        offset = 0
        for p, n in zip(params, numels):
            if grad_of(p) is not None:
                flat[offset:offset + n] = _local(grad_of(p)).reshape(-1).to(flat.dtype)
                set_grad(p, None)
            offset += n
        if self.group is not None:
            shard = torch.empty(b.size, dtype=flat.dtype, device=flat.device)
            reduce_scatter_tensor(shard, flat, group=self.group)
        else:
            shard = flat
        if self._grads[gi] is None:
            self._grads[gi] = torch.zeros_like(master)
        self._grads[gi][b.at:b.at + b.size] += shard
        self.unreduced_numel -= sum(self._ready.pop((gi, bi), {}).values())

    def _reduce_waiting_buckets(self) -> None:
        """Reduce the buckets still waiting for a gradient on any rank of this stage (all ranks alike)."""
        keys = [(gi, bi) for gi, layout in enumerate(self.layouts) if layout is not None
                for bi in range(len(layout.buckets))]
        waiting = torch.tensor([int(bool(self._ready.get(k))) for k in keys], dtype=torch.int32)
        if self.stage_group is not None and keys:
            waiting = waiting.to(self.topo.device)
            dist.all_reduce(waiting, op=dist.ReduceOp.MAX, group=self.stage_group)
        for key, w in zip(keys, waiting.tolist()):
            if w:
                self._reduce_bucket(*key)

    def reduce_and_norm(self) -> torch.Tensor:
        """Finish the gradient slices, all-reduce vision gradients; returns the global gradient
        norm (each value once)."""
        self._reduce_waiting_buckets()
        total = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        for gi, (layout, g) in enumerate(zip(self.layouts, self.param_groups)):
            if layout is None:
                total += self.reduce_replicated(self._replicated_params(g))
                continue
            master = g["params"][0]
            master.grad = self._grads[gi] if self._grads[gi] is not None else torch.zeros_like(master)
            total += self._slice_norm_sq(layout, master.grad)
        if self.topo.distributed:
            dist.all_reduce(total)
        return total.sqrt()

    def _slice_norm_sq(self, layout: BucketedLayout, grad: torch.Tensor) -> torch.Tensor:
        """Squared norm of the values this rank counts: its slices (each value lives on one dp x cp
        rank), of TP-replicated parameters on TP rank 0 only."""
        out = torch.zeros((), dtype=torch.float64, device=grad.device)
        for start, stop, at in self.owned_ranges(layout):
            out += range_norm_sq(layout[0], layout[1], grad[at:at + stop - start], start, stop, self.topo.tp_rank)
        return out

    # -- update ----------------------------------------------------------------------------------
    def publish(self) -> None:
        """Write the masters into the parameters, one bucket at a time."""
        self.masters.publish()
        for layout, g in zip(self.layouts, self.param_groups):
            if layout is None:
                continue
            g["params"][0].grad = None  # the step is done with this rank's gradient slices
            master = g["params"][0].detach()
            dtype = layout[0][0].dtype  # gathered in the parameters' dtype
            for b in layout.buckets:  # one bucket at a time: never the whole group in full
                flat = torch.empty(b.size * self.world, dtype=dtype, device=master.device)
                if self.group is not None:
                    all_gather_tensor(flat, master[b.at:b.at + b.size].to(dtype), group=self.group)
                else:
                    flat.copy_(master[b.at:b.at + b.size])
                offset = 0
                with torch.no_grad():
                    for p, n in zip(layout[0][b.first:b.stop], layout[1][b.first:b.stop]):
                        local = _local(p)
                        local.copy_(flat[offset:offset + n].view_as(local).to(local.dtype))
                        offset += n

    def gradient_slice_numel(self) -> int:
        """Elements of this rank's LLM gradient slices (about 1/(dp x cp) of its stage's LLM)."""
        return sum(g.numel() for g in self._grads if g is not None)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


__all__ = ["Bucket", "BucketedLayout", "DEFAULT_BUCKET_NUMEL", "ZeRO2AdamW", "split_buckets"]
