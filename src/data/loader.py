"""The packed-row loader: shuffled records -> documents -> best-fit rows, resumable exactly.

Records are visited in a fresh permutation each epoch (seeded by ``seed`` and the epoch),
built into documents (bad samples become counted skips) and streamed through a
``RowPacker``. The loader's position is plain data: the epoch, the cursor in that epoch's
order, the record indices of the documents waiting in the packer's buffer, and the rows
already packed but not yet handed out. ``load_state_dict`` refetches those few documents
and continues with exactly the rows an uninterrupted run would have produced.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from keyetron.data.batch import Document, PackedBatch
from keyetron.data.dataset import SampleDataset
from keyetron.data.packing import PADDING_SAMPLE_ID, PIECE_SEPARATOR, DEFAULT_PAD_TOKEN_ID, OversizePolicy, \
    RowPacker, build_row, split_document


@dataclass
class LoaderConfig:
    """Packing and ordering (the recipe's ``data`` section, minus sources and media)."""

    row_tokens: int = 8192  # tokens per packed row (8K in pre-training, up to 128K when annealing)
    buffer_docs: int = 256  # documents per best-fit pass
    min_fill: float = 0.95  # rows emptier than this wait one pass for documents to fill them
    oversize: str = "split_text"  # split_text | skip | error (see keyetron.data.packing)
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        OversizePolicy.parse(self.oversize)
        if self.row_tokens <= 0 or self.buffer_docs <= 0:
            raise ValueError(f"row_tokens and buffer_docs must be positive, got {self.row_tokens}, {self.buffer_docs}")


def _original_id(sample_id: str) -> str:
    original, sep, k = sample_id.rpartition(PIECE_SEPARATOR)
    return original if sep and k.isdigit() else sample_id


class PackedLoader:
    """Infinite iterator of packed rows over ``dataset`` (or the records ``indices`` of it)."""

    def __init__(self, dataset: SampleDataset, cfg: LoaderConfig, indices: Sequence[int] | None = None,
                 pad_token_id: int = DEFAULT_PAD_TOKEN_ID):
        self.dataset = dataset
        self.cfg = cfg
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        if not self.indices:
            raise ValueError(f"no records to load from {dataset.source.name}")
        self.pad_token_id = pad_token_id
        self.epoch = 0
        self.cursor = 0
        self._packer = self._new_packer()
        self._pending: deque[PackedBatch] = deque()
        self._record_of: dict[str, int] = {}  # sample id -> record index, for documents not yet emitted
        self.documents_built = 0
        self._empty_epochs = 0
        self._flushed = False

    def _new_packer(self) -> RowPacker:
        return RowPacker(self.cfg.row_tokens, self.cfg.buffer_docs, self.cfg.min_fill,
                         policy=self.cfg.oversize, pad_token_id=self.pad_token_id)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.cfg.shuffle:
            return list(self.indices)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return [self.indices[i] for i in torch.randperm(len(self.indices), generator=gen).tolist()]

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        while not self._pending:
            self._fill()
        row = self._pending.popleft()
        waiting = {_original_id(s) for s in self._packer.state_dict()["buffered"]}
        waiting.update(_original_id(s) for r in self._pending for s in r.sample_ids)
        for sid in row.sample_ids:  # forget emitted documents unless a piece of them still waits
            if _original_id(sid) not in waiting:
                self._record_of.pop(_original_id(sid), None)
        return row

    def _fill(self) -> None:
        order = self.epoch_order(self.epoch)
        if self.cursor >= len(order):
            if not self._flushed:  # hand out the epoch's last rows before the epoch number moves on
                self._pending.extend(self._packer.flush())
                self._flushed = True
                return
            if self.documents_built == 0:
                self._empty_epochs += 1
                if self._empty_epochs > 1:
                    raise RuntimeError(f"a whole epoch of {self.dataset.source.name} gave no usable sample; "
                                       f"see the skip log:\n{self.dataset.skips.summary()}")
            self.epoch, self.cursor, self.documents_built, self._flushed = self.epoch + 1, 0, 0, False
            return
        index = order[self.cursor]
        self.cursor += 1
        doc = self.dataset.document(index)
        if doc is None:
            return
        if doc.sample_id in self._record_of or doc.sample_id == PADDING_SAMPLE_ID:
            self.dataset.skips.add("duplicate_id", doc.sample_id, f"record {index}",
                                   "another sample with this id is in flight; sample ids must be unique")
            return
        self.documents_built += 1
        self._empty_epochs = 0
        self._record_of[doc.sample_id] = index
        before = len(self._packer.skipped)
        self._pending.extend(self._packer.add(doc))
        for sid, reason in self._packer.skipped[before:]:
            self.dataset.skips.add("packing", sid, f"record {index}", reason)
            self._record_of.pop(sid, None)

    # -- exact resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        def ids(sample_ids):
            return [(sid, self._record_of[_original_id(sid)]) for sid in sample_ids if sid != PADDING_SAMPLE_ID]

        return {"epoch": self.epoch, "cursor": self.cursor, "documents_built": self.documents_built,
                "flushed": self._flushed, "empty_epochs": self._empty_epochs,
                "packer": self._packer.state_dict(),
                "buffer_records": [self._record_of[_original_id(s)] for s in self._packer.state_dict()["buffered"]],
                "pending": [ids(r.sample_ids) for r in self._pending],
                "skips": self.dataset.skips.state_dict()}

    def _refetch(self, index: int, want: str) -> Document:
        doc = self.dataset.document(index)
        if doc is None or _original_id(want) != doc.sample_id:
            raise RuntimeError(f"resume: record {index} no longer gives sample {want!r} (got "
                               f"{None if doc is None else doc.sample_id!r}); the data changed since the checkpoint")
        self._record_of[doc.sample_id] = index
        if want == doc.sample_id:
            return doc
        k = int(want.rpartition(PIECE_SEPARATOR)[2])
        return split_document(doc, self.cfg.row_tokens)[k]

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.documents_built, self._flushed = state["documents_built"], state["flushed"]
        self._empty_epochs = state["empty_epochs"]
        self._record_of = {}
        self._packer = self._new_packer()
        buffered = state["packer"]["buffered"]
        docs = [self._refetch(i, sid) for sid, i in zip(buffered, state["buffer_records"])]
        self._packer.load_state_dict(state["packer"], docs)
        self._pending = deque(
            build_row([self._refetch(i, sid) for sid, i in row], self.cfg.row_tokens, True, self.pad_token_id)
            for row in state["pending"])
        self.dataset.skips.load_state_dict(state["skips"])


__all__ = ["LoaderConfig", "PackedLoader"]
