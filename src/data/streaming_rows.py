"""Streaming packed rows: shuffled records -> documents -> best-fit rows, resumable exactly.

The assignment rule of ``keyetron.data.loader.Loader`` for streaming training. Records are
visited in a fresh permutation each epoch (seeded by ``seed`` and the epoch), built into
documents (bad samples become counted skips) and streamed through a ``RowPacker``. The
order is global: the epochs' permutations, one after another, form one stream of
*positions* (``EpochOrder``), and data-parallel reader ``r`` of ``D`` takes positions
``r, r + D, r + 2D, ...``. Every record is read once per epoch by exactly one reader,
whatever the readers' speeds.

The reader's position is plain data: the epoch, the next position (``cursor``, advancing by
the stride ``D``; after a resize first a ``queue`` of leftover positions), the record
indices of the documents waiting in the packer's buffer, and the rows already packed but
not yet handed out. ``load_state_dict`` refetches those few documents and continues with
exactly the rows an uninterrupted run would have produced. ``reshard_states`` turns the
states of ``D`` readers into states for ``D'`` readers that read every remaining sample
exactly once.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from keyetron.batch import Document, PackedBatch
from keyetron.data.dataset import SampleDataset, Skip, SkipLog
from keyetron.data.loader import EpochOrder, LoaderConfig, LocalReader
from keyetron.data.packing import PADDING_SAMPLE_ID, PIECE_SEPARATOR, DEFAULT_PAD_TOKEN_ID, RowPacker, build_row, \
    split_document


def _original_id(sample_id: str) -> str:
    original, sep, k = sample_id.rpartition(PIECE_SEPARATOR)
    return original if sep and k.isdigit() else sample_id


class StreamingRows:
    """Infinite iterator of packed rows over ``dataset`` (or the records ``indices`` of it),
    as data-parallel reader ``dp_rank`` of ``dp_size`` (see the module docstring).

    ``documents`` is the ownership rule: it builds the documents of several record indices
    at once (None for a skip); the default (``LocalReader``) builds them here, one by one;
    topology-aware loading passes one that shares the work out over a rank group
    (``keyetron.parallel.loading``)."""

    def __init__(self, dataset: SampleDataset, cfg: LoaderConfig, indices: Sequence[int] | None = None,
                 pad_token_id: int = DEFAULT_PAD_TOKEN_ID, dp_rank: int = 0, dp_size: int = 1,
                 documents: Callable[[list[int]], list[Document | None]] | None = None, fetch_size: int = 1):
        """``fetch_size``: records fetched per call (the rows are the same for any value)."""
        self.dataset = dataset
        self._fetch = documents or LocalReader(dataset)
        self.fetch_size = max(1, fetch_size)
        self.cfg = cfg
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        if not self.indices:
            raise ValueError(f"no records to load from {dataset.source.name}")
        if not 0 <= dp_rank < dp_size <= len(self.indices):
            raise ValueError(f"data-parallel reader {dp_rank} of {dp_size} over {len(self.indices)} records of "
                             f"{dataset.source.name}: every reader needs at least one record per epoch")
        self.pad_token_id = pad_token_id
        self.stride = dp_size
        self.epoch = 0
        self.cursor = dp_rank  # the next position of the global order this reader takes
        self.queue: deque[int] = deque()  # positions taken before ``cursor``, left over from a resize
        self._order = EpochOrder(self.indices, cfg)
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
        return self._order.of_epoch(epoch)

    def _record_at(self, position: int) -> int:
        return self._order.record(position)

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def next_rows(self, n: int) -> list[PackedBatch]:
        """The ``n`` rows (micro-batches) of one optimizer step."""
        return [next(self) for _ in range(n)]

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
        position = self.queue[0] if self.queue else self.cursor
        if position // len(self.indices) > self.epoch:
            if not self._flushed:  # hand out the epoch's last rows before the epoch number moves on
                self._pending.extend(self._packer.flush())
                self._flushed = True
                return
            if self.documents_built == 0:
                self._empty_epochs += 1
                if self._empty_epochs > 1:
                    raise RuntimeError(f"a whole epoch of {self.dataset.source.name} gave no usable sample; "
                                       f"see the skip log:\n{self.dataset.skips.summary()}")
            self.epoch, self.documents_built, self._flushed = self.epoch + 1, 0, False
            return
        positions = []
        while len(positions) < self.fetch_size and position // len(self.indices) <= self.epoch:
            positions.append(position)
            if self.queue:
                self.queue.popleft()
            else:
                self.cursor += self.stride
            position = self.queue[0] if self.queue else self.cursor
        indices = [self._record_at(p) for p in positions]
        for index, doc in zip(indices, self._fetch(indices)):
            self._admit(index, doc)

    def _admit(self, index: int, doc: Document | None) -> None:
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
    @staticmethod
    def reshard_states(states: dict[int, dict], new_dp: int) -> dict[int, dict]:
        return reshard_streaming_states(states, new_dp)

    def state_dict(self) -> dict:
        def ids(sample_ids):
            return [(sid, self._record_of[_original_id(sid)]) for sid in sample_ids if sid != PADDING_SAMPLE_ID]

        return {"epoch": self.epoch, "cursor": self.cursor, "stride": self.stride, "queue": list(self.queue),
                "documents_built": self.documents_built,
                "flushed": self._flushed, "empty_epochs": self._empty_epochs,
                "packer": self._packer.state_dict(),
                "buffer_records": [self._record_of[_original_id(s)] for s in self._packer.state_dict()["buffered"]],
                "pending": [ids(r.sample_ids) for r in self._pending],
                "skips": self.dataset.skips.state_dict()}

    def _refetch(self, index: int, want: str, built: dict[int, Document | None]) -> Document:
        doc = built[index]
        if doc is None or _original_id(want) != doc.sample_id:
            raise RuntimeError(f"resume: record {index} no longer gives sample {want!r} (got "
                               f"{None if doc is None else doc.sample_id!r}); the data changed since the checkpoint")
        self._record_of[doc.sample_id] = index
        if want == doc.sample_id:
            return doc
        k = int(want.rpartition(PIECE_SEPARATOR)[2])
        return split_document(doc, self.cfg.row_tokens)[k]

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict`` output of a reader with the same stride (data-parallel
        size); states of another size go through ``reshard_states`` first."""
        if "stride" not in state:
            raise ValueError("this loader state predates the global data order (no 'stride'); it cannot be "
                             "resumed exactly: start the data from the beginning or resume with the old version")
        if state["stride"] != self.stride:
            raise ValueError(f"loader state was written by one of {state['stride']} data-parallel readers, this is "
                             f"one of {self.stride}; convert the states with reshard_streaming_states")
        self.epoch, self.cursor, self.queue = state["epoch"], state["cursor"], deque(state["queue"])
        self.documents_built, self._flushed = state["documents_built"], state["flushed"]
        self._empty_epochs = state["empty_epochs"]
        self._record_of = {}
        self._packer = self._new_packer()
        buffered = state["packer"]["buffered"]
        wanted = list(dict.fromkeys([*state["buffer_records"], *(i for row in state["pending"] for _, i in row)]))
        built = dict(zip(wanted, self._fetch(wanted)))  # one fetch: collective under topology-aware loading
        docs = [self._refetch(i, sid, built) for sid, i in zip(buffered, state["buffer_records"])]
        self._packer.load_state_dict(state["packer"], docs)
        self._pending = deque(
            build_row([self._refetch(i, sid, built) for sid, i in row], self.cfg.row_tokens, True,
                      self.pad_token_id)
            for row in state["pending"])
        self.dataset.skips.load_state_dict(state["skips"])


def reshard_streaming_states(states: dict[int, dict], new_dp: int) -> dict[int, dict]:
    """States for ``new_dp`` readers that continue where the ``states`` of all old readers
    (keyed by data-parallel rank) stopped: every sample not yet handed out, exactly once.

    Positions: an old reader has taken all of its positions below its cursor except those
    still in its queue, so the positions no reader has taken are the queues plus, per
    reader, its stride steps from its cursor. Those below the largest cursor ``m`` are
    dealt round-robin (in order) as the new readers' queues; from ``m`` on, new reader
    ``r`` takes ``m + r, m + r + new_dp, ...``. Documents already read but not handed out
    (packer buffers and packed rows) are dealt round-robin too: the new readers refetch them
    first. The skip logs are merged into reader 0's.
    """
    if sorted(states) != list(range(len(states))):
        raise ValueError(f"loader states of data-parallel ranks {sorted(states)}; need every rank 0..n-1")
    if new_dp <= 0:
        raise ValueError(f"the new data-parallel size must be positive, got {new_dp}")
    old = [states[r] for r in range(len(states))]
    stride = old[0]["stride"]
    assert all(s["stride"] == stride == len(old) for s in old), [s["stride"] for s in old]
    row_tokens = old[0]["packer"]["row_tokens"]
    top = max(s["cursor"] for s in old)
    left = sorted(itertools.chain.from_iterable(
        [*s["queue"], *range(s["cursor"], top, stride)] for s in old))

    def buffered(carried: bool) -> list[tuple[str, int]]:
        return [(sid, record) for s in old for k, (sid, record) in
                enumerate(zip(s["packer"]["buffered"], s["buffer_records"]))
                if (k < s["packer"]["num_carried"]) == carried]

    # Carried documents first (a buffer keeps them as its prefix), dealt on from one counter.
    docs = buffered(True) + buffered(False)
    carried = len(buffered(True))
    rows = [row for s in old for row in s["pending"]]
    skips = SkipLog()
    for s in old:
        skips.counts.update(s["skips"]["counts"])
        skips.entries.extend(Skip(**e) for e in s["skips"]["entries"][:SkipLog.MAX_KEPT - len(skips.entries)])
    new = {}
    for r in range(new_dp):
        mine = range(r, len(docs), new_dp)
        new[r] = {"epoch": min(s["epoch"] for s in old), "cursor": top + r, "stride": new_dp,
                  "queue": left[r::new_dp], "documents_built": max(s["documents_built"] for s in old),
                  "flushed": False, "empty_epochs": 0,
                  "packer": {"row_tokens": row_tokens, "buffered": [docs[k][0] for k in mine],
                             "num_carried": sum(k < carried for k in mine)},
                  "buffer_records": [docs[k][1] for k in mine],
                  "pending": rows[r::new_dp],
                  "skips": skips.state_dict() if r == 0 else SkipLog().state_dict()}
    return new


__all__ = ["StreamingRows", "reshard_streaming_states"]
