"""Verifiable, rule-based rewards. Each is ``fn(sample, response) -> Reward`` (``keyetron.rewards.base``)
and scores the answer after any thinking block against the sample's reference.

- ``math``: mathematical equivalence by ``math-verify`` (``\\frac12`` = ``0.5`` = ``\\boxed{1/2}``).
- ``choice``: the option letter of a multiple-choice answer ("B", "(B)", "B. ...", "Answer: B").
- ``number``: a count or other number, written in digits or (up to twenty) in words.
- ``exact`` / ``normalised``: the text as is / case, spacing, punctuation and articles ignored.
- ``box_iou``: Keye grounding boxes (``<|box_start|>[[x1,y1,x2,y2]]<|box_end|>``, 0..1000), each
  reference box matched to one answered box by the best assignment; the mean IoU over
  max(reference boxes, answered boxes), so extra or missing boxes cost.
- ``point``: Keye points inside the reference box(es) / within 50 units of reference points.
- ``clip_iou``: temporal grounding, the IoU of ``<|clip_time_start|>[t1, t2]<|clip_time_end|>``.
- ``format``: the thinking structure the sample asks for (``think``: a closed, non-empty
  ``<think>`` block then an answer; ``no_think``: no tags; otherwise either, well formed).
- ``json``: the answer is valid JSON (bare or in one fenced ```json block).
"""
from __future__ import annotations

import itertools
import json
import re
import string

from keyetron.data.samples import Sample
from keyetron.rewards.base import Reward, answer_text, reference, split_think

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def _binary(ok: bool, reason: str = "") -> Reward:
    return Reward(1.0 if ok else 0.0, reason="" if ok else reason)


def math_reward(sample: Sample, response: str) -> Reward:
    from math_verify import parse, verify

    answer = answer_text(response)
    if not answer:
        return Reward(0.0, reason="empty answer")
    gold = parse(_as_math(reference(sample)))
    if not gold:
        raise ValueError(f"reference {reference(sample)!r} is not a mathematical answer")
    got = parse(_as_math(answer))
    if not got:
        return Reward(0.0, reason=f"no mathematical answer found in {answer[-80:]!r}")
    return _binary(bool(verify(gold, got)), f"{answer[-80:]!r} is not {reference(sample)!r}")


def _as_math(text: str) -> str:
    """math-verify reads LaTeX inside $...$ or \\boxed{}; give it bare expressions that way too."""
    return text if ("$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text) else f"${text}$"


_CHOICE = [re.compile(p, re.I) for p in (
    r"answer\s*(?:is|:)?\s*\(?([A-Z])\)?(?![A-Za-z])",
    r"^\s*\(?([A-Z])\)?(?:[.):\s]|$)",
    r"\(([A-Z])\)",
)]


def choice_reward(sample: Sample, response: str) -> Reward:
    gold = reference(sample).strip().strip("().").upper()
    answer = answer_text(response)
    for pattern in _CHOICE:
        m = pattern.search(answer)
        if m:
            got = m.group(1).upper()
            return _binary(got == gold, f"chose {got}, the answer is {gold}")
    return Reward(0.0, reason=f"no option letter in {answer[:80]!r}")


def _numbers(text: str) -> list[float]:
    found = []
    for token in re.findall(r"-?\d+(?:\.\d+)?|[A-Za-z]+", text.replace(",", "")):
        if token.lower() in _NUMBER_WORDS:
            found.append(float(_NUMBER_WORDS[token.lower()]))
        elif re.fullmatch(r"-?\d+(?:\.\d+)?", token):
            found.append(float(token))
    return found


def number_reward(sample: Sample, response: str) -> Reward:
    gold = _numbers(reference(sample))
    if len(gold) != 1:
        raise ValueError(f"reference {reference(sample)!r} is not one number")
    got = _numbers(answer_text(response))
    if not got:
        return Reward(0.0, reason=f"no number in {answer_text(response)[:80]!r}")
    return _binary(got[-1] == gold[0], f"answered {got[-1]:g}, the answer is {gold[0]:g}")


def exact_reward(sample: Sample, response: str) -> Reward:
    return _binary(answer_text(response) == reference(sample).strip(), "not the reference text")


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def normalised_reward(sample: Sample, response: str) -> Reward:
    return _binary(normalise(answer_text(response)) == normalise(reference(sample)), "not the reference text")


_BOX = re.compile(r"<\|box_start\|>\s*\[\[\s*([-\d.\s,]+?)\s*\]\]\s*<\|box_end\|>")
_POINT = re.compile(r"<\|point_start\|>\s*\[\[\s*([-\d.\s,]+?)\s*\]\]\s*<\|point_end\|>")
_CLIP = re.compile(r"<\|clip_time_start\|>\s*\[\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]\s*<\|clip_time_end\|>")


def _coords(pattern, text: str, n: int) -> tuple[list[tuple[float, ...]], int]:
    """(well-formed coordinate tuples of length n, count of malformed ones)."""
    good, bad = [], 0
    for m in pattern.finditer(text):
        try:
            values = tuple(float(v) for v in m.group(1).split(","))
        except ValueError:
            bad += 1
            continue
        if len(values) == n:
            good.append(values)
        else:
            bad += 1
    return good, bad


def box_iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3])
    bx1, by1, bx2, by2 = min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _best_assignment(gold: list, got: list, score) -> float:
    """Sum of ``score`` over the best one-to-one matching of gold and answered items."""
    if not gold or not got:
        return 0.0
    small, large = (gold, got) if len(gold) <= len(got) else (got, gold)
    flip = small is got
    if len(large) <= 7:
        return max(sum(score(*((b, a) if flip else (a, b))) for a, b in zip(small, perm))
                   for perm in itertools.permutations(large, len(small)))
    total, free = 0.0, list(large)  # greedy for many boxes
    for a in small:
        best = max(free, key=lambda b: score(*((b, a) if flip else (a, b))))
        total += score(*((best, a) if flip else (a, best)))
        free.remove(best)
    return total


def box_iou_reward(sample: Sample, response: str) -> Reward:
    gold, _ = _coords(_BOX, reference(sample), 4)
    if not gold:
        raise ValueError(f"reference {reference(sample)!r} holds no box")
    got, bad = _coords(_BOX, answer_text(response), 4)
    if not got:
        return Reward(0.0, reason="no well-formed box in the answer" + (f" ({bad} malformed)" if bad else ""))
    value = _best_assignment(gold, got, box_iou) / max(len(gold), len(got))
    return Reward(value, reason="" if len(got) == len(gold) else f"{len(got)} boxes for {len(gold)}")


def point_reward(sample: Sample, response: str) -> Reward:
    ref = reference(sample)
    boxes, _ = _coords(_BOX, ref, 4)
    points, _ = _coords(_POINT, ref, 2)
    got, bad = _coords(_POINT, answer_text(response), 2)
    if not got:
        return Reward(0.0, reason="no well-formed point in the answer" + (f" ({bad} malformed)" if bad else ""))
    if boxes:
        def hit(box, p):
            return float(min(box[0], box[2]) <= p[0] <= max(box[0], box[2]) and
                         min(box[1], box[3]) <= p[1] <= max(box[1], box[3]))
        gold = boxes
    elif points:
        def hit(q, p):
            return float((q[0] - p[0]) ** 2 + (q[1] - p[1]) ** 2 <= 50**2)
        gold = points
    else:
        raise ValueError(f"reference {ref!r} holds no box or point")
    return Reward(_best_assignment(gold, got, hit) / max(len(gold), len(got)))


def clip_iou_reward(sample: Sample, response: str) -> Reward:
    gold = _CLIP.search(reference(sample))
    if gold is None:
        raise ValueError(f"reference {reference(sample)!r} holds no clip time")
    got = _CLIP.search(answer_text(response))
    if got is None:
        return Reward(0.0, reason="no well-formed clip time in the answer")
    (g1, g2), (a1, a2) = sorted(map(float, gold.groups())), sorted(map(float, got.groups()))
    inter = max(0.0, min(g2, a2) - max(g1, a1))
    union = max(g2, a2) - min(g1, a1)
    return Reward(inter / union if union > 0 else float(g1 == a1))


def format_reward(sample: Sample, response: str) -> Reward:
    reasoning, answer, error = split_think(response)
    if error:
        return Reward(0.0, reason=error)
    if not answer_text(response):
        return Reward(0.0, reason="no answer after the thinking block" if reasoning is not None else "empty answer")
    if sample.think == "think" and (reasoning is None or not reasoning.strip()):
        return Reward(0.0, reason="think mode: the response must open with a non-empty <think> block")
    if sample.think == "no_think" and reasoning is not None:
        return Reward(0.0, reason="no_think mode: the response must not think")
    return Reward(1.0)


_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)\n```", re.S)


def json_reward(sample: Sample, response: str) -> Reward:
    answer = answer_text(response)
    fences = _FENCE.findall(answer)
    text = fences[0] if len(fences) == 1 else answer
    try:
        json.loads(text)
    except ValueError as err:
        return Reward(0.0, reason=f"not valid JSON: {err}")
    return Reward(1.0)


RULES = {
    "math": math_reward, "choice": choice_reward, "number": number_reward, "exact": exact_reward,
    "normalised": normalised_reward, "box_iou": box_iou_reward, "point": point_reward,
    "clip_iou": clip_iou_reward, "format": format_reward, "json": json_reward,
}

__all__ = ["RULES", "box_iou", "normalise"] + [f.__name__ for f in RULES.values()]
