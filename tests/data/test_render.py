"""Samples -> Keye-VL-1.5 token layout with the right loss mask; malformed samples name id and field."""
import pytest

from keyetron.data.render import VideoLayout, render_sample, video_token_ids
from keyetron.data.samples import SampleError, parse_sample
from keyetron.data.tokenizer import KeyeTokenizer


@pytest.fixture(scope="module")
def tok():
    return KeyeTokenizer()


def trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_caption_with_image_expands_pads_and_trains_the_answer_only(tok, tmp_path):
    s = parse_sample({"id": "c1", "task": "caption", "messages": [
        {"role": "user", "content": [{"image": "a.png"}, {"text": "Describe the image."}]},
        {"role": "assistant", "content": "A red square."}]}, root=tmp_path)
    assert s.media[0].value == tmp_path / "a.png"
    ids, mask = render_sample(s, tok, [6])
    text = tok.decode(ids)
    assert "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>Describe the image." in text
    assert trained_text(tok, ids, mask) == "<think>\n\n</think>\n\nA red square.<|im_end|>"


def test_slow_fast_video_layout(tok):
    layout = VideoLayout(timestamps=(0.0, 0.5, 12.5), frame_types=(0, 1, 0), slow_tokens=4, fast_tokens=2)
    text = tok.decode(video_token_ids(tok, layout))
    assert text == ("<|frame|>0.0" + "<|video_pad|>" * 4
                    + "<|frame|>0.5<|fast_start|>" + "<|video_pad|>" * 2 + "<|fast_end|>"
                    + "<|frame|>12.5" + "<|video_pad|>" * 4)
    s = parse_sample({"id": "v", "task": "video", "messages": [
        {"role": "user", "content": [{"video": "/x.mp4"}, "When does the ball appear?"]},
        {"role": "assistant", "content": [{"clip_time": [0.5, 12.5]}]}]})
    ids, mask = render_sample(s, tok, [layout])
    assert tok.decode(ids).count("<|video_pad|>") == 10
    assert "<|clip_time_start|>[0.5, 12.5]<|clip_time_end|>" in trained_text(tok, ids, mask)


def test_grounding_parts_render_with_their_tokens(tok):
    s = parse_sample({"id": "g", "task": "grounding", "loss": "all", "messages": [
        {"role": "user", "content": [{"image": "i.png"}, "Find the cat."]},
        {"role": "assistant", "content": [{"box": [10, 20, 300, 400], "ref": "cat"}, " and ",
                                          {"point": [5, 6]}, {"polygon": [[1, 2], [3, 4], [5, 6]]},
                                          {"ocr_text": "EXIT"}]}]})
    ids, mask = render_sample(s, tok, [4])
    text = tok.decode(ids)
    assert "<|object_ref_start|>cat<|object_ref_end|><|box_start|>[[10,20,300,400]]<|box_end|>" in text
    assert "<|point_start|>[[5,6]]<|point_end|><|polygon_start|>[[1,2],[3,4],[5,6]]<|polygon_end|>" in text
    assert "<|ocr_text_start|>EXIT<|ocr_text_end|>" in text
    # loss "all": everything but the image pads is trained
    assert sum(not m for m in mask) == 4


def test_plain_text_is_trained_whole_and_ends_with_endoftext(tok):
    ids, mask = render_sample(parse_sample({"id": "t", "text": "Hello world."}), tok, [])
    assert tok.decode(ids) == "Hello world.<|endoftext|>" and all(mask)


def test_think_modes_use_the_soft_switch(tok):
    base = {"id": "r", "messages": [{"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]}
    ids, mask = render_sample(parse_sample({**base, "think": "think"}), tok, [])
    assert "2+2? /think<|im_end|>" in tok.decode(ids)
    assert trained_text(tok, ids, mask) == "<think>\nadd\n</think>\n\n4<|im_end|>"
    ids, _ = render_sample(parse_sample({**base, "think": "no_think"}), tok, [])
    assert "2+2? /no_think" in tok.decode(ids)


@pytest.mark.parametrize("raw,match", [
    ({"task": "text", "text": "x"}, r"<line 3>: field 'id' is required"),
    ({"id": "a", "text": "x", "colour": 1}, r"sample a: unknown field\(s\) \['colour'\]"),
    ({"id": "a", "task": "poetry", "text": "x"}, r"sample a: field 'task': 'poetry'"),
    ({"id": "a", "messages": [{"role": "bot", "content": "x"}]}, r"sample a: messages\[0\]: expected"),
    ({"id": "a", "messages": [{"role": "user", "content": [{"image": 3}]}, {"role": "assistant", "content": "y"}]},
     r"messages\[0\].content\[0\].image: expected a file path"),
    ({"id": "a", "messages": [{"role": "assistant", "content": [{"box": [1, 2, 3, 4000]}]}]}, r"\[0, 1000\]"),
    ({"id": "a", "messages": [{"role": "assistant", "content": [{"box": [9, 2, 3, 4]}]}]}, r"x1 <= x2"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}]}, r"no assistant turn"),
    ({"id": "a", "messages": [{"role": "assistant", "content": [{"clip_time": [5, 1]}]}]}, r"clip_time"),
    ("not an object", r"<line 3>: expected a JSON object"),
])
def test_malformed_samples_name_the_sample_and_field(raw, match):
    with pytest.raises(SampleError, match=match):
        parse_sample(raw, line=3)


def test_vision_markers_in_text_and_count_mismatch_are_refused(tok):
    s = parse_sample({"id": "m", "messages": [{"role": "user", "content": "look <|image_pad|>"},
                                              {"role": "assistant", "content": "ok"}]})
    with pytest.raises(SampleError, match="sample m: text contains a vision marker"):
        render_sample(s, tok, [])
    s = parse_sample({"id": "n", "messages": [{"role": "user", "content": [{"image": "a.png"}]},
                                              {"role": "assistant", "content": "ok"}]})
    with pytest.raises(SampleError, match="1 image/video parts but 0 visual inputs"):
        render_sample(s, tok, [])
