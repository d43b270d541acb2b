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

from keyetron.backend.device import autocast
from keyetron.data.batch import PackedBatch
from keyetron.model.keye import KeyeVLModel, LossOutput
from keyetron.parallel.context_parallel import ContextParallelAttention, plan_context_parallel
from keyetron.parallel.data_parallel import PlainAdamW, ShardedAdamW, clip_coefficient
from keyetron.parallel.fsdp import FSDPAdamW, apply_fsdp
from keyetron.parallel.pipeline import Pipeline, fixed_local_tokens, wrap_for_loss
from keyetron.parallel.tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads, vocab_parallel_loss
from keyetron.parallel.topology import Topology
from keyetron.parallel.vision import encode_vision_shared
from keyetron.parallel.zero2 import ZeRO2AdamW
from keyetron.train.recipe import OptimSection
from keyetron.train.trainer import optimizer_param_groups


@dataclass
class StepStats:
    loss: float  # mean token loss of the whole step (all ranks)
    loss_tokens: int  # global
    grad_norm: float


def parallelize_keye(model: KeyeVLModel, topo: Topology, *, sequence_parallel: bool = True) -> None:
    """Apply the topology's layout to a plain model (before building the engine's optimizer)."""
    if topo.dims.tp > 1:
        apply_tensor_parallel(model.llm, topo.submesh("tp"), sequence_parallel=sequence_parallel)
    model.sequence_parallel = sequence_parallel and topo.dims.tp > 1


def visual_index(model: KeyeVLModel, row: PackedBatch) -> torch.Tensor:
    """Per token, the index of its visual feature in ``encode_vision`` order, -1 for text."""
    ids = torch.tensor(model.visual_token_ids, device=row.input_ids.device)
    is_visual = torch.isin(row.input_ids, ids)
    return torch.where(is_visual, is_visual.long().cumsum(0) - 1, torch.full_like(row.input_ids, -1))


@dataclass
class RowInputs:
    """What the decoder layers of one rank need for one packed row."""

    hidden: torch.Tensor  # stage-0 output: this rank's token embeddings (its CP slice, its SP shard)
    position_ids: torch.Tensor  # (3, L) of this rank's CP slice (all of it, also under SP)
    attention: object  # cu_seqlens, or the context-parallel plan that attends
    targets: torch.Tensor  # (L,) of this rank's CP slice


def row_context(model: KeyeVLModel, row: PackedBatch, topo: Topology, local_len: int | None = None):
    """(plan, local text inputs, attention) of one row for this rank; no model compute.
    ``local_len`` fixes the padded slice length (static pipeline shapes)."""
    sp = getattr(model, "sequence_parallel", False)
    plan = plan_context_parallel(row.cu_seqlens, topo.dims.cp, pad_multiple=topo.dims.tp if sp else 1,
                                 local_len=local_len)
    local = plan.shard_batch(row, topo.cp_rank, pad_token_id=model.cfg.text.vocab_size - 1)
    attention = ContextParallelAttention(plan, topo.cp_rank, topo.group("cp") if topo.dims.cp > 1 else None)
    return plan, local, attention


def embed_row(model: KeyeVLModel, row: PackedBatch, topo: Topology, context=None) -> RowInputs:
    """Stage-0 work for one row: shared ViT, this rank's slice of the embeddings.

    The stage-0 TP x CP group encodes the row's images once between them
    (``encode_vision_shared``). Context parallel: each rank keeps its slice of the row's
    tokens (long documents split zigzag, short ones whole) and attends through the
    all-gather-KV plan. Tensor parallel: the slice (padded to a multiple of tp) is
    embedded vocabulary-parallel; with sequence parallelism each TP rank holds 1/tp of it.
    ``context``: the row's ``row_context`` when the caller already planned it (pipelines).
    """
    sp = getattr(model, "sequence_parallel", False)
    visual = None
    if row.has_vision:
        # With sequence parallelism every TP rank back-propagates only its own tokens' features.
        grad_group = topo.group("cp", "tp") if sp else topo.group("cp")
        visual = encode_vision_shared(model, row.pixel_values, row.vision_grid_thw, topo.group("cp", "tp"),
                                      grad_group=grad_group, owners=row.vision_owner)
    plan, local, attention = context or row_context(model, row, topo)
    vidx = plan.shard_tokens(visual_index(model, row), topo.cp_rank, pad_value=-1)
    hidden = model.llm.embed_tokens(local.input_ids)  # under sequence parallel: this TP rank's tokens
    if sp:
        n = hidden.shape[0]
        vidx = vidx[topo.tp_rank * n:(topo.tp_rank + 1) * n]
    if visual is not None:
        take = vidx >= 0
        hidden = torch.where(take[:, None], visual.to(hidden.dtype)[vidx.clamp(min=0)], hidden)
    return RowInputs(hidden, local.position_ids, attention, local.targets)


def row_loss(model: KeyeVLModel, out: torch.Tensor, targets: torch.Tensor, topo: Topology) -> LossOutput:
    """Summed loss of the final-normed hidden states (vocabulary-parallel under TP)."""
    if topo.dims.tp > 1:
        return vocab_parallel_loss(out, model.llm.lm_head, targets)
    return model.loss(out, targets)


def forward_row(model: KeyeVLModel, row: PackedBatch, topo: Topology) -> LossOutput:
    """Summed loss of this rank's part of one packed row (no pipeline parallelism)."""
    if topo.dims.cp == 1 and topo.dims.tp == 1:
        return model(row)
    inputs = embed_row(model, row, topo)
    out = model.llm.decode(inputs.hidden, inputs.position_ids, inputs.attention)
    return row_loss(model, out, inputs.targets, topo)


@dataclass
class PipelineOptions:
    row_tokens: int  # packed row length (every micro-batch has it)
    n_microbatches: int  # rows per data-parallel rank per step
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    virtual: int = 1  # stages per rank (interleaved)
    layers: list[list[int]] | None = None  # decoder layers per stage; None: balanced with the ViT on stage 0


# LLM optimizer state (zero1), + gradients (zero2), + weights (fsdp2), nothing
SHARDINGS = ("zero1", "zero2", "fsdp2", "none")


class ParallelEngine:
    def __init__(self, model: KeyeVLModel, topo: Topology, optim: OptimSection, *, sharding: str = "zero1",
                 zero1: bool = True, autocast_dtype: torch.dtype | None = None,
                 pipeline: PipelineOptions | None = None, bucket_numel: int | None = None):
        # -- sharding (FSDP2 applied here, before the optimizer sees the parameters) --------
        if sharding == "zero1" and not zero1:  # zero1=False: the older spelling of sharding="none"
            sharding = "none"
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding={sharding!r}: expected one of {SHARDINGS}")
        if sharding == "fsdp2":
            if topo.dims.pp > 1:
                raise ValueError(f"layout {topo.dims}: FSDP2 with pipeline parallelism is not supported yet; "
                                 "use sharding='zero1' (or 'none') with pipeline stages")
            apply_fsdp(model, topo)
        self.sharding = sharding
        # -- end sharding --------------------------------------------------------------------
        self.model, self.topo, self.optim_cfg = model, topo, optim
        self.autocast_dtype = autocast_dtype
        self.pipeline = None
        if topo.dims.pp > 1:
            if pipeline is None:
                raise ValueError(f"layout {topo.dims} has pipeline stages: give PipelineOptions (row length, "
                                 "micro-batches per step, schedule)")
            sp = getattr(model, "sequence_parallel", False)
            self.local_len = fixed_local_tokens(pipeline.row_tokens, topo, sp)
            dtype = next(model.parameters()).dtype
            self.pipeline = Pipeline(model, topo, pipeline.n_microbatches, self.local_len, pipeline.schedule,
                                     pipeline.virtual, pipeline.layers, loss_fn=self._micro_batch_loss,
                                     dtype=autocast_dtype or (dtype if dtype == torch.float64 else torch.float32))
        groups = optimizer_param_groups(model, optim)
        if sharding == "zero1":
            self.optimizer = ShardedAdamW(groups, topo, betas=optim.betas, eps=optim.eps)
        elif sharding == "zero2":  # bucket_numel: elements per gradient bucket (None: the default)
            self.optimizer = ZeRO2AdamW(groups, topo, betas=optim.betas, eps=optim.eps, bucket_numel=bucket_numel)
        elif sharding == "fsdp2":
            self.optimizer = FSDPAdamW(model, groups, topo, optim.betas, optim.eps)
        else:
            self.optimizer = PlainAdamW(model, groups, topo, optim.betas, optim.eps)
        self._loss_tokens = 1
        self._sums: list[torch.Tensor] = []

    def global_count(self, rows_loss_tokens: int) -> int:
        """Loss tokens of the step: this data-parallel rank's whole rows (every context-parallel
        rank of it holds the same rows), summed over the data-parallel ranks."""
        count = torch.tensor([rows_loss_tokens], dtype=torch.long)
        if self.topo.distributed and self.topo.dims.dp > 1:
            dist.all_reduce(count, group=self.topo.group("dp"))
        return int(count)

    def _micro_batch_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The pipeline's loss_fn on the last stage: summed loss / the step's global count."""
        loss = row_loss(self.model, wrap_for_loss(out, self.model, self.topo), target.reshape(-1), self.topo)
        self._sums.append(loss.loss_sum.detach().double().cpu())
        return loss.loss_sum / self._loss_tokens

    def step(self, rows: list[PackedBatch]) -> StepStats:
        """Forward and backward over this rank's rows, then one synchronised optimizer step."""
        loss_tokens = self.global_count(sum(r.num_loss_tokens for r in rows))
        self._loss_tokens = max(loss_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        rows = [r.to(self.topo.device) for r in rows]
        if self.pipeline is not None:
            self._sums = []
            contexts = [row_context(self.model, r, self.topo, self.local_len) for r in rows]
            targets = torch.stack([c[1].targets for c in contexts])
            with autocast(self.topo.device, self.autocast_dtype):
                self.pipeline.run(rows, contexts, targets)
            loss_sum += sum(self._sums, torch.zeros((), dtype=torch.float64))
        else:
            for row in rows:
                with autocast(self.topo.device, self.autocast_dtype):
                    out = forward_row(self.model, row, self.topo)
                (out.loss_sum / self._loss_tokens).backward()
                loss_sum += out.loss_sum.detach().double().cpu()
        if self.topo.dims.tp > 1:
            reduce_tp_partial_grads(self.model.llm)
        norm = self.optimizer.reduce_and_norm()
        self.optimizer.step(clip_coefficient(norm, self.optim_cfg.clip_grad))
        if self.topo.distributed:
            if self.topo.dims.pp > 1:  # only the last stage computed the loss
                dist.all_reduce(loss_sum, group=self.topo.group("pp"))
            dist.all_reduce(loss_sum, group=self.topo.group("dp", "cp"))
        return StepStats(float(loss_sum) / max(loss_tokens, 1), loss_tokens, float(norm))


__all__ = ["SHARDINGS", "ParallelEngine", "PipelineOptions", "PlainAdamW", "RowInputs", "StepStats", "embed_row",
           "forward_row", "parallelize_keye", "row_context", "row_loss", "visual_index"]
