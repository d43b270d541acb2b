"""Topology-aware loading: every sample of a step is opened and decoded once in the whole job.

Who does what, per data-parallel rank (its pipeline stages x CP x TP ranks share its rows):

* **Only pipeline stage 0 reads.** Its TP x CP ranks (the *row group*, the ranks that embed
  the rows and share the ViT work) run the same ``PackedLoader`` in lock-step over this
  data-parallel rank's records (its shard of the global order).
* **Each record is opened, and its media decoded, by exactly one rank of the row group**:
  its *owner*, which then encodes those images/frames with the ViT (``vision_owner`` on
  the documents and rows; ``encode_vision_shared`` follows it). The owner tokenizes the
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
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from keyetron.data.batch import IGNORE_INDEX, Document, PackedBatch
from keyetron.data.dataset import SampleDataset, SkipLog
from keyetron.data.loader import LoaderConfig, PackedLoader
from keyetron.parallel.topology import Topology

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


class _SkipRecorder(SkipLog):
    """Collects the skips of one document build, to be replayed on every rank of the group."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str, str]] = []

    def add(self, kind: str, sample_id: str, location: str, reason: str) -> None:
        self.events.append((kind, sample_id, location, reason))


def _text_fields(doc: Document | None) -> dict | None:
    if doc is None:
        return None
    return {"input_ids": doc.input_ids, "targets": doc.targets, "position_ids": doc.position_ids,
            "grid": doc.vision_grid_thw, "sample_id": doc.sample_id}


class GroupDocuments:
    """``PackedLoader``'s document fetcher for a row group (see the module docstring).

    Called by every rank of ``group`` with the same record indices; returns the same
    documents on every rank, with pixels only on their owner."""

    def __init__(self, dataset: SampleDataset, group):
        self.dataset, self.group = dataset, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

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
                    self.dataset.skips = recorder = _SkipRecorder()
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
            visual = fields["grid"] is not None
            local = built.get(k)
            docs.append(Document(fields["input_ids"], fields["targets"], fields["position_ids"],
                                 local.pixel_values if local is not None else None, fields["grid"],
                                 fields["sample_id"], vision_owner=owner if visual else None))
        return docs


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
    return PackedBatch(input_ids=torch.zeros(n, dtype=torch.long), position_ids=meta["position_ids"],
                       cu_seqlens=meta["cu_seqlens"],
                       targets=targets if targets is not None else torch.full((n,), IGNORE_INDEX, dtype=torch.long),
                       sample_ids=meta["sample_ids"], loss_token_count=meta["loss_tokens"])


class TopologyLoader:
    """The rows of each step for this rank of a parallel layout (see the module docstring).

    ``next_rows(n)`` is collective over the data-parallel rank's pipeline x CP x TP ranks.
    ``state_dict()`` is the loader position on stage-0 ranks (identical across its row
    group) and None elsewhere."""

    def __init__(self, dataset: SampleDataset, cfg: LoaderConfig, pad_token_id: int, topo: Topology,
                 fetch_size: int = FETCH_SIZE, costs: list | None = None, rows_per_step: int = 1,
                 cost_model=None):
        """``cfg.balance``: cost-balanced steps (``keyetron.parallel.balanced_loading``) from the
        per-record ``costs``, ``rows_per_step`` rows per rank; else the streaming packer."""
        from keyetron.parallel.balanced_loading import BalancedRows

        self.topo = topo
        self.reads = topo.is_first_stage
        self.loader = None
        if self.reads:
            row_group = topo.dims.cp * topo.dims.tp > 1
            documents = GroupDocuments(dataset, topo.group("cp", "tp")) if row_group else None
            if cfg.balance:
                self.loader = BalancedRows(dataset, cfg, costs, rows_per_step, pad_token_id, topo.dp_rank,
                                           topo.dims.dp, cost_model, documents)
            else:
                self.loader = PackedLoader(dataset, cfg, pad_token_id=pad_token_id, dp_rank=topo.dp_rank,
                                           dp_size=topo.dims.dp, documents=documents, fetch_size=fetch_size)

    @property
    def epoch(self) -> int:
        return self.loader.epoch if self.loader is not None else 0

    @property
    def last_report(self) -> dict | None:
        """The predicted imbalance of the last balanced step (None when streaming)."""
        return getattr(self.loader, "last_report", None)

    def next_rows(self, n: int) -> list[PackedBatch]:
        pp = self.topo.dims.pp
        group = self.topo.group("pp") if pp > 1 else None
        if self.reads:
            rows = self.loader.next_rows(n)
            for stage in range(1, pp):
                payload = [[_row_metadata(r, with_targets=stage == pp - 1) for r in rows]]
                dist.send_object_list(payload, dst=dist.get_global_rank(group, stage), group=group)
            return rows
        payload = [None]
        dist.recv_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        assert len(payload[0]) == n, (len(payload[0]), n)
        return [_metadata_row(meta) for meta in payload[0]]

    def state_dict(self) -> dict | None:
        return self.loader.state_dict() if self.loader is not None else None

    def load_state_dict(self, state: dict) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(state)


__all__ = ["FETCH_SIZE", "GroupDocuments", "TopologyLoader", "balanced_owners", "record_owner"]
