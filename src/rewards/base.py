"""One reward interface: ``score(sample, response) -> Reward(value, parts, reason)``.

``sample`` is the prompt's record (``keyetron.data.samples.Sample``): its reference answer is
``meta["answer"]`` when given, else the text of its final assistant turn (boxes, points and clip
times in the chat template's text form). ``response`` is the decoded response text, thinking
block included when the model wrote one.

Rewards never raise on a bad response: an answer that cannot be parsed scores 0 with the reason.
``score_safely`` turns a reward function that does raise into a counted, logged failure for that
sample (value 0), never a dead job. ``Composite`` weighs several rewards into one, and a
``RewardTable`` picks the composite for each data source, as a recipe names them.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from keyetron.data.render import part_text
from keyetron.data.samples import Sample

log = logging.getLogger("keyetron.rewards")


@dataclass(frozen=True)
class Reward:
    value: float
    parts: dict[str, float] = field(default_factory=dict)  # the components of a composite
    reason: str = ""  # why the value is what it is, when it is not plainly right or wrong


RewardFn = Callable[[Sample, str], Reward]

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def split_think(response: str) -> tuple[str | None, str, str | None]:
    """(reasoning or None, the answer after it, a format error or None).

    ``<think>...</think>`` must open the response and be closed; a stray tag elsewhere is an error."""
    match = _THINK.match(response)
    if match:
        reasoning, answer = match.group(1), response[match.end():]
    elif "<think>" in response:
        return None, response, "unclosed <think> block"
    else:
        reasoning, answer = None, response
    if "<think>" in answer or "</think>" in answer:
        return reasoning, answer, "a think tag after the answer began"
    return reasoning, answer, None


def answer_text(response: str) -> str:
    """The response without its thinking block and end-of-turn tokens, stripped."""
    _, answer, _ = split_think(response)
    for token in ("<|im_end|>", "<|endoftext|>"):
        answer = answer.replace(token, "")
    return answer.strip()


def reference(sample: Sample) -> str:
    """The reference answer: ``meta["answer"]``, else the text of the final assistant turn."""
    if "answer" in sample.meta:
        return str(sample.meta["answer"])
    for turn in reversed(sample.turns):
        if turn.role == "assistant":
            return "".join(part_text(p) for p in turn.parts)
    raise ValueError(f"sample {sample.sample_id} has no reference answer (meta.answer or an assistant turn)")


def score_safely(fn: RewardFn, sample: Sample, response: str, failures: Counter | None = None) -> Reward:
    """``fn(sample, response)``; if it raises, 0 with the error as the reason, counted in ``failures``
    under the function's name and logged with the sample id."""
    try:
        return fn(sample, response)
    except Exception as err:  # noqa: BLE001 -- a reward bug must not end the run
        name = getattr(fn, "name", getattr(fn, "__name__", type(fn).__name__))
        if failures is not None:
            failures[name] += 1
        log.warning("reward %s failed on sample %s: %s: %s", name, sample.sample_id, type(err).__name__, err)
        return Reward(0.0, reason=f"reward {name} failed: {type(err).__name__}: {err}")


class Composite:
    """Σ weight · reward / Σ weight; each component's value is kept in ``parts``. A failing component
    counts as 0 (``score_safely``) and its reason is kept."""

    def __init__(self, components: Mapping[str, tuple[float, RewardFn]]):
        if not components:
            raise ValueError("a composite reward needs at least one component")
        bad = {k: w for k, (w, _) in components.items() if w < 0}
        if bad or sum(w for w, _ in components.values()) <= 0:
            raise ValueError(f"reward weights must be >= 0 with a positive sum, got "
                             f"{ {k: w for k, (w, _) in components.items()} }")
        self.components = dict(components)
        self.failures: Counter = Counter()
        self.name = "+".join(self.components)

    def __call__(self, sample: Sample, response: str) -> Reward:
        total = sum(w for w, _ in self.components.values())
        parts, reasons, value = {}, [], 0.0
        for name, (weight, fn) in self.components.items():
            r = score_safely(fn, sample, response, self.failures)
            parts[name] = r.value
            value += weight * r.value
            if r.reason:
                reasons.append(f"{name}: {r.reason}")
        return Reward(value / total, parts, "; ".join(reasons))


class RewardTable:
    """The composite reward of each data source (``source -> {reward name: weight}``), built from the
    registry of named rewards; ``default`` serves sources the table does not name."""

    def __init__(self, table: Mapping[str, Mapping[str, float]], registry: Mapping[str, RewardFn],
                 default: str | None = None):
        unknown = sorted({n for weights in table.values() for n in weights} - set(registry))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(registry)}")
        if default is not None and default not in table:
            raise ValueError(f"default source {default!r} is not in the table {sorted(table)}")
        self.by_source = {src: Composite({n: (w, registry[n]) for n, w in weights.items()})
                          for src, weights in table.items()}
        self.default = default

    def __call__(self, source: str, sample: Sample, response: str) -> Reward:
        fn = self.by_source.get(source) or (self.by_source[self.default] if self.default else None)
        if fn is None:
            raise KeyError(f"no reward for data source {source!r}; the table has {sorted(self.by_source)}")
        return fn(sample, response)


__all__ = ["Composite", "Reward", "RewardFn", "RewardTable", "answer_text", "reference", "score_safely",
           "split_think"]
