"""Held-out exact-match evaluation: greedy answers compared with ``meta.answer``.

Every eval sample ends with an assistant turn holding the answer and carries
``meta: {"answer": ..., "question_type": ...}``. The model sees the sample without that
turn (plus the assistant header) and decodes greedily until ``<|im_end|>`` (``keyetron.rollout``,
with its KV cache). The report
compares accuracy with two baselines computed from the same split: always answering the
most common answer overall, and always answering the most common answer of the
question's type (the stronger one).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from keyetron.backend.device import autocast
from keyetron.data.dataset import SampleDataset
from keyetron.rollout import SamplingParams, generate


@dataclass
class EvalReport:
    samples: int
    correct: int
    majority_baseline: float  # most common answer overall
    per_type_majority_baseline: float  # most common answer of each question type
    by_type: dict[str, tuple[int, int]] = field(default_factory=dict)  # type -> (correct, total)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (sample id, expected, generated)
    skipped: int = 0

    @property
    def exact_match(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def metrics(self) -> dict[str, float]:
        out = {"eval/exact_match": self.exact_match, "eval/majority_baseline": self.majority_baseline,
               "eval/per_type_majority_baseline": self.per_type_majority_baseline, "eval/samples": self.samples}
        for qtype, (ok, n) in sorted(self.by_type.items()):
            out[f"eval/exact_match/{qtype}"] = ok / n
        return out

    def summary(self) -> str:
        lines = [f"eval exact match {self.exact_match:.1%} ({self.correct}/{self.samples}); majority-answer baseline "
                 f"{self.majority_baseline:.1%}, per-type majority baseline {self.per_type_majority_baseline:.1%}"]
        lines += [f"  {t:<24} {ok}/{n} = {ok / n:.1%}" for t, (ok, n) in sorted(self.by_type.items())]
        return "\n".join(lines)


def baselines(answers: list[tuple[str, str]]) -> tuple[float, float]:
    """(overall majority, per-type majority) accuracy for (question_type, answer) pairs."""
    if not answers:
        return 0.0, 0.0
    overall = Counter(a for _, a in answers).most_common(1)[0][1] / len(answers)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for qtype, a in answers:
        by_type[qtype][a] += 1
    per_type = sum(c.most_common(1)[0][1] for c in by_type.values()) / len(answers)
    return overall, per_type


def evaluate(model, dataset: SampleDataset, *, device, dtype: torch.dtype | None, max_new_tokens: int,
             batch_size: int, max_samples: int = 0) -> EvalReport:
    """Exact match of greedy answers on ``dataset`` (skipped samples are counted, not scored)."""
    tok = dataset.builder.tok
    n = len(dataset) if max_samples <= 0 else min(max_samples, len(dataset))
    items = []  # (sample, prompt document)
    skipped_before = dataset.skips.total
    for i in range(n):
        sample = dataset.sample(i)
        if sample is None:
            continue
        if not isinstance(sample.meta.get("answer"), str):
            dataset.skips.add("bad_eval_sample", sample.sample_id, f"eval record {i}", "meta.answer (a string) is missing")
            continue
        doc = dataset.document(i, prompt_only=True)
        if doc is not None:
            items.append((sample, doc))
    was_training = model.training
    model.eval()
    generated = []
    greedy = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    with autocast(device, dtype):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results, _ = generate(model, [d for _, d in chunk], greedy, stop_ids=[tok.eos_id], device=device)
            generated += [r[0].token_ids for r in results]
    model.train(was_training)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    answers, examples, correct = [], [], 0
    for (sample, _), ids in zip(items, generated):
        text = tok.decode([t for t in ids if t != tok.eos_id]).strip()
        expected = sample.meta["answer"].strip()
        qtype = str(sample.meta.get("question_type", sample.task))
        ok = text == expected
        correct += ok
        by_type[qtype][0] += ok
        by_type[qtype][1] += 1
        answers.append((qtype, expected))
        if len(examples) < 12:
            examples.append((sample.sample_id, expected, text))
    overall, per_type = baselines(answers)
    return EvalReport(len(items), correct, overall, per_type, {k: tuple(v) for k, v in by_type.items()}, examples,
                      dataset.skips.total - skipped_before)


__all__ = ["EvalReport", "baselines", "evaluate"]
