"""``parallelize_keye``: install a layout on a plain Keye model, from outside, in one place.

The model (``keyetron.model``) knows nothing about ranks. Given the topology and the
recipe's ``parallel`` section, this function, in order:

1. **pipeline split**: prunes the model to this rank's stages (``hold_stages``; decoder
   layers balanced with the ViT counted on stage 0, or ``stage_layers``);
2. **tensor / sequence parallelism**: shards the LLM's modules with DTensor
   (``apply_tensor_parallel``: column/row-parallel projections, vocabulary-parallel
   embedding and head, the sequence scattered after the embedding and gathered after the
   final norm);
3. **context parallelism**: swaps the attention core of the LLM's attention modules for one
   that attends over the whole row from this rank's slice (``apply_context_parallel``) and
   lets sequence-level objectives sum a document over the ranks holding its pieces;
4. **ViT sharing**: with several ranks sharing a row (cp x tp > 1), each image and frame is
   encoded once among them (``SharedVisionEncoder`` as the model's ``vision_encoder``);
5. **activation checkpointing** of the chosen modules' blocks;
6. **FSDP2** of the LLM when ``sharding: fsdp2`` (ZeRO-1/2 are optimizers: the engine);
7. **pipeline stages and schedule** over the pruned model.

It returns a ``ParallelKeye``: the rank's model, the ``RowSlicer`` that makes the batch this
rank's model sees from a packed row, and the pipeline. ``ParallelEngine`` steps it with any
objective. In one process (``Topology.single()``) only activation checkpointing applies.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_fn

from keyetron.model.keye import KeyeVLModel, ModelOutput, set_activation_checkpointing
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.context_parallel import apply_context_parallel
from keyetron.parallel.fsdp import apply_fsdp
from keyetron.parallel.local_rows import LocalRow, RowSlicer
from keyetron.parallel.mixed_precision import cast_model
from keyetron.parallel.pipeline import Pipeline, fixed_local_tokens, hold_stages, split_layers, vit_layer_equivalents
from keyetron.parallel.tensor_parallel import apply_tensor_parallel
from keyetron.parallel.topology import Topology
from keyetron.parallel.vision import SharedVisionEncoder


@dataclass
class ParallelKeye:
    """A model with a layout installed: what ``ParallelEngine`` steps."""

    model: KeyeVLModel  # this rank's part (its pipeline stages), sharded
    topo: Topology
    cfg: ParallelConfig
    slicer: RowSlicer  # a packed row -> the batch this rank's model sees
    pipeline: Pipeline | None = None


def parallelize_keye(model: KeyeVLModel, topo: Topology, cfg: ParallelConfig | None = None, *,
                     row_tokens: int | None = None, micro_batches: int = 1,
                     activation_checkpointing: Iterable[str] = (),
                     param_dtype: torch.dtype | None = None, fp8: bool = False,
                     compile: bool = False) -> ParallelKeye:
    """Install ``cfg``'s layout for ``topo`` on ``model`` (in place; see the module docstring).

    Every rank must build the same model first (same seed or checkpoint). ``row_tokens`` (the
    packed row length) and ``micro_batches`` (rows per data-parallel rank and step) size the
    pipeline's static activations and schedule; only pipelines need them. ``param_dtype``
    (bf16: ``train.precision: bf16``) stores the parameters in that dtype; under FSDP2 the
    LLM's shards stay fp32 and are gathered in ``param_dtype`` (``keyetron.parallel.mixed_precision``).
    ``fp8`` swaps the LLM decoder's linears for FP8 ones before tensor parallelism shards them;
    ``compile`` compiles every transformer block after activation checkpointing, before FSDP2
    (``keyetron.backend.fp8`` / ``keyetron.backend.compile``: torchtitan's order)."""
    cfg = cfg or ParallelConfig()
    dims = topo.dims
    sp = cfg.sequence_parallel and dims.tp > 1
    if cfg.sharding == "fsdp2" and dims.pp > 1:
        raise ValueError(f"layout {dims}: FSDP2 with pipeline parallelism is not supported yet; "
                         "use parallel.sharding: zero1, zero2 or none with pipeline stages")
    checkpointed = set(activation_checkpointing)
    bad = sorted(checkpointed - {"vit", "llm"})
    if bad:
        raise ValueError(f"activation checkpointing: unknown module(s) {bad}; use vit and/or llm")

    # 1. pipeline split
    local_len, layers = None, None
    if dims.pp > 1:
        if row_tokens is None:
            raise ValueError(f"layout {dims} has pipeline stages: give the packed row length (static activation "
                             "shapes) and the micro-batches per step")
        local_len = fixed_local_tokens(row_tokens, topo, sp)
        n_stages = dims.pp * cfg.virtual_stages
        text = model.cfg.text
        layers = cfg.stage_layers or split_layers(text.num_layers, n_stages,
                                                  vit_layer_equivalents(model.cfg, local_len))
        if len(layers) != n_stages or sorted(i for c in layers for i in c) != list(range(text.num_layers)):
            raise ValueError(f"parallel.stage_layers {layers}: give {n_stages} lists of decoder layers that together "
                             f"hold 0..{text.num_layers - 1} once")
        hold_stages(model, layers, [topo.pp_rank + dims.pp * v for v in range(cfg.virtual_stages)])
    fsdp = cfg.sharding == "fsdp2" and topo.distributed
    if param_dtype is not None:
        cast_model(model, param_dtype, skip=("llm",) if fsdp else ())
    dtype = param_dtype or next(model.parameters()).dtype
    if fp8 and model.llm is not None:
        from keyetron.backend.fp8 import convert_llm_to_fp8

        # rows of any length: the weight gradient's inner dimension is the token count
        convert_llm_to_fp8(model, pad_inner_dim=True)

    # 2. tensor (and sequence) parallelism
    if dims.tp > 1:
        apply_tensor_parallel(model.llm, topo.submesh("tp"), sequence_parallel=sp)

    # 3. context parallelism; documents of the row (context-parallel pieces) for the objectives
    if dims.cp > 1:
        apply_context_parallel(model.llm)
    if dims.cp > 1 or dims.tp > 1 or dims.pp > 1:
        model.register_forward_hook(functools.partial(_row_documents, group=topo.group("cp") if dims.cp > 1 else None))

    # 4. the ViT shared by the ranks of a row
    if dims.cp * dims.tp > 1 and model.vit is not None:
        model.vision_encoder = SharedVisionEncoder(topo.group("cp", "tp"), topo.group("cp") if dims.cp > 1 else None)

    # 5. activation checkpointing
    set_activation_checkpointing(model, vit="vit" in checkpointed, llm="llm" in checkpointed)

    if compile:
        from keyetron.backend.compile import compile_blocks

        compile_blocks(model)

    # 6. FSDP2
    if fsdp:
        apply_fsdp(model, topo, param_dtype)

    # 7. pipeline stages and schedule
    pipeline = None
    if dims.pp > 1:
        shard = local_len // dims.tp if sp else local_len
        pipeline = Pipeline(model, topo, layers, micro_batches, (shard, model.cfg.text.hidden_size), cfg.schedule,
                            cfg.virtual_stages, dtype=dtype)
    slicer = RowSlicer(topo, sequence_parallel=sp, visual_token_ids=model.visual_token_ids,
                       pad_token_id=model.cfg.text.vocab_size - 1, local_len=local_len)
    return ParallelKeye(model, topo, cfg, slicer, pipeline)


def _row_documents(model, args, output, group) -> None:
    """Forward hook: the output's documents are the whole row's (a ``LocalRow``'s segments are
    pieces of them), summed over the context-parallel ranks and counted on one of them."""
    if not isinstance(output, ModelOutput) or output.hidden is None:
        return
    batch = args[0]
    assert isinstance(batch, LocalRow), type(batch)
    output.documents = batch.segment_documents.to(output.documents.device)[output.documents]
    output.num_documents = batch.row_documents
    output.counted = batch.counted.to(output.documents.device)
    if group is not None:
        output.reduce_documents = functools.partial(_sum_over, group=group)


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    # forward: the sum over the group; backward: every rank's gradient reaches every rank's pieces
    return dist_fn.all_reduce(t, group=group)


__all__ = ["ParallelKeye", "parallelize_keye"]
