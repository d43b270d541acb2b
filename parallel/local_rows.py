"""The batch each rank's model sees: its slice of a packed row, prepared outside the model.

A data-parallel rank's micro-batch is one packed row, shared by its context- and
tensor-parallel ranks (and its pipeline stages). ``RowSlicer`` turns the row into this
rank's ``LocalRow``:

- **tokens**: the rank's context-parallel slice (``plan_context_parallel``: long documents
  zigzag-split, short ones whole), padded to one length on every rank (a multiple of tp
  under sequence parallelism; a fixed length under pipeline parallelism, whose
  activations need static shapes). Padding is a last segment with IGNORE_INDEX targets.
  Positions and targets come with the tokens; ``cu_seqlens`` are the local segments.
- **attention**: under context parallelism, the ``ContextParallelAttention`` that tells the
  installed attention core where each local query's keys are.
- **vision**: the row's grids (all items), the pixels this rank holds (all of them, or its
  own under topology-aware loading, with ``vision_owner`` saying who holds which), and for
  each visual pad token of the slice the index of its feature among the row's
  (``visual_features``), so the shared ViT (``keyetron.parallel.vision``) hands every rank
  exactly the features its tokens need.
- **documents**: which row document each local segment belongs to and which documents this
  rank counts once (sequence-level objectives; see ``keyetron.objectives.base``).

In one process, or with data parallelism alone, the row is the batch: nothing is sliced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from keyetron.batch import PackedBatch
from keyetron.parallel.context_parallel import ContextParallelAttention, plan_context_parallel
from keyetron.parallel.topology import Topology


@dataclass
class LocalRow(PackedBatch):
    """One rank's slice of a packed row (see the module docstring); a ``PackedBatch`` to the model."""

    attention: ContextParallelAttention | None = None  # cp > 1: where this rank's queries find their keys
    vision_owner: torch.Tensor | None = None  # (items,) rank of the row group holding each item's pixels
    visual_features: torch.Tensor | None = None  # (visual pads here,) feature index in the row; None: all, in order
    segment_documents: torch.Tensor | None = None  # (segments,) the row document of each local segment
    row_documents: int = 0  # documents of the whole row
    counted: torch.Tensor | None = None  # (row_documents,) bool: documents this rank counts once


def visual_index(input_ids: torch.Tensor, visual_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Per token, the index of its visual feature in the row's item order, -1 for text."""
    is_visual = torch.isin(input_ids, torch.tensor(visual_token_ids, device=input_ids.device))
    return torch.where(is_visual, is_visual.long().cumsum(0) - 1, torch.full_like(input_ids, -1))


class RowSlicer:
    """This rank's ``LocalRow`` of each packed row (the module docstring), for one layout."""

    def __init__(self, topo: Topology, *, sequence_parallel: bool, visual_token_ids: tuple[int, ...],
                 pad_token_id: int, local_len: int | None = None):
        dims = topo.dims
        self.topo = topo
        self.slices = dims.cp > 1 or dims.tp > 1 or dims.pp > 1
        self.pad_multiple = dims.tp if sequence_parallel and dims.tp > 1 else 1
        self.visual_token_ids, self.pad_token_id, self.local_len = visual_token_ids, pad_token_id, local_len
        self.group = topo.group("cp") if dims.cp > 1 else None

    def __call__(self, row: PackedBatch) -> PackedBatch:
        device = self.topo.device
        if not self.slices:
            return row.to(device)
        cp, rank = self.topo.dims.cp, self.topo.cp_rank
        plan = plan_context_parallel(row.cu_seqlens, cp, pad_multiple=self.pad_multiple, local_len=self.local_len)
        local = plan.shard_batch(row, rank, pad_token_id=self.pad_token_id)
        features = None
        if row.has_vision and cp > 1:
            index = plan.shard_tokens(visual_index(row.input_ids, self.visual_token_ids), rank, pad_value=-1)
            features = index[index >= 0]
        bounds = [int(b) for b in row.cu_seqlens.tolist()]
        doc_of_start = {start: d for d, start in enumerate(bounds[:-1])}
        segments = [doc_of_start[s.key_start] for s in plan.shards[rank].segments]
        if plan.padding(rank):
            segments.append(0)  # the padding segment: no targets, so no document sees it
        n_docs = len(bounds) - 1
        where = plan.gathered_position
        first_here = [bounds[d] < bounds[d + 1] and int(where[bounds[d]]) // plan.local_len == rank or
                      (bounds[d] == bounds[d + 1] and rank == 0) for d in range(n_docs)]
        return LocalRow(
            input_ids=local.input_ids, position_ids=local.position_ids, cu_seqlens=local.cu_seqlens,
            targets=local.targets, pixel_values=row.pixel_values, vision_grid_thw=row.vision_grid_thw,
            sample_ids=row.sample_ids,
            attention=ContextParallelAttention(plan, rank, self.group) if cp > 1 else None,
            vision_owner=getattr(row, "vision_owner", None), visual_features=features,
            segment_documents=torch.tensor(segments, dtype=torch.long), row_documents=n_docs,
            counted=torch.tensor(first_here, dtype=torch.bool),
        ).to(device)


__all__ = ["LocalRow", "RowSlicer", "visual_index"]
