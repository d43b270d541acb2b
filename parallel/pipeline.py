"""Pipeline parallelism of Keye with ``torch.distributed.pipelining``.

Stage 0 holds the ViT, the projector and the token embedding (plus its share of decoder
layers); the last stage holds the final norm, the head and the loss. The decoder layers are
split into contiguous chunks, ``virtual`` chunks per rank for the interleaved schedule
(rank r holds stages r, r + pp, r + 2pp, ...).

Only activations travel through the pipe. Per-micro-batch metadata (3D positions, the
document boundaries or context-parallel plan, targets) never does: every stage of a
pipeline group holds the step's rows and derives it itself (``prepare``). Forward calls on
a stage come in micro-batch order under every schedule used here (GPipe, 1F1B,
interleaved 1F1B), so a stage finds a call's micro-batch by counting its calls. Packed
rows give every micro-batch the same activation shape, which the stages declare up front
(static shapes: no shape-inference pass).

The loss of each micro-batch is its summed token loss divided by the step's global
loss-token count, and the schedule's gradient scaling is off, so the accumulated gradient
equals the single-process gradient.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Replicate, Shard

from keyetron.data.batch import PackedBatch
from keyetron.model.keye import KeyeVLModel
from keyetron.parallel.topology import Topology
from keyetron.train.flops import FlopCounter

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class AbsentLayer(nn.Module):
    """Stands in for a decoder layer held by another stage, so layer names keep their index."""

    def forward(self, *args):
        raise RuntimeError("this decoder layer lives on another pipeline stage")


def split_layers(num_layers: int, n_stages: int, first_stage_extra: float = 0.0) -> list[list[int]]:
    """Contiguous layer chunks, balanced when stage 0 also carries ``first_stage_extra``
    layer-equivalents of work (the ViT, projector and embedding)."""
    if n_stages > num_layers:
        raise ValueError(f"{n_stages} pipeline stages need at least as many decoder layers, the model has {num_layers}")
    total = num_layers + max(first_stage_extra, 0.0)
    bounds, start = [], 0
    for s in range(n_stages):
        left_stages = n_stages - s
        if s == n_stages - 1:
            end = num_layers
        else:
            target = total * (s + 1) / n_stages - max(first_stage_extra, 0.0)
            end = min(max(round(target), start + 1), num_layers - (left_stages - 1))
        bounds.append(list(range(start, end)))
        start = end
    return bounds


def vit_layer_equivalents(model_cfg, row_tokens: int, visual_fraction: float = 0.5) -> float:
    """The ViT + projector work of a row, in LLM-decoder-layer units, when ``visual_fraction``
    of the row's tokens are visual (4 patches each, frames of 1,024 patches)."""
    counter = FlopCounter(model_cfg)
    patches = int(row_tokens * visual_fraction) * model_cfg.projector.merge_size ** 2
    frame = 1024
    frames = [frame] * (patches // frame) + ([patches % frame] if patches % frame else [])
    frames = [p - p % 4 for p in frames if p >= 4]
    vision = counter.count([], frames, 0)
    layer = counter.count([row_tokens], [], 0)
    per_layer = (layer.llm_linear + layer.llm_attention) / model_cfg.text.num_layers
    return (vision.vit + vision.projector) / per_layer if per_layer else 0.0


def prune_to_stages(model: KeyeVLModel, keep_layers: set[int], first: bool, last: bool) -> None:
    """Drop what this rank's stages do not hold; parameter names of the rest are unchanged."""
    if not first:
        model.vit = None
        model.projector = None
        model.llm.embed_tokens = None
    if not last:
        model.llm.norm = None
        model.llm.lm_head = None
    for i in range(len(model.llm.layers)):
        if i not in keep_layers:
            model.llm.layers[i] = AbsentLayer()


class KeyeStage(nn.Module):
    """One pipeline stage: a chunk of decoder layers, with the embedding on stage 0 and the
    final norm on the last stage. ``prepare(rows)`` before each schedule step."""

    def __init__(self, model: KeyeVLModel, topo: Topology, stage_index: int, n_stages: int, layers: list[int]):
        super().__init__()
        self.model, self.topo = model, topo
        self.stage_index, self.n_stages = stage_index, n_stages
        self.layer_ids = layers
        self.blocks = nn.ModuleList(model.llm.layers[i] for i in layers)
        self._contexts: list = []
        self._rows: list[PackedBatch] = []
        self._calls = 0

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def prepare(self, rows: list[PackedBatch], contexts: list) -> None:
        self._rows, self._contexts, self._calls = rows, contexts, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from keyetron.parallel.engine import embed_row  # the engine imports this module

        k = self._calls
        self._calls += 1
        assert k < len(self._contexts), "more forward calls than micro-batches: prepare() the step first"
        context = self._contexts[k]
        _plan, local, attention = context
        if self.is_first:
            x = embed_row(self.model, self._rows[k], self.topo, context).hidden
        llm = self.model.llm
        cos, sin = llm.rope(local.position_ids, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, attention)
        if self.is_last:
            x = llm.norm(x)
            x = x.to_local() if isinstance(x, DTensor) else x
        return x


class Pipeline:
    """The stages of this rank and the schedule that runs them."""

    def __init__(self, model: KeyeVLModel, topo: Topology, n_microbatches: int, local_tokens: int,
                 schedule: str = "1f1b", virtual: int = 1, layers: list[list[int]] | None = None,
                 loss_fn=None, dtype: torch.dtype = torch.float32):
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule {schedule!r} is not one of {list(SCHEDULES)}")
        if virtual > 1 and schedule != "interleaved":
            raise ValueError(f"virtual stages ({virtual}) need the 'interleaved' schedule")
        pp = topo.dims.pp
        n_stages = pp * virtual
        if n_microbatches < pp:
            raise ValueError(f"a pipeline of {pp} stages needs at least {pp} micro-batches (packed rows) per step "
                             f"and data-parallel rank, got {n_microbatches}: raise train.grad_accum")
        cfg = model.cfg
        if layers is None:
            layers = split_layers(cfg.text.num_layers, n_stages, vit_layer_equivalents(cfg, local_tokens))
        assert len(layers) == n_stages and sorted(i for c in layers for i in c) == list(range(cfg.text.num_layers))
        self.layers = layers
        mine = [topo.pp_rank + pp * v for v in range(virtual)]
        keep = {i for s in mine for i in layers[s]}
        prune_to_stages(model, keep, first=0 in mine, last=n_stages - 1 in mine)
        sp = getattr(model, "sequence_parallel", False)
        shard_tokens = local_tokens // topo.dims.tp if sp else local_tokens
        # requires_grad is part of the declared metadata: activations carry gradients back.
        example = torch.empty(shard_tokens, cfg.text.hidden_size, dtype=dtype, device=topo.device,
                              requires_grad=True)
        index = torch.zeros(1, 1, dtype=torch.long, device=topo.device)
        self.stages: list[KeyeStage] = []
        pipe_stages = []
        for s in mine:
            stage = KeyeStage(model, topo, s, n_stages, layers[s])
            self.stages.append(stage)
            # Shapes declared up front (static mode); gradients have the activations' shapes.
            pipe_stages.append(PipelineStage(stage, s, n_stages, topo.device,
                                             input_args=(index,) if s == 0 else (example,),
                                             output_args=(example,),
                                             input_grads=(None,) if s == 0 else (example,),
                                             output_grads=(example,), group=topo.group("pp")))
        self.pipe_stages = pipe_stages  # torch's stage objects (keyetron bench layouts times their chunks)
        self.local_tokens = local_tokens
        self.n_microbatches = n_microbatches
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(pipe_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)

    def run(self, rows: list[PackedBatch], contexts: list, targets: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward of all micro-batches; the last stage's per-micro-batch losses."""
        assert len(rows) == self.n_microbatches, (len(rows), self.n_microbatches)
        for stage in self.stages:
            stage.prepare(rows, contexts)
        losses: list[torch.Tensor] = []
        args = (torch.arange(len(rows), device=self.stages[0].topo.device).view(-1, 1),) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        self.schedule.step(*args, **kwargs)
        return losses


def wrap_for_loss(out: torch.Tensor, model: KeyeVLModel, topo: Topology) -> torch.Tensor:
    """The last stage's plain output as the DTensor the vocabulary-parallel loss expects."""
    if topo.dims.tp == 1:
        return out
    sp = getattr(model, "sequence_parallel", False)
    mesh = model.llm.lm_head.weight.device_mesh
    return DTensor.from_local(out, mesh, [Shard(0) if sp else Replicate()], run_check=False)


def fixed_local_tokens(row_tokens: int, topo: Topology, sequence_parallel: bool) -> int:
    """One context-parallel slice length for every micro-batch (static pipeline shapes)."""
    cp, tp = topo.dims.cp, topo.dims.tp
    multiple = tp if sequence_parallel else 1
    if cp == 1:
        return math.ceil(row_tokens / multiple) * multiple
    # room for the zigzag halves of split documents plus whole short ones: 1/8 row of slack
    base = math.ceil(row_tokens / cp) + math.ceil(row_tokens / (8 * cp))
    return math.ceil(base / multiple) * multiple


__all__ = ["AbsentLayer", "KeyeStage", "Pipeline", "SCHEDULES", "fixed_local_tokens", "prune_to_stages",
           "split_layers", "vit_layer_equivalents", "wrap_for_loss"]
