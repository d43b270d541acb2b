"""Model-based rewards: the generative judge's prompt and parsing, through the rollout engine, and
the reward model's score as a reward."""
from __future__ import annotations

import math

import pytest

from keyetron.data.samples import parse_sample
from keyetron.rewards import RULES, Composite
from keyetron.rewards.judge import JudgeReward, PreferenceReward, engine_judge


def qa(answer="Paris"):
    return parse_sample({"id": "q1", "messages": [{"role": "user", "content": "Capital of France?"},
                                                  {"role": "assistant", "content": answer}]})


def test_the_judge_sees_question_reference_and_answer_and_its_score_is_parsed():
    seen = []

    def judge(prompts):
        seen.extend(prompts)
        return ["Score: 7"]

    r = JudgeReward(judge)(qa(), "<think>\nhmm\n</think>\n\nIt is Paris.")
    assert r.value == pytest.approx(0.7)
    text = seen[0].turns[0].parts[0].value
    assert "Capital of France?" in text and "Reference answer: Paris" in text and "It is Paris." in text
    assert "<think>" not in text and seen[0].think == "no_think"


@pytest.mark.parametrize("judged, value, reason", [
    ("score = 10", 1.0, ""), ("Score: 0", 0.0, ""), ("I like it", 0.0, "no score"),
    ("Score: 11", 0.0, "outside 0..10"),
])
def test_judge_answers_without_a_usable_score_give_zero_with_the_reason(judged, value, reason):
    r = JudgeReward(lambda prompts: [judged])(qa(), "Paris")
    assert r.value == value and reason in r.reason


def test_a_judge_that_fails_is_a_counted_failure_inside_a_composite():
    def down(prompts):
        raise ConnectionError("judge server unreachable")

    comp = Composite({"normalised": (1.0, RULES["normalised"]), "judge": (1.0, JudgeReward(down))})
    r = comp(qa(), "paris")
    assert r.parts == {"normalised": 1.0, "judge": 0.0} and comp.failures["judge"] == 1
    assert "unreachable" in r.reason


def test_a_keyetron_model_judges_through_the_rollout_engine(tiny_cfg):
    from keyetron.data.dataset import DocumentBuilder
    from keyetron.data.tokenizer import KeyeTokenizer
    from keyetron.model import build_model

    model = build_model(tiny_cfg, seed=0).eval()
    judge = JudgeReward(engine_judge(model, DocumentBuilder(tiny_cfg, KeyeTokenizer(tiny_cfg.tokenizer)),
                                     max_new_tokens=4))
    rewards = judge.score_batch([(qa(), "Paris"), (qa(), "Lyon")])
    assert len(rewards) == 2  # a random model writes no score: 0 with its words as the reason
    assert all(r.value == 0.0 and "no score" in r.reason for r in rewards)


def test_the_reward_model_score_becomes_a_bounded_reward():
    class Scorer:
        def __init__(self, s):
            self.s = s

        def score(self, sample, response):
            return self.s

    assert PreferenceReward(Scorer(0.0))(qa(), "x").value == 0.5
    assert PreferenceReward(Scorer(2.0), temperature=2.0)(qa(), "x").value == pytest.approx(1 / (1 + math.exp(-1)))
    assert PreferenceReward(Scorer(-1e6))(qa(), "x").value == 0.0  # no overflow
    r = PreferenceReward(Scorer(float("nan")))(qa(), "x")
    assert r.value == 0.0 and "nan" in r.reason
