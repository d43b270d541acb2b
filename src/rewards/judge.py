"""Rewards computed by models: a generative judge, and the interface of the reward model's score.

``JudgeReward`` asks a judge model (any keyetron model run through ``keyetron.rollout``, or any
callable that maps prompts to texts) to grade a response against the reference with a fixed
template, and parses the grade from its answer (``Score: 7`` on a 0..``scale`` scale -> 0.7). A
judgement without a parseable score is 0 with the judge's words as the reason.

``PreferenceReward`` wraps a scorer with ``score(sample, response) -> float`` (the Keye reward
model's preference score, trained in a later issue) and squashes it to (0, 1) with a logistic,
so it composes with the rule-based rewards in a ``Composite``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Protocol

from keyetron.data.samples import Part, Sample, Turn
from keyetron.rewards.base import Reward, answer_text, reference

JUDGE_TEMPLATE = (
    "You are grading an answer to a question against the reference answer.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Answer to grade: {answer}\n"
    "Reply with one line 'Score: N', N an integer from 0 (wrong) to {scale} (fully right)."
)
_SCORE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.I)

Judge = Callable[[Sequence[Sample]], list[str]]  # judge prompts -> the judge's answers


def question_text(sample: Sample) -> str:
    """The text of the sample's last user turn (its media are not shown to a text judge)."""
    for turn in reversed(sample.turns):
        if turn.role == "user":
            return " ".join(p.value for p in turn.parts if p.kind == "text").strip()
    return ""


class JudgeReward:
    """Grade by a judge model. ``judge``: judge prompts (samples) -> answers, e.g. ``engine_judge``."""

    name = "judge"

    def __init__(self, judge: Judge, template: str = JUDGE_TEMPLATE, scale: int = 10):
        if scale <= 0:
            raise ValueError(f"judge scale must be positive, got {scale}")
        self.judge, self.template, self.scale = judge, template, scale

    def prompt(self, sample: Sample, response: str) -> Sample:
        text = self.template.format(question=question_text(sample), reference=reference(sample),
                                    answer=answer_text(response), scale=self.scale)
        return Sample(f"judge:{sample.sample_id}", (Turn("user", (Part("text", text),)),), task="chat",
                      think="no_think")

    def parse(self, judged: str) -> Reward:
        m = _SCORE.search(judged)
        if m is None:
            return Reward(0.0, reason=f"the judge gave no score: {judged[:120]!r}")
        value = float(m.group(1))
        if not 0 <= value <= self.scale:
            return Reward(0.0, reason=f"the judge's score {value:g} is outside 0..{self.scale}")
        return Reward(value / self.scale)

    def __call__(self, sample: Sample, response: str) -> Reward:
        return self.parse(self.judge([self.prompt(sample, response)])[0])

    def score_batch(self, pairs: Sequence[tuple[Sample, str]]) -> list[Reward]:
        """Many (sample, response) pairs in one judge call (one batched generation)."""
        answers = self.judge([self.prompt(s, r) for s, r in pairs])
        return [self.parse(a) for a in answers]


def engine_judge(model, builder, max_new_tokens: int = 16) -> Judge:
    """A judge that decodes greedily with ``model`` through the rollout engine; ``builder`` is the
    ``DocumentBuilder`` of the judge's tokenizer and media settings."""
    from keyetron.rollout import SamplingParams, generate

    tok = builder.tok

    def judge(prompts: Sequence[Sample]) -> list[str]:
        docs = [builder.build_prompt(p) for p in prompts]
        results, _ = generate(model, docs, SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
                              stop_ids=[tok.eos_id])
        return [tok.decode([t for t in r[0].token_ids if t != tok.eos_id]) for r in results]

    return judge


class PreferenceScorer(Protocol):
    def score(self, sample: Sample, response: str) -> float: ...


class PreferenceReward:
    """The reward model's preference score s, as the reward sigmoid(s / temperature)."""

    name = "reward_model"

    def __init__(self, scorer: PreferenceScorer, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.scorer, self.temperature = scorer, temperature

    def __call__(self, sample: Sample, response: str) -> Reward:
        s = float(self.scorer.score(sample, response))
        if not math.isfinite(s):
            return Reward(0.0, reason=f"the reward model's score is {s}")
        z = s / self.temperature
        value = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow
        return Reward(value, parts={"score": s})


__all__ = ["JUDGE_TEMPLATE", "JudgeReward", "PreferenceReward", "PreferenceScorer", "engine_judge", "question_text"]
