"""Stage 0's data: shuffled image-caption pairs from the recipe's sources, one step at a time.

Every epoch visits the records in one global order (``keyetron.data.loader.epoch_order``:
seeded by ``data.loader.seed`` and the epoch). A step walks that order from the shared
position (epoch, cursor) and takes the next ``batch_size * dp_size`` records that are
image-caption pairs (``image_caption``: one image, a caption or a question + answer),
running into the next epoch when this one ends; data-parallel rank r decodes the r-th
``batch_size`` of them. Which records are one-image samples comes from the cost index
(``keyetron.parallel.balanced_loading``: built once from metadata by rank 0), so a rank opens
only its own records; every rank walks alike, so the position is one state for all ranks: a checkpoint resumes exactly,
under any number of data-parallel ranks, and the ranks' union batch is the batch one
process with ``batch_size * dp_size`` would take.

Records that are not one image with a caption (text, video, multi-image samples) are
passed over and counted; malformed records and undecodable images are skips (the
``SkipLog`` of the LM loader). An image that fails to decode leaves its rank one pair short
for that step; the loss divides by the step's global pair count, so that is harmless.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from keyetron.config import ConfigError
from keyetron.data.dataset import SkipLog, sample_id_of
from keyetron.data.errors import MediaError
from keyetron.data.loader import LoaderConfig, epoch_order
from keyetron.data.samples import SampleError, parse_sample
from keyetron.data.sources import RawRecord, SampleSource
from keyetron.train.contrastive import ContrastiveBatch, ContrastiveBatchBuilder, ImageCaption, image_caption

log = logging.getLogger("keyetron.train")

UNSEEN, PAIR, NOT_PAIR = 0, 1, 2


def concat_batches(parts: Sequence[ContrastiveBatch]) -> ContrastiveBatch:
    """One batch of several, pairs in order."""
    return ContrastiveBatch(torch.cat([b.pixel_values for b in parts]), torch.cat([b.grid_thw for b in parts]),
                            torch.cat([b.input_ids for b in parts]), tuple(s for b in parts for s in b.sample_ids))


def build_each(builder: ContrastiveBatchBuilder, pairs: Sequence[ImageCaption],
               skips: SkipLog | None = None) -> ContrastiveBatch | None:
    """The batch of the pairs whose image decodes (each failure a ``bad_media`` skip); None if none does."""
    parts = []
    for pair in pairs:
        try:
            parts.append(builder.build([pair]))
        except MediaError as err:
            if skips is not None:
                skips.add("bad_media", pair.sample_id, str(pair.image), err.reason)
        except (OSError, RuntimeError, ValueError) as err:  # a decoder failing in a way we did not foresee
            log.exception("unexpected error on sample %s (%s)", pair.sample_id, pair.image)
            if skips is not None:
                skips.add("error", pair.sample_id, str(pair.image), f"{type(err).__name__}: {err}")
    return concat_batches(parts) if parts else None


class PairDataset:
    """The records of a source seen as image-caption pairs: which are pairs, and a pair's batch."""

    def __init__(self, source: SampleSource, builder: ContrastiveBatchBuilder, skips: SkipLog | None = None,
                 candidates: Sequence[bool] | None = None):
        """``candidates``: per record, whether it is one image (from the cost index: metadata
        read once, by one rank); then no rank reads another rank's records. Without it every
        rank reads each record's JSON once to classify it."""
        self.source = source
        self.builder = builder
        self.skips = skips if skips is not None else SkipLog()
        self._kind = bytearray(len(source))  # UNSEEN / PAIR / NOT_PAIR per record, the same on every rank
        if candidates is not None:
            if len(candidates) != len(source):
                raise ConfigError(f"the cost index has {len(candidates)} records, data.sources {len(source)}; "
                                  f"delete the index to rebuild it")
            self._kind[:] = bytes(PAIR if c else NOT_PAIR for c in candidates)

    def __len__(self) -> int:
        return len(self.source)

    def _pair(self, rec: RawRecord, report: bool) -> ImageCaption | None:
        sid = sample_id_of(rec.raw, f"<{rec.location}>")
        if rec.error is not None:
            if report:
                self.skips.add("bad_record", sid, rec.location, rec.error)
            return None
        try:
            return image_caption(parse_sample(rec.raw, rec.root))
        except SampleError as err:
            if report:
                self.skips.add("bad_sample", sid, rec.location, err.reason)
            return None

    def is_pair(self, index: int, report: bool = True) -> bool:
        """Whether record ``index`` is an image-caption pair (its JSON is read once per run)."""
        if self._kind[index] == UNSEEN:
            with self.source.record(index) as rec:
                self._kind[index] = PAIR if self._pair(rec, report) is not None else NOT_PAIR
        return self._kind[index] == PAIR

    def batches(self, indices: Sequence[int]) -> ContrastiveBatch | None:
        """The pairs of records ``indices``, decoded; None when no image of them decodes."""
        parts = []
        for index in indices:
            with self.source.record(index) as rec:  # a tar shard's media live while the record is open
                pair = self._pair(rec, report=True)
                if pair is not None:
                    parts.append(build_each(self.builder, [pair], self.skips))
                elif rec.error is None:  # the index said one image, but there is no caption
                    self.skips.add("not_a_pair", sample_id_of(rec.raw, f"<{rec.location}>"), rec.location,
                                   "one image but no caption or question/answer text")
        parts = [p for p in parts if p is not None]
        return concat_batches(parts) if parts else None


class PairLoader:
    """Steps of ``batch_size`` pairs for data-parallel rank ``dp_rank`` of ``dp_size`` (module docstring)."""

    def __init__(self, dataset: PairDataset, batch_size: int, cfg: LoaderConfig, dp_rank: int = 0, dp_size: int = 1):
        if not len(dataset):
            raise ConfigError("data.sources hold no records; stage 0 needs image-caption pairs")
        self.dataset, self.batch_size, self.cfg = dataset, batch_size, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.cursor = 0, 0
        self.passed_over = 0  # records walked past that are not image-caption pairs
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(range(len(self.dataset)), self.cfg, self.epoch))
        return self._order[1]

    def next_indices(self) -> list[int]:
        """The records of the next step, all ranks' (``batch_size * dp_size`` pairs in rank order)."""
        want, picked, misses = self.batch_size * self.dp_size, [], 0
        while len(picked) < want:
            order = self._epoch_order()
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            index = order[self.cursor]
            self.cursor += 1
            if self.dataset.is_pair(index, report=self.dp_rank == 0):
                picked.append(index)
                misses = 0
            else:
                self.passed_over += 1
                misses += 1
                if misses > len(order):
                    raise ConfigError(f"no record of data.sources ({len(order)} records) is an image with a caption "
                                      "(one image; a caption answer, or a question and its answer); stage 0 "
                                      "trains on image-caption pairs")
        return picked

    def next_batch(self) -> ContrastiveBatch | None:
        """This rank's pairs of the next step (fewer when images fail to decode; None if all do)."""
        mine = self.next_indices()[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]
        return self.dataset.batches(mine)

    def state_dict(self) -> dict:
        return {"kind": "pairs", "epoch": self.epoch, "cursor": self.cursor, "records": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "pairs":
            raise ConfigError(f"the checkpoint's data position is of a {state.get('kind', 'packed')!r} loader, not "
                              "stage 0's image-caption pairs; resume stage 0 from a stage-0 checkpoint")
        if state["records"] != len(self.dataset):
            raise ConfigError(f"the checkpoint's data position is over {state['records']} records, data.sources "
                              f"now hold {len(self.dataset)}; resume with the same sources or set "
                              "checkpoint.resume: none and start from the weights (model.init)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


__all__ = ["PairDataset", "PairLoader", "build_each", "concat_batches"]
