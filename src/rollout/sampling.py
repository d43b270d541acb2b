"""Choosing the next token: greedy, temperature, top-k and top-p, reproducible per sequence.

Every sequence owns a ``torch.Generator`` seeded from ``(seed, prompt key, sample index)``
(``sequence_seed``) and draws exactly one uniform number per generated token, so a response
depends only on its own prompt, sample index, seed and the model: never on which other
prompts share the batch, their lengths or when they stop.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 keep the whole vocabulary."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sequence_seed(seed: int, prompt_key: str, sample_index: int) -> int:
    """A 63-bit seed for one response: the same triple gives the same seed on every machine."""
    digest = hashlib.sha256(f"{seed}\0{prompt_key}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) logits -> (V,) probabilities of the sampling distribution (temperature, then top-k,
    then top-p over what is left: the smallest set of most likely tokens whose mass reaches top_p)."""
    z = logits.double() / params.temperature
    if 0 < params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the strictly more likely tokens
        drop = order[before >= params.top_p]
        probs = probs.index_fill(0, drop, 0.0)
        probs = probs / probs.sum()
    return probs


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """The next token of one sequence. Sampling inverts the CDF at one uniform draw of ``gen``
    (ties in order broken by vocabulary id), so the choice is a pure function of the logits and
    the generator's state."""
    if params.greedy:
        return int(logits.argmax())
    probs = sampling_probs(logits, params)
    u = torch.rand((), generator=gen, dtype=torch.float64)
    cdf = probs.cumsum(0)
    index = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    index = min(index, probs.numel() - 1)
    while probs[index] == 0:  # u landed on the edge of a removed token's zero-width interval
        index -= 1
    return index


__all__ = ["SamplingParams", "choose", "sampling_probs", "sequence_seed"]
