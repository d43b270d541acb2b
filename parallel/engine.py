"""One optimizer step, the same under every layout and in one process.

``ParallelEngine`` steps a ``ParallelKeye`` (a model with its layout installed) with any
objective (``keyetron.objectives``). For the rows of a step (this data-parallel rank's
packed rows, one per micro-batch):

1. the objective's units of every whole row are counted and summed over the data-parallel
   ranks: the step's global count;
2. each row becomes the batch this rank's model sees (``RowSlicer``), the model runs its
   one forward (through the pipeline schedule when there are stages), the objective turns
   the output into a summed loss, and ``loss / global count`` is backpropagated;
3. gradients are reduced over each parameter's replica group, clipped by the true global
   norm, and AdamW (plain, ZeRO-1, ZeRO-2 or over FSDP2's shards) updates the parameters.
   A non-finite norm skips the update on every rank alike.

So the step equals the single-process step over the union of the ranks' rows in every
layout. The objective's own parameters (a text tower, a value head) are trained with the
model's; they are replicated over the data- and context-parallel ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from keyetron.backend.device import autocast
from keyetron.batch import PackedBatch
from keyetron.objectives.base import Objective
from keyetron.optim import OptimSection, param_groups
from keyetron.parallel.data_parallel import PlainAdamW, ShardedAdamW, clip_coefficient
from keyetron.parallel.fsdp import FSDPAdamW
from keyetron.parallel.mixed_precision import grad_of, install_main_grads
from keyetron.parallel.parallelize import ParallelKeye
from keyetron.parallel.tensor_parallel import reduce_tp_partial_grads
from keyetron.parallel.zero2 import ZeRO2AdamW


@dataclass
class StepStats:
    loss: float  # mean loss per unit of the whole step (all ranks)
    count: int  # the step's global count of the objective's units
    grad_norm: float
    skipped: bool = False  # the gradient norm was not finite: no update
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's extras, per unit


def trained_modules(model: nn.Module, objective: nn.Module) -> nn.Module:
    """One module whose parameters are the model's and the objective's, under their own names
    (``vit.*``, ``llm.*``, ``text_tower.*``, ...): what the optimizer, gradient reduction and
    checkpoints walk. The objective's parameters live where the model's output is made: on a
    pipeline's earlier stages (no head) they are not trained or saved."""
    box = nn.Module()
    makes_output = getattr(model, "llm", None) is None or model.llm.lm_head is not None
    children = list(model.named_children()) + (list(objective.named_children()) if makes_output else [])
    for name, child in children:
        if name in box._modules:
            raise ValueError(f"the objective's {name!r} has the name of a model part")
        box.add_module(name, child)
    for name, p in objective.named_parameters(recurse=False) if makes_output else ():
        box.register_parameter(name, p)
    return box


class ParallelEngine:
    def __init__(self, par: ParallelKeye, objective: Objective, optim: OptimSection, *,
                 groups: list[dict] | None = None, autocast_dtype: torch.dtype | None = None,
                 bucket_numel: int | None = None):
        """``groups``: the AdamW parameter groups (default: per part and decay, ``optim.lr_scale``);
        ``bucket_numel``: elements per ZeRO-2 gradient bucket."""
        self.par, self.model, self.topo, self.objective = par, par.model, par.topo, objective
        self.optim_cfg, self.autocast_dtype = optim, autocast_dtype
        self.modules = trained_modules(self.model, objective)
        # bf16 weights (``parallelize_keye(param_dtype=...)``): fp32 main gradients, installed
        # before the optimizer's own gradient hooks (ZeRO-2) so that those see the fp32 sums.
        self._main_grad_hooks = install_main_grads(self.modules)
        groups = groups if groups is not None else param_groups(self.modules.named_parameters(), optim)
        sharding = par.cfg.sharding if self.topo.distributed else "none"
        if sharding == "zero1":
            self.optimizer = ShardedAdamW(groups, self.topo, betas=optim.betas, eps=optim.eps)
        elif sharding == "zero2":
            self.optimizer = ZeRO2AdamW(groups, self.topo, betas=optim.betas, eps=optim.eps, bucket_numel=bucket_numel)
        elif sharding == "fsdp2":
            self.optimizer = FSDPAdamW(self.modules, groups, self.topo, optim.betas, optim.eps)
        else:
            self.optimizer = PlainAdamW(self.modules, groups, self.topo, optim.betas, optim.eps)
        self.sharding = sharding
        if par.pipeline is not None:
            par.pipeline.loss_fn = self._pipeline_loss
        self._count = 1
        self._sums: list[torch.Tensor] = []

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now for the trained parameters, their gradients and the optimizer
        (masters, moments, gradient slices), each storage counted once: what ``keyetron plan`` predicts."""
        seen: set[int] = set()

        def size(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            t = t.to_local() if hasattr(t, "to_local") else t
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()

        params = list(self.modules.parameters())
        inner = self.optimizer.inner
        weights = sum(size(p) for p in params)
        grads = sum(size(grad_of(p)) for p in params)
        optimizer = sum(size(t) for g in inner.param_groups for t in g["params"])
        optimizer += sum(size(t.grad) for g in inner.param_groups for t in g["params"])
        optimizer += sum(size(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        return {"weights": weights, "grads": grads, "optimizer": optimizer}

    def global_count(self, rows: list[PackedBatch]) -> int:
        """The objective's units of this data-parallel rank's whole rows (its context, tensor and
        pipeline ranks hold the same rows), summed over the data-parallel ranks."""
        mine = sum(self.objective.count(r) for r in rows)
        counts = torch.tensor([mine, int(mine == 0)], dtype=torch.long, device=self.topo.device)
        if self.topo.distributed and self.topo.dims.dp > 1:
            dist.all_reduce(counts, group=self.topo.group("dp"))
        if counts[1] and getattr(self.objective, "collective", False):  # every rank stops here together
            raise RuntimeError(f"{int(counts[1])} data-parallel rank(s) have no {self.objective.unit} in this step "
                               "(see the skipped samples in the log); the objective needs every rank's; check "
                               "data.sources")
        return int(counts[0])

    def _loss(self, output, batch) -> torch.Tensor:
        """The objective on one micro-batch: its summed loss over the step's global count (recorded)."""
        loss = self.objective(output, batch)
        values = [loss.loss_sum, *(loss.metrics[k] for k in self.objective.metric_names)]
        self._sums.append(torch.stack([torch.as_tensor(v).detach().double().cpu() for v in values]))
        return loss.loss_sum / self._count

    def _pipeline_loss(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        stage = self.par.pipeline.last_stage
        k = int(index)
        output = stage.outputs.pop(k)
        assert output.hidden is out
        return self._loss(output, stage.batches[k])

    def forward_backward(self, rows: list[PackedBatch]) -> tuple[int, torch.Tensor]:
        """Gradients of this rank's rows (each divided by the step's global count; no optimizer
        update): the step's global count, and this rank's summed loss and metrics."""
        count = self.global_count(rows)
        self._count = max(count, 1)
        self._sums = []
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self.par.slicer(r) for r in rows]
        if self.par.pipeline is not None:
            with autocast(self.topo.device, self.autocast_dtype):
                self.par.pipeline.run(batches)
        else:
            for batch in batches:
                with autocast(self.topo.device, self.autocast_dtype):
                    loss = self._loss(self.model(batch), batch)
                loss.backward()
        width = 1 + len(self.objective.metric_names)
        return count, torch.stack(self._sums).sum(0) if self._sums else torch.zeros(width, dtype=torch.float64)

    def step(self, rows: list[PackedBatch]) -> StepStats:
        """Forward and backward over this rank's rows, then one synchronised optimizer step."""
        count, sums = self.forward_backward(rows)
        if self.topo.dims.tp > 1 and self.model.llm is not None:
            reduce_tp_partial_grads(self.model.llm)
        norm = self.optimizer.reduce_and_norm()
        skipped = not math.isfinite(float(norm))
        if not skipped:
            self.optimizer.step(clip_coefficient(norm, self.optim_cfg.clip_grad))
        names = self.objective.metric_names
        if self.topo.distributed:
            sums = sums.to(self.topo.device)
            if self.topo.dims.pp > 1:  # only the last stage computed the loss
                dist.all_reduce(sums, group=self.topo.group("pp"))
            dist.all_reduce(sums, group=self.topo.group("dp", "cp"))  # TP ranks hold the same loss: not summed
        values = (sums.cpu() / max(count, 1)).tolist()
        return StepStats(values[0], count, float(norm), skipped, dict(zip(names, values[1:])))


__all__ = ["ParallelEngine", "StepStats", "trained_modules"]
