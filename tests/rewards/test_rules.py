"""Golden cases of the rule-based rewards, the awkward ones included, and the failure rules."""
from __future__ import annotations

from collections import Counter

import pytest

from keyetron.data.samples import parse_sample
from keyetron.rewards import RULES, Composite, Reward, RewardTable, answer_text, score_safely, split_think


def qa(answer, think=None, **meta):
    raw = {"id": "s1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
           "meta": meta}
    if think:
        raw["think"] = think
    return parse_sample(raw)


def box(x1, y1, x2, y2, ref=None):
    part = {"box": [x1, y1, x2, y2]}
    if ref:
        part["ref"] = ref
    return part


def score(name, sample, response):
    return RULES[name](sample, response)


@pytest.mark.parametrize("gold, response, value", [
    ("0.5", "\\frac12", 1.0),
    ("0.5", "The answer is $\\frac{1}{2}$.", 1.0),
    ("\\frac{1}{2}", "<think>\nhalf of one\n</think>\n\n\\boxed{0.5}", 1.0),
    ("2", "\\boxed{1+1}", 1.0),
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("0.5", "0.25", 0.0),
    ("3", "", 0.0),
    ("3", "I do not know", 0.0),
])
def test_math_answers_are_compared_by_value(gold, response, value):
    assert score("math", qa(gold), response).value == value


@pytest.mark.parametrize("response, value", [
    ("B", 1.0), ("(B)", 1.0), ("B. Paris", 1.0), ("The answer is B", 1.0), ("Answer: (b)", 1.0),
    ("<think>\nA is wrong, so\n</think>\n\nB", 1.0), ("C", 0.0), ("Paris", 0.0),
])
def test_multiple_choice_reads_the_option_letter(response, value):
    r = score("choice", qa("B"), response)
    assert r.value == value
    if response == "Paris":
        assert "no option letter" in r.reason


@pytest.mark.parametrize("response, value", [("3", 1.0), ("three", 1.0), ("There are 3 cats.", 1.0),
                                             ("I count two, no, three", 1.0), ("4", 0.0), ("many", 0.0)])
def test_counts_in_digits_or_words(response, value):
    assert score("number", qa("3"), response).value == value


def test_exact_and_normalised_text():
    s = qa("The Eiffel Tower")
    assert score("exact", s, "The Eiffel Tower<|im_end|>").value == 1.0
    assert score("exact", s, "the eiffel tower").value == 0.0
    assert score("normalised", s, "eiffel tower.").value == 1.0
    assert score("normalised", s, "the tower").value == 0.0


def test_boxes_match_in_any_order_and_extra_or_missing_boxes_cost():
    s = qa([box(0, 0, 100, 100, "cat"), box(500, 500, 700, 700, "dog")])
    both = ("<|object_ref_start|>dog<|object_ref_end|><|box_start|>[[500,500,700,700]]<|box_end|> and "
            "<|box_start|>[[0,0,100,100]]<|box_end|>")
    assert score("box_iou", s, both).value == pytest.approx(1.0)
    one = "<|box_start|>[[0,0,100,100]]<|box_end|>"
    assert score("box_iou", s, one).value == pytest.approx(0.5)  # one of two
    half = "<|box_start|>[[0,0,100,50]]<|box_end|><|box_start|>[[500,500,700,700]]<|box_end|>"
    assert score("box_iou", s, half).value == pytest.approx((0.5 + 1.0) / 2)
    extra = both + "<|box_start|>[[900,900,950,950]]<|box_end|>"
    assert score("box_iou", s, extra).value == pytest.approx(2 / 3)
    swapped = "<|box_start|>[[100,100,0,0]]<|box_end|><|box_start|>[[700,700,500,500]]<|box_end|>"
    assert score("box_iou", s, swapped).value == pytest.approx(1.0)  # corners in either order


def test_malformed_boxes_score_zero_with_the_reason():
    s = qa([box(0, 0, 100, 100)])
    r = score("box_iou", s, "<|box_start|>[[0,0,100]]<|box_end|>")
    assert r.value == 0.0 and "1 malformed" in r.reason
    assert score("box_iou", s, "somewhere top left").value == 0.0


def test_points_inside_the_reference_box():
    s = qa([box(0, 0, 100, 100)])
    assert score("point", s, "<|point_start|>[[50,50]]<|point_end|>").value == 1.0
    assert score("point", s, "<|point_start|>[[150,50]]<|point_end|>").value == 0.0


def test_clip_time_iou():
    s = qa([{"clip_time": [2.0, 6.0]}])
    assert score("clip_iou", s, "<|clip_time_start|>[2.0, 6.0]<|clip_time_end|>").value == pytest.approx(1.0)
    assert score("clip_iou", s, "<|clip_time_start|>[4.0, 8.0]<|clip_time_end|>").value == pytest.approx(2 / 6)
    assert score("clip_iou", s, "<|clip_time_start|>[6.0, 4.0]<|clip_time_end|>").value == pytest.approx(2 / 4)
    assert score("clip_iou", s, "from 2 to 6").value == 0.0


@pytest.mark.parametrize("think, response, value, reason", [
    ("think", "<think>\nlet me see\n</think>\n\nB", 1.0, ""),
    ("think", "<think>\n\n</think>\n\nB", 0.0, "non-empty"),
    ("think", "<think>\nlet me see and never stop", 0.0, "unclosed"),
    ("think", "B", 0.0, "non-empty <think>"),
    ("no_think", "B", 1.0, ""),
    ("no_think", "<think>\nhmm\n</think>\n\nB", 0.0, "must not think"),
    (None, "<think>\nhmm\n</think>\n\nB", 1.0, ""),
    (None, "B", 1.0, ""),
    (None, "<think>\nhmm\n</think>\n\n", 0.0, "no answer"),
    (None, "B <think>later</think>", 0.0, "unclosed"),
])
def test_the_thinking_format_the_sample_asks_for(think, response, value, reason):
    r = score("format", qa("B", think=think), response)
    assert r.value == value and reason in r.reason


def test_split_think_and_answer_text():
    assert split_think("<think>\nwhy\n</think>\n\n42") == ("\nwhy\n", "42", None)
    assert answer_text("<think>x</think>\n\n 42 <|im_end|>") == "42"
    assert split_think("42 </think>")[2] == "a think tag after the answer began"


def test_json_validity_bare_or_fenced():
    s = qa("{}")
    assert score("json", s, '{"a": [1, 2]}').value == 1.0
    assert score("json", s, 'Here:\n```json\n{"a": 1}\n```').value == 1.0
    r = score("json", s, '{"a": 1,}')
    assert r.value == 0.0 and "not valid JSON" in r.reason


def test_a_composite_weighs_its_parts_and_a_raising_reward_is_a_counted_failure(caplog):
    def broken(sample, response):
        raise RuntimeError("judge unreachable")

    broken.name = "judge"
    comp = Composite({"number": (3.0, RULES["number"]), "format": (1.0, RULES["format"]), "judge": (1.0, broken)})
    r = comp(qa("3", think="think"), "<think>\ncount them\n</think>\n\n3")
    assert r.parts == {"number": 1.0, "format": 1.0, "judge": 0.0}
    assert r.value == pytest.approx(4 / 5)
    assert "judge unreachable" in r.reason and comp.failures == Counter(judge=1)
    assert "s1" in caplog.text  # logged with the sample id


def test_score_safely_and_a_reference_that_cannot_be_used():
    failures = Counter()
    r = score_safely(RULES["box_iou"], qa("no box here"), "<|box_start|>[[0,0,1,1]]<|box_end|>", failures)
    assert r == Reward(0.0, reason=r.reason) and "holds no box" in r.reason and failures["box_iou_reward"] == 1


def test_a_reward_table_picks_the_composite_per_source_and_refuses_unknown_names():
    table = RewardTable({"math": {"math": 0.9, "format": 0.1}, "chat": {"normalised": 1.0}}, RULES, default="chat")
    assert table("math", qa("0.5"), "\\frac12").value == pytest.approx(1.0)
    assert table("unknown-source", qa("Paris"), "paris").value == 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        RewardTable({"math": {"maths": 1.0}}, RULES)
    with pytest.raises(ValueError, match="weights"):
        RewardTable({"math": {"math": -1.0}}, RULES)
