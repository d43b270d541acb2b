"""Pipeline parallelism of Keye with ``torch.distributed.pipelining``.

A stage is the model with the parts it does not hold removed (torchtitan's way): stage 0
holds the ViT, the projector and the token embedding (plus its share of decoder layers),
the last stage the final norm and the head, every stage a contiguous chunk of decoder
layers under their single-process names. ``hold_stages`` prunes a rank's model to its
stages; with several (virtual) stages per rank, each stage runs a view of that model
holding only its own layers (``stage_view``). Every stage runs ``KeyeVLModel.forward``.

Only activations travel through the pipe. The batch of each micro-batch (this rank's
``LocalRow``: 3D positions, document boundaries or context-parallel plan, targets on the
last stage) never does: every stage holds the step's rows (``Pipeline.run``). Stage 0 is
given the micro-batch index; later stages' forward calls come in micro-batch order under
every schedule used here (GPipe, 1F1B, interleaved 1F1B), so a stage finds a call's
micro-batch by counting its calls. Packed rows give every micro-batch the same activation
shape, which the stages declare up front (static shapes: no shape-inference pass).

The last stage's ``ModelOutput`` goes to the caller's loss function with the micro-batch
index; the schedule's gradient scaling is off (the caller divides by the step's global
count), so the accumulated gradient equals the single-process gradient.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from keyetron.flops import FlopCounter
from keyetron.model.keye import KeyeVLModel, ModelOutput
from keyetron.model.llm import DecoderLayers
from keyetron.parallel.config import SCHEDULES
from keyetron.parallel.topology import Topology

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


def hold_stages(model: KeyeVLModel, layers: list[list[int]], stages: list[int]) -> None:
    """Prune ``model`` in place to what ``stages`` hold (``layers``: decoder layers per stage);
    parameter names of the rest are unchanged."""
    keep = {i for s in stages for i in layers[s]}
    if 0 not in stages:
        model.vit = None
        model.projector = None
        model.llm.embed_tokens = None
    if len(layers) - 1 not in stages:
        model.llm.norm = None
        model.llm.lm_head = None
    for i in model.llm.layers.indices():
        if i not in keep:
            del model.llm.layers[i]


def stage_view(model: KeyeVLModel, layers: list[int], first: bool, last: bool) -> KeyeVLModel:
    """A model holding ``layers`` (and the embedding / the head when ``first`` / ``last``) that
    shares every module and parameter with ``model``: one stage of a rank with several."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    llm = copy.copy(model.llm)
    llm._modules = dict(model.llm._modules)
    llm.layers = DecoderLayers({i: model.llm.layers[i] for i in layers})
    if not first:
        view.vit = view.projector = None
        llm.embed_tokens = None
    if not last:
        llm.norm = llm.lm_head = None
    view.llm = llm
    return view


class StageModule(nn.Module):
    """One stage as ``PipelineStage`` runs it: the stage's model applied to the step's batches."""

    def __init__(self, model: KeyeVLModel, stage_index: int, n_stages: int):
        super().__init__()
        self.model = model
        self.stage_index, self.n_stages = stage_index, n_stages
        self.batches: list = []
        self.outputs: dict[int, ModelOutput] = {}  # last stage: micro-batch -> the model's output
        self._calls = 0

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def prepare(self, batches: list) -> None:
        self.batches, self.outputs, self._calls = batches, {}, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._calls
        self._calls += 1
        assert k < len(self.batches), "more forward calls than micro-batches: prepare() the step first"
        if self.is_first:
            assert int(x) == k, (int(x), k)  # stage 0 is given the micro-batch index
            out = self.model(self.batches[k])
        else:
            out = self.model(self.batches[k], hidden=x)
        if self.is_last:
            self.outputs[k] = out
            return out.hidden
        return out


class Pipeline:
    """The stages of this rank (its model already pruned by ``hold_stages``) and the schedule."""

    def __init__(self, model: KeyeVLModel, topo: Topology, layers: list[list[int]], n_microbatches: int,
                 activation_shape: tuple[int, int], schedule: str = "1f1b", virtual: int = 1,
                 dtype: torch.dtype = torch.float32):
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule {schedule!r} is not one of {list(SCHEDULES)}")
        pp = topo.dims.pp
        n_stages = pp * virtual
        if n_microbatches < pp:
            raise ValueError(f"a pipeline of {pp} stages needs at least {pp} micro-batches (packed rows) per step "
                             f"and data-parallel rank, got {n_microbatches}: raise train.grad_accum")
        self.layers = layers
        mine = [topo.pp_rank + pp * v for v in range(virtual)]
        # requires_grad is part of the declared metadata: activations carry gradients back.
        example = torch.empty(activation_shape, dtype=dtype, device=topo.device, requires_grad=True)
        index = torch.zeros(1, 1, dtype=torch.long, device=topo.device)
        self.stages: list[StageModule] = []
        pipe_stages = []
        for s in mine:
            view = model if virtual == 1 else stage_view(model, layers[s], s == 0, s == n_stages - 1)
            stage = StageModule(view, s, n_stages)
            self.stages.append(stage)
            # Shapes declared up front (static mode); gradients have the activations' shapes.
            pipe_stages.append(PipelineStage(stage, s, n_stages, topo.device,
                                             input_args=(index,) if s == 0 else (example,),
                                             output_args=(example,),
                                             input_grads=(None,) if s == 0 else (example,),
                                             output_grads=(example,), group=topo.group("pp")))
        self.pipe_stages = pipe_stages  # torch's stage objects (keyetron bench layouts times their chunks)
        self.n_microbatches = n_microbatches
        self.device = topo.device
        # loss_fn(last stage output, micro-batch index) -> the micro-batch's loss; set by the engine
        self.loss_fn = None

        def loss_fn(out, index):
            return self.loss_fn(out, index)

        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(pipe_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.has_first = any(s.is_first for s in self.stages)
        self.last_stage = next((s for s in self.stages if s.is_last), None)

    def run(self, batches: list) -> None:
        """Forward and backward of all micro-batches (``batches``: this rank's ``LocalRow`` of each);
        the loss function gets each last-stage output tensor and its micro-batch index."""
        assert len(batches) == self.n_microbatches, (len(batches), self.n_microbatches)
        for stage in self.stages:
            stage.prepare(batches)
        args = (torch.arange(len(batches), device=self.device).view(-1, 1),) if self.has_first else ()
        kwargs = {"target": torch.arange(len(batches), device=self.device)} if self.last_stage is not None else {}
        self.schedule.step(*args, **kwargs)


def fixed_local_tokens(row_tokens: int, topo: Topology, sequence_parallel: bool) -> int:
    """One context-parallel slice length for every micro-batch (static pipeline shapes)."""
    cp, tp = topo.dims.cp, topo.dims.tp
    multiple = tp if sequence_parallel else 1
    if cp == 1:
        return math.ceil(row_tokens / multiple) * multiple
    # room for the zigzag halves of split documents plus whole short ones: 1/8 row of slack
    base = math.ceil(row_tokens / cp) + math.ceil(row_tokens / (8 * cp))
    return math.ceil(base / multiple) * multiple


__all__ = ["Pipeline", "StageModule", "fixed_local_tokens", "hold_stages", "split_layers", "stage_view",
           "vit_layer_equivalents"]
