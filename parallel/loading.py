"""Topology-aware loading: every sample of a step is opened and decoded once in the whole job.

Who does what, per data-parallel rank (its pipeline stages x CP x TP ranks share its rows):

* **Only pipeline stage 0 reads.** Its TP x CP ranks (the *row group*, the ranks that embed
  the rows and share the ViT work) run the same assignment rule (``StreamingRows`` or
  ``BalancedRows``) in lock-step over this data-parallel rank's records (its shard of the
  global order), with ``GroupReader`` as the ownership rule.
* **Each record is opened, and its media decoded, by exactly one rank of the row group**:
  its *owner*, which then encodes those images/frames with the ViT (``vision_owner`` on
  the rows, ``OwnedRow``; ``keyetron.parallel.vision`` follows it). The owner tokenizes the
  text and sends the group the document's tokens, targets, positions and grids, never
  pixels; the other ranks hold the document without pixels. Owner of record ``i`` in a
  group of ``g``: ``i % g`` — a function of the record alone, so a resumed or resized run
  gives every document the same owner (and the same numerics) as an uninterrupted one;
  records come in shuffled order, so each rank owns 1/g of them in expectation. Balanced
  steps (``data.loader.balance``) know each row's records and their predicted ViT cost
  before reading them and never carry a built document across steps, so there the owners
  are chosen per row, largest first to the least-loaded rank (``balanced_owners``).
* **Later pipeline stages read nothing.** Stage 0 sends them each step's row metadata: the
  middle stages get document boundaries and 3D positions (what attention and RoPE need),
  the last stage also the targets (labels and loss mask); nobody after stage 0 gets
  token ids or pixels.
* Skips (bad records, undecodable media) are recorded by the owner and sent with the
  documents, so every rank of the group keeps the same skip log and loader state.

Records are fetched ``fetch_size`` at a time: one exchange per batch of records, not per
record. The rows are the same for any fetch size and any group size.

``build_loader`` puts the one ``Loader`` (``keyetron.data.loader``) together for a rank:
the assignment rule from the recipe, ``GroupReader`` when a row group shares rows, and
``TopologyFeed`` (owners on the rows, metadata to later stages) under a parallel layout.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from keyetron.batch import IGNORE_INDEX, Document, PackedBatch
from keyetron.data.cost_index import build_cost_index, load_cost_index
from keyetron.data.dataset import SampleCost, SampleDataset, SkipRecorder
from keyetron.data.loader import Loader, LoaderConfig
from keyetron.data.streaming_rows import StreamingRows
from keyetron.parallel.balanced_rows import BalancedRows
from keyetron.parallel.topology import Topology

log = logging.getLogger("keyetron.data")

FETCH_SIZE = 16  # records per exchange in the row group


def record_owner(index: int, group_size: int) -> int:
    """The row-group rank that opens record ``index``, decodes its media and encodes them."""
    return index % group_size


def balanced_owners(weights: list[float], group_size: int) -> list[int]:
    """Owner per record: largest weight first to the least-loaded rank (ties: fewest records, then
    the lowest rank), so text-only records (weight 0) are spread too."""
    load, count, owners = [0.0] * group_size, [0] * group_size, [0] * len(weights)
    for k in sorted(range(len(weights)), key=lambda k: (-weights[k], k)):
        r = min(range(group_size), key=lambda r: (load[r], count[r], r))
        owners[k] = r
        load[r] += weights[k]
        count[r] += 1
    return owners


def _text_fields(doc: Document | None) -> dict | None:
    if doc is None:
        return None
    return {"input_ids": doc.input_ids, "targets": doc.targets, "position_ids": doc.position_ids,
            "grid": doc.vision_grid_thw, "sample_id": doc.sample_id}


@dataclass
class OwnedRow(PackedBatch):
    """A row as one rank of a stage-0 row group holds it: the pixels of its own items only."""

    vision_owner: torch.Tensor | None = None  # (items,) the row-group rank holding each item's pixels

    def local_items(self, rank: int) -> list[int]:
        """Indices of the visual items whose pixels ``rank`` of the row group holds."""
        assert self.vision_owner is not None
        return [i for i, r in enumerate(self.vision_owner.tolist()) if r == rank]


@dataclass
class MetadataRow(PackedBatch):
    """A row as a later pipeline stage sees it: positions and boundaries, targets on the last
    stage only, no token ids (zeros) or pixels; it knows how many loss tokens the real row has."""

    loss_token_count: int = 0

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_token_count


class GroupReader:
    """The ownership rule of a row group (see the module docstring).

    Called by every rank of ``group`` with the same record indices; returns the same
    documents on every rank, with pixels only on their owner, and remembers the owners for
    ``owned``."""

    def __init__(self, dataset: SampleDataset, group):
        self.dataset, self.group = dataset, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        # sample id -> (owner, items) of each fetched visual document not in a row yet, in fetch order.
        # A sample may come twice in one step (a small stream under a mixture); its copies are alike,
        # so which copy takes which owner does not matter as long as every owner is used once.
        self._owners: dict[str, deque[tuple[int, int]]] = {}

    def __call__(self, indices: list[int], weights: list[float] | None = None) -> list[Document | None]:
        """``weights``: predicted ViT cost per record (balanced steps fetch one row at a time with
        them); the owners are then chosen largest first to the least-loaded rank, so the row's
        ViT work is balanced over the group. Without: ``record_owner``."""
        owners = (balanced_owners(weights, self.size) if weights is not None
                  else [record_owner(i, self.size) for i in indices])
        built: dict[int, Document | None] = {}
        events: dict[int, list] = {}
        skips = self.dataset.skips
        try:
            for k, index in enumerate(indices):
                if owners[k] == self.rank:
                    self.dataset.skips = recorder = SkipRecorder()
                    built[k] = self.dataset.document(index)
                    events[k] = recorder.events
        finally:
            self.dataset.skips = skips
        mine = {k: (_text_fields(doc), events[k]) for k, doc in built.items()}
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, mine, group=self.group)
        docs: list[Document | None] = []
        for k, owner in enumerate(owners):
            fields, skipped = gathered[owner][k]
            for event in skipped:
                skips.add(*event)
            if fields is None:
                docs.append(None)
                continue
            local = built.get(k)
            if fields["grid"] is not None:
                self._owners.setdefault(fields["sample_id"], deque()).append((owner, fields["grid"].shape[0]))
            docs.append(Document(fields["input_ids"], fields["targets"], fields["position_ids"],
                                 local.pixel_values if local is not None else None, fields["grid"],
                                 fields["sample_id"]))
        return docs

    def owned(self, row: PackedBatch) -> OwnedRow:
        """``row`` with the owner of each of its visual items."""
        items = []  # (owner, items) of the row's visual documents, in item order
        for sid in row.sample_ids:
            waiting = self._owners.get(sid)
            if waiting:
                items.append(waiting.popleft())
                if not waiting:
                    del self._owners[sid]
        owner = torch.cat([torch.full((n,), o, dtype=torch.long) for o, n in items]) if items else None
        fields = {f: getattr(row, f) for f in row.__dataclass_fields__}
        return OwnedRow(**fields, vision_owner=owner)


def _row_metadata(row: PackedBatch, with_targets: bool) -> dict:
    meta = {"cu_seqlens": row.cu_seqlens, "position_ids": row.position_ids, "sample_ids": row.sample_ids,
            "loss_tokens": row.num_loss_tokens}
    if with_targets:
        meta["targets"] = row.targets
    return meta


def _metadata_row(meta: dict) -> PackedBatch:
    """A row as a later pipeline stage sees it: no token ids (zeros), targets only on the last."""
    n = meta["position_ids"].shape[1]
    targets = meta.get("targets")
    return MetadataRow(input_ids=torch.zeros(n, dtype=torch.long), position_ids=meta["position_ids"],
                       cu_seqlens=meta["cu_seqlens"],
                       targets=targets if targets is not None else torch.full((n,), IGNORE_INDEX, dtype=torch.long),
                       sample_ids=meta["sample_ids"], loss_token_count=meta["loss_tokens"])


class TopologyFeed:
    """What a rank does with a step's rows under a parallel layout: on stage 0, the owners of
    their visual items (a row group) and their metadata to the later stages; on a later
    stage, those rows' metadata."""

    def __init__(self, topo: Topology, reader: GroupReader | None = None):
        self.topo, self.reader = topo, reader

    def deliver(self, rows: list[PackedBatch]) -> list[PackedBatch]:
        """Stage 0: this rank's rows, sent on to the later stages."""
        if self.reader is not None:
            rows = [self.reader.owned(r) for r in rows]
        pp = self.topo.dims.pp
        if pp > 1:
            group = self.topo.group("pp")
            for stage in range(1, pp):
                payload = [[_row_metadata(r, with_targets=stage == pp - 1) for r in rows]]
                dist.send_object_list(payload, dst=dist.get_global_rank(group, stage), group=group)
        return rows

    def receive(self, n: int) -> list[PackedBatch]:
        """A later stage: the metadata of stage 0's rows."""
        group = self.topo.group("pp")
        payload = [None]
        dist.recv_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        assert len(payload[0]) == n, (len(payload[0]), n)
        return [_metadata_row(meta) for meta in payload[0]]


def ensure_cost_index(dataset: SampleDataset, path: str | Path,
                      topo: Topology | None = None) -> list[SampleCost | None]:
    """Load the cost index, rank 0 (re)building it first when needed; collective under ``topo``."""
    distributed = topo is not None and topo.distributed
    if not distributed or topo.rank == 0:
        if load_cost_index(path, dataset) is None:
            log.info("building the cost index %s from metadata (%d records)", path, len(dataset))
            build_cost_index(dataset, path)
    if distributed:
        dist.barrier()
    costs = load_cost_index(path, dataset)
    assert costs is not None, path
    return costs


def build_loader(dataset: SampleDataset, cfg: LoaderConfig, topo: Topology, *, pad_token_id: int,
                 rows_per_step: int = 1, costs: list | None = None, cost_model=None,
                 fetch_size: int = FETCH_SIZE) -> Loader:
    """This rank's loader of packed rows (see the module docstring): streaming, or cost-balanced
    steps with ``cfg.balance`` (from the per-record ``costs``, ``rows_per_step`` rows per rank)."""
    if not topo.is_first_stage:
        return Loader(feed=TopologyFeed(topo))
    reader = GroupReader(dataset, topo.group("cp", "tp")) if topo.dims.cp * topo.dims.tp > 1 else None
    if cfg.balance:
        rows = BalancedRows(dataset, cfg, costs, rows_per_step, pad_token_id, topo.dp_rank, topo.dims.dp,
                            cost_model, reader)
    else:
        rows = StreamingRows(dataset, cfg, pad_token_id=pad_token_id, dp_rank=topo.dp_rank, dp_size=topo.dims.dp,
                             documents=reader, fetch_size=fetch_size if topo.distributed else 1)
    return Loader(rows, TopologyFeed(topo, reader) if topo.distributed else None)


__all__ = ["FETCH_SIZE", "GroupReader", "MetadataRow", "OwnedRow", "TopologyFeed", "balanced_owners",
           "build_loader", "ensure_cost_index", "record_owner"]
