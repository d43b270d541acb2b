"""Next-token cross-entropy over the tokens that carry a target (pre-training stages 1-3, SFT)."""
from __future__ import annotations

from keyetron.objectives.base import Objective, ObjectiveLoss


class LanguageModelObjective(Objective):
    """Summed cross-entropy of every target token; normalised by the step's loss tokens, so
    every loss token weighs the same however the rows were filled and split."""

    name = "lm"
    unit = "loss_tokens"

    def count(self, batch) -> int:
        return batch.num_loss_tokens

    def forward(self, output, batch) -> ObjectiveLoss:
        logprobs = output.token_logprobs()
        return ObjectiveLoss(-logprobs.sum(), logprobs.numel())


__all__ = ["LanguageModelObjective"]
