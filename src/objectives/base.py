"""What a training objective is.

An ``Objective`` is an ``nn.Module`` (it may own parameters: a text tower, a value head;
they are trained and checkpointed with the model) with two methods:

- ``count(batch) -> int``: how many units (loss tokens, pairs, sequences) a whole batch
  holds. The engine sums it over the step's batches and data-parallel ranks *before* any
  forward and divides every rank's summed loss by that global count, so the gradient is the
  single-process gradient in every layout.
- ``forward(output, batch) -> ObjectiveLoss``: the loss of this rank's part of the batch,
  summed (not averaged) over its units. ``output`` is the model's ``ModelOutput``; ``batch``
  is the batch this rank's model saw (under context parallelism, its slice of a row).

Rules that keep an objective correct under every layout, with no code in ``keyetron.parallel``:

- Work from ``output`` (hidden states of the tokens with a target, their targets, documents,
  and ``output.head`` for log-probabilities: vocabulary-parallel under tensor parallelism).
  Every tensor-parallel rank gets the same values; the engine counts the loss once per
  tensor-parallel group.
- Token-level losses: sum over the tokens of ``output``; each token is on exactly one
  context-parallel rank.
- Sequence-level losses: sum per document with ``output.document_sums`` (whole documents on
  every rank) and add each document's loss only where ``output.counted_documents()`` is set.
- Collectives of its own (contrastive negatives from other data-parallel ranks) go through
  process groups the objective was given; the engine calls ``forward`` on every rank of a
  step in the same order, once per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ObjectiveLoss:
    """A summed loss, the units it covers on this rank, and summed extras worth logging."""

    loss_sum: torch.Tensor  # scalar
    count: int | torch.Tensor  # units in the sum on this rank
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # ``metric_names``: summed, logged per unit


class Objective(nn.Module):
    """Base class: see the module docstring."""

    name = "objective"
    unit = "units"  # what ``count`` counts, for metric names (train/<unit>, perf/<unit>_per_s)
    metric_names: tuple[str, ...] = ()  # extras every ``forward`` returns in ``ObjectiveLoss.metrics``
    collective = False  # forward runs collectives over the data-parallel ranks: every rank needs a batch

    def count(self, batch) -> int:
        raise NotImplementedError

    def forward(self, output, batch) -> ObjectiveLoss:
        raise NotImplementedError


__all__ = ["Objective", "ObjectiveLoss"]
