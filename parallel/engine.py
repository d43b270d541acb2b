"""One optimizer step of a parallel layout, equal to the single-process step.

The engine owns the pieces the layouts share: the loss normalised by the step's global
loss-token count, gradient reduction over each parameter's replica group, clipping by the
true global norm, and the (optionally ZeRO-1 sharded) AdamW update. Layout-specific
pieces (tensor, context and pipeline parallelism) are applied to the model from outside
and plug in here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from keyetron.backend.device import autocast
from keyetron.data.batch import PackedBatch
from keyetron.model.keye import LossOutput
from keyetron.parallel.context_parallel import ContextParallelAttention, plan_context_parallel
from keyetron.parallel.data_parallel import ShardedAdamW, clip_coefficient, global_grad_norm, reduce_gradients
from keyetron.parallel.topology import Topology
from keyetron.parallel.vision import encode_vision_shared
from keyetron.train.recipe import OptimSection
from keyetron.train.trainer import optimizer_param_groups


@dataclass
class StepStats:
    loss: float  # mean token loss of the whole step (all ranks)
    loss_tokens: int  # global
    grad_norm: float


class PlainAdamW:
    """Unsharded AdamW behind the same interface as ``ShardedAdamW``."""

    def __init__(self, model: nn.Module, named_groups: list[dict], topo: Topology, betas, eps):
        self.model, self.topo = model, topo
        self.inner = torch.optim.AdamW(named_groups, betas=betas, eps=eps)
        self.param_groups = self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def reduce_and_norm(self) -> torch.Tensor:
        reduce_gradients(self.model, self.topo)
        return global_grad_norm(self.model, self.topo)

    def step(self, clip_coef: float = 1.0) -> None:
        if clip_coef != 1.0:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(clip_coef)
        self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def forward_row(model: nn.Module, row: PackedBatch, topo: Topology) -> LossOutput:
    """Summed loss of this rank's part of one packed row under the topology's layout.

    Context parallel: the TP x CP group encodes the row's images once between them
    (``encode_vision_shared``), every rank embeds the whole row, keeps its context-parallel
    slice of tokens (long documents split zigzag, short ones whole) and attends through the
    all-gather-KV plan.
    """
    if topo.dims.cp == 1:
        return model(row)
    visual = None
    if row.has_vision:
        visual = encode_vision_shared(model, row.pixel_values, row.vision_grid_thw, topo.group("cp", "tp"),
                                      grad_group=topo.group("cp"))
    hidden = model.embed(row, visual)
    plan = plan_context_parallel(row.cu_seqlens, topo.dims.cp)
    local = plan.shard_batch(row, topo.cp_rank)
    attention = ContextParallelAttention(plan, topo.cp_rank, topo.group("cp"))
    out = model.llm.decode(plan.shard_tokens(hidden, topo.cp_rank), local.position_ids, attention)
    return model.loss(out, local.targets)


class ParallelEngine:
    def __init__(self, model: nn.Module, topo: Topology, optim: OptimSection, *, zero1: bool = True,
                 autocast_dtype: torch.dtype | None = None):
        self.model, self.topo, self.optim_cfg = model, topo, optim
        self.autocast_dtype = autocast_dtype
        groups = optimizer_param_groups(model, optim)
        if zero1:
            self.optimizer = ShardedAdamW(groups, topo, betas=optim.betas, eps=optim.eps)
        else:
            self.optimizer = PlainAdamW(model, groups, topo, optim.betas, optim.eps)

    def global_count(self, rows_loss_tokens: int) -> int:
        """Loss tokens of the step: this data-parallel rank's whole rows (every context-parallel
        rank of it holds the same rows), summed over the data-parallel ranks."""
        count = torch.tensor([rows_loss_tokens], dtype=torch.long)
        if self.topo.distributed and self.topo.dims.dp > 1:
            dist.all_reduce(count, group=self.topo.group("dp"))
        return int(count)

    def step(self, rows: list[PackedBatch]) -> StepStats:
        """Forward and backward over this rank's rows, then one synchronised optimizer step."""
        loss_tokens = self.global_count(sum(r.num_loss_tokens for r in rows))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for row in rows:
            with autocast(self.topo.device, self.autocast_dtype):
                out = forward_row(self.model, row.to(self.topo.device), self.topo)
            (out.loss_sum / max(loss_tokens, 1)).backward()
            loss_sum += out.loss_sum.detach().double().cpu()
        norm = self.optimizer.reduce_and_norm()
        self.optimizer.step(clip_coefficient(norm, self.optim_cfg.clip_grad))
        if self.topo.distributed:
            dist.all_reduce(loss_sum, group=self.topo.group("dp", "cp"))
        return StepStats(float(loss_sum) / max(loss_tokens, 1), loss_tokens, float(norm))


__all__ = ["ParallelEngine", "PlainAdamW", "StepStats", "forward_row"]
