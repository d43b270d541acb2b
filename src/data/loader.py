"""The one loader: the batches of each training step for this process.

``Loader`` is what the trainer reads steps from, for every objective and layout. It is put
together from rules passed in:

- the **assignment rule** decides which records a step takes on this data-parallel rank and
  how they become batches: ``StreamingRows`` (a global order strided over the ranks,
  best-fit packing; ``keyetron.data.streaming_rows``), ``BalancedRows`` (every step's
  samples dealt to ranks and rows by predicted ViT + LLM cost;
  ``keyetron.parallel.balanced_rows``) or ``PairBatches`` (image-caption pairs for the
  contrastive objective; ``keyetron.data.pairs``). Each keeps its position as plain data
  (``state_dict``), resumes exactly and reshards the states of one data-parallel size to
  another (``reshard_states``) without losing or repeating a sample;
- the **ownership rule** decides which process opens a record and decodes its media: this
  one (``LocalReader``), or one owner in a rank group that shares its rows
  (``keyetron.parallel.loading.GroupReader``: topology-aware reading);
- the **feed**, under a parallel layout (``keyetron.parallel.loading.TopologyFeed``): stage 0
  marks which rank of its row group holds each visual item's pixels and sends each step's
  row metadata to the later pipeline stages, which read nothing.

``keyetron.parallel.loading.build_loader`` chooses them from the recipe and the topology.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keyetron.batch import Document
from keyetron.data.packing import OversizePolicy


@dataclass
class LoaderConfig:
    """Packing and ordering (the recipe's ``data`` section, minus sources and media)."""

    row_tokens: int = 8192  # tokens per packed row (8K in pre-training, up to 128K when annealing)
    buffer_docs: int = 256  # documents per best-fit pass
    min_fill: float = 0.95  # rows emptier than this wait one pass for documents to fill them
    oversize: str = "split_text"  # split_text | skip | error (see keyetron.data.packing)
    shuffle: bool = True
    seed: int = 0
    # Cost-balanced steps (keyetron.parallel.balanced_loading): each step's samples are dealt to
    # the data-parallel ranks and rows by predicted ViT + LLM cost instead of streamed in order.
    balance: bool = False
    samples_per_step: int | None = None  # global samples per step (None: as many as the rows hold)
    step_fill: float = 0.9  # balanced steps take samples up to this fraction of all rows' tokens
    cost_index: str | None = None  # per-record costs (built at start-up when missing); None: in output_dir
    calibration: str | None = None  # cost-model calibration file; None: FLOP-derived from the model config
    # Token-level data mixture of balanced steps: target share of the tokens of video, image and
    # text(-only) samples, e.g. {video: 0.24, image: 0.50, text: 0.26}; None: the data as it comes.
    mixture: dict[str, float] | None = None

    def __post_init__(self) -> None:
        OversizePolicy.parse(self.oversize)
        if self.row_tokens <= 0 or self.buffer_docs <= 0:
            raise ValueError(f"row_tokens and buffer_docs must be positive, got {self.row_tokens}, {self.buffer_docs}")
        if not 0 < self.step_fill <= 1:
            raise ValueError(f"step_fill must be in (0, 1], got {self.step_fill}")
        if self.mixture is not None:
            bad = sorted(set(self.mixture) - {"video", "image", "text"})
            if bad or not self.mixture or any(v < 0 for v in self.mixture.values()) or \
                    abs(sum(self.mixture.values()) - 1) > 1e-6:
                raise ValueError(f"mixture {self.mixture}: shares of video / image / text, each >= 0, summing to 1")
            if not self.balance:
                raise ValueError("mixture needs balance: true (it draws by the cost index's token counts)")
        if self.samples_per_step is not None and self.samples_per_step <= 0:
            raise ValueError(f"samples_per_step must be positive, got {self.samples_per_step}")


def epoch_order(indices: Sequence[int], cfg: LoaderConfig, epoch: int) -> list[int]:
    """The records of one epoch in visiting order (seeded by ``cfg.seed`` and the epoch)."""
    if not cfg.shuffle:
        return list(indices)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]


class EpochOrder:
    """The records of every epoch, one after another, as one stream of positions: position
    ``p`` is record ``epoch_order(indices, cfg, p // n)[p % n]`` (the current epoch's order cached)."""

    def __init__(self, indices: Sequence[int], cfg: LoaderConfig):
        self.indices, self.cfg = list(indices), cfg
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def of_epoch(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_order(self.indices, self.cfg, epoch))
        return self._cached[1]

    def record(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.indices))
        return self.of_epoch(epoch)[offset]


class LocalReader:
    """The ownership rule of one process: it opens every record it is given and builds its document."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, indices: list[int], weights: list[float] | None = None) -> list[Document | None]:
        return [self.dataset.document(i) for i in indices]


class Loader:
    """The batches of each step for this process: the assignment rule's, or, on a later pipeline
    stage, what stage 0 sends (``feed``). See the module docstring."""

    def __init__(self, assignment=None, feed=None):
        assert assignment is not None or feed is not None, "a loader reads (an assignment rule) or is fed"
        self.assignment, self.feed = assignment, feed

    @property
    def reads(self) -> bool:
        return self.assignment is not None

    @property
    def epoch(self) -> int:
        return self.assignment.epoch if self.reads else 0

    @property
    def last_report(self) -> dict | None:
        """The predicted imbalance and mixture of the last cost-balanced step (None otherwise)."""
        return getattr(self.assignment, "last_report", None)

    def next_rows(self, n: int) -> list:
        """The ``n`` batches (micro-batches) of one optimizer step."""
        if not self.reads:
            return self.feed.receive(n)
        rows = self.assignment.next_rows(n)
        return self.feed.deliver(rows) if self.feed is not None else rows

    def state_dict(self) -> dict | None:
        """The position to resume from (None on a process that does not read)."""
        return self.assignment.state_dict() if self.reads else None

    def load_state_dict(self, state: dict) -> None:
        if self.reads:
            self.assignment.load_state_dict(state)

    def restore(self, states: dict[int, dict], dp_rank: int, dp_size: int) -> bool:
        """Continue from the states of every data-parallel rank of a checkpoint (keyed by rank),
        resharded when the checkpoint had another number of ranks; returns whether it resharded."""
        if not self.reads:
            return False
        resharded = len(states) != dp_size
        if resharded:
            states = type(self.assignment).reshard_states(states, dp_size)
        self.assignment.load_state_dict(states[dp_rank])
        return resharded


__all__ = ["EpochOrder", "Loader", "LoaderConfig", "LocalReader", "epoch_order"]
