"""Image-caption pairs: stage 0's data, from the same sources as every other stage.

Images stay at native resolution and are packed (many grids on one patch axis, as the ViT
always takes them); captions are fixed-length token rows, as SigLIP text towers are
trained. A one-image sample is a pair (``image_caption``): a ``caption`` sample's caption
is its answer, any other task's is question + answer.

``PairBatches`` is the assignment rule of ``keyetron.data.loader.Loader`` for pairs. Every
epoch visits the records in one global order (``epoch_order``: seeded by
``data.loader.seed`` and the epoch). A step walks that order from the shared position
(epoch, cursor) and takes the next ``batch_size * dp_size`` records that are pairs,
running into the next epoch when this one ends; data-parallel rank r decodes the r-th
``batch_size`` of them. Which records are one-image samples comes from the cost index
(``keyetron.data.cost_index``: built once from metadata by rank 0), so a rank opens only
its own records; every rank walks alike, so the position is one state for all ranks: a
checkpoint resumes exactly, under any number of data-parallel ranks, and the ranks'
union batch is the batch one process with ``batch_size * dp_size`` would take.

Records that are not one image with a caption (text, video, multi-image samples) are
passed over and counted; malformed records and undecodable images are skips (the
``SkipLog`` of the LM loader). An image that fails to decode leaves its rank one pair short
for that step; the loss divides by the step's global pair count, so that is harmless.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from keyetron.config import ConfigError
from keyetron.data.dataset import MediaConfig, SkipLog, sample_id_of
from keyetron.data.errors import MediaError
from keyetron.data.image import load_image
from keyetron.data.loader import EpochOrder, LoaderConfig
from keyetron.data.samples import Sample, SampleError, parse_sample
from keyetron.data.sources import JsonlSource, RawRecord, SampleSource
from keyetron.data.tokenizer import KeyeTokenizer

log = logging.getLogger("keyetron.data")


@dataclass(frozen=True)
class ImageCaption:
    sample_id: str
    image: Path
    caption: str


def _texts(sample: Sample, role: str) -> str:
    return " ".join(p.value.strip() for t in sample.turns if t.role == role
                    for p in t.parts if p.kind in ("text", "ocr_text") and p.value.strip())


def image_caption(sample: Sample) -> ImageCaption | None:
    """A one-image sample as an image-caption pair; None for text, video and multi-image samples.

    A ``caption`` sample's caption is its answer; any other task's is question + answer
    (e.g. "What colour is the shape? red"), which still names what the image shows.
    """
    media = sample.media
    if len(media) != 1 or media[0].kind != "image":
        return None
    answer = _texts(sample, "assistant")
    caption = answer if sample.task == "caption" else f"{_texts(sample, 'user')} {answer}".strip()
    return ImageCaption(sample.sample_id, media[0].value, caption) if caption else None


def read_image_captions(manifest: str | Path) -> list[ImageCaption]:
    """Every usable image-caption pair of a JSONL manifest (malformed and non-image samples skipped)."""
    source = JsonlSource(manifest)
    pairs = []
    for i in range(len(source)):
        record = source.record(i)
        if record.error:
            continue
        try:
            pair = image_caption(parse_sample(record.raw, record.root))
        except SampleError:
            continue
        if pair is not None:
            pairs.append(pair)
    return pairs


class CaptionTokenizer:
    """Captions -> (B, max_length) ids, truncated and padded to the tower's fixed length.

    ``path`` is a tokenizer folder transformers can load offline (a real SigLIP checkpoint
    folder: its SentencePiece / Gemma tokenizer, which the tower's vocabulary belongs to).
    ``path=None`` uses the project's Qwen3 tokenizer, for towers trained from scratch with a
    vocabulary sized to it (the ``tiny``/``small`` text configs): ids, then
    ``<|endoftext|>`` as end of text, then ``<|endoftext|>`` padding.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = 64):
        self.max_length = max_length
        self.path = path
        if path is None:
            tok = KeyeTokenizer()
            self._qwen, self.vocab_size, self.pad_id = tok, len(tok), tok.pad_id
        else:
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{path}: no tokenizer transformers can load offline ({err}); give the SigLIP "
                                  "checkpoint folder holding its tokenizer files") from err
            if self._hf.pad_token_id is None:
                raise ConfigError(f"{path}: the tokenizer defines no pad token; captions are padded to {max_length}")
            self._qwen, self.vocab_size, self.pad_id = None, len(self._hf), self._hf.pad_token_id

    @classmethod
    def for_tower(cls, cfg, path: str | Path | None = None) -> CaptionTokenizer:
        """A tokenizer checked against the tower (``SiglipTextConfig``): every id must have a row in its embedding."""
        tok = cls(path, cfg.max_length)
        if tok.vocab_size > cfg.vocab_size:
            where = path or "the Qwen3 tokenizer"
            raise ConfigError(f"{where} has {tok.vocab_size} ids but text tower {cfg.name!r} has vocab_size "
                              f"{cfg.vocab_size}; use the tokenizer of the tower's checkpoint or a larger vocab_size")
        return tok

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        L = self.max_length
        if self._qwen is None:
            out = self._hf(list(captions), padding="max_length", truncation=True, max_length=L)
            return torch.tensor(out["input_ids"], dtype=torch.long)
        rows = torch.full((len(captions), L), self.pad_id, dtype=torch.long)
        for i, text in enumerate(captions):
            ids = self._qwen.encode(text)[: L - 1] + [self.pad_id]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


@dataclass
class ContrastiveBatch:
    """Packed native-resolution images (as the ViT takes them) and one caption row per image."""

    pixel_values: torch.Tensor  # (patches, C, p, p), images in order
    vision_grid_thw: torch.Tensor  # (n, 3) long, (1, h, w) per image, in patches
    input_ids: torch.Tensor  # (n, L) long, fixed-length captions
    sample_ids: tuple[str, ...] = ()

    def __post_init__(self):
        grids, pixels = self.vision_grid_thw, self.pixel_values
        assert grids.shape[0] == self.input_ids.shape[0], (grids.shape, self.input_ids.shape)
        assert int(grids.prod(dim=1).sum()) == pixels.shape[0], (grids, pixels.shape)

    @property
    def num_pairs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """ViT patches: the work of the step (throughput metrics)."""
        return int(self.pixel_values.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> ContrastiveBatch:
        """Move tensors to ``device``; ``dtype`` applies to pixel values only."""
        return ContrastiveBatch(self.pixel_values.to(device=device, dtype=dtype), self.vision_grid_thw.to(device),
                                self.input_ids.to(device), self.sample_ids)


class ContrastiveBatchBuilder:
    """Image-caption pairs -> ContrastiveBatch: decode, smart-resize, patchify, pack; tokenize captions."""

    def __init__(self, tokenizer: CaptionTokenizer, media: MediaConfig | None = None):
        self.tokenizer = tokenizer
        self.media = media or MediaConfig()

    def build(self, pairs: Sequence[ImageCaption]) -> ContrastiveBatch:
        assert pairs, "cannot build a batch of zero pairs"
        m = self.media
        images = [load_image(p.image, m.image_min_tokens, m.image_max_tokens, m.max_source_pixels) for p in pairs]
        return ContrastiveBatch(
            pixel_values=torch.cat([img.pixel_values for img in images]),
            vision_grid_thw=torch.tensor([img.size.grid_thw for img in images], dtype=torch.long),
            input_ids=self.tokenizer([p.caption for p in pairs]),
            sample_ids=tuple(p.sample_id for p in pairs),
        )


UNSEEN, PAIR, NOT_PAIR = 0, 1, 2


def concat_batches(parts: Sequence[ContrastiveBatch]) -> ContrastiveBatch:
    """One batch of several, pairs in order."""
    return ContrastiveBatch(torch.cat([b.pixel_values for b in parts]), torch.cat([b.vision_grid_thw for b in parts]),
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


class PairBatches:
    """Steps of ``batch_size`` pairs for data-parallel rank ``dp_rank`` of ``dp_size`` (module docstring)."""

    def __init__(self, dataset: PairDataset, batch_size: int, cfg: LoaderConfig, dp_rank: int = 0, dp_size: int = 1):
        if not len(dataset):
            raise ConfigError("data.sources hold no records; stage 0 needs image-caption pairs")
        self.dataset, self.batch_size, self.cfg = dataset, batch_size, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.cursor = 0, 0
        self.passed_over = 0  # records walked past that are not image-caption pairs
        self._order = EpochOrder(range(len(dataset)), cfg)

    def _epoch_order(self) -> list[int]:
        return self._order.of_epoch(self.epoch)

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

    def next_rows(self, n: int) -> list[ContrastiveBatch]:
        """The step's batch as a list of one (none when no image of it decodes): the sigmoid loss of
        a batch is not a sum over micro-batches, so a step is one batch."""
        assert n == 1, f"a step of image-caption pairs is one batch, not {n}"
        batch = self.next_batch()
        return [] if batch is None else [batch]

    @staticmethod
    def reshard_states(states: dict[int, dict], new_dp: int) -> dict[int, dict]:
        """Every rank walks the one global order: any rank's state is every new rank's."""
        return {r: states[0] for r in range(new_dp)}

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


__all__ = ["CaptionTokenizer", "ContrastiveBatch", "ContrastiveBatchBuilder", "ImageCaption", "PairBatches",
           "PairDataset", "build_each", "concat_batches", "image_caption", "read_image_captions"]
