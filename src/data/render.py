"""Sample -> token ids and loss mask, in Keye-VL-1.5's token layout.

Text goes through the Qwen3 chat template. Each image and video is first written as one
placeholder pad token inside ``<|vision_start|> ... <|vision_end|>`` and expanded after
tokenization into its real ids (n image pads; or per frame ``<|frame|>``, the timestamp
text, and the frame's pads, fast frames wrapped in ``<|fast_start|> ... <|fast_end|>``),
so the tokenizer never scans tens of thousands of pad tokens and the loss mask stays
aligned. Visual tokens, frame markers and timestamps are never trained.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from keyetron.data.samples import Part, Sample, SampleError
from keyetron.data.tokenizer import KeyeTokenizer

VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|frame|>",
                  "<|fast_start|>", "<|fast_end|>")


@dataclass(frozen=True)
class VideoLayout:
    """What the LLM sees of one video: per sampled frame its type, timestamp and token count."""

    timestamps: tuple[float, ...]
    frame_types: tuple[int, ...]  # 0 slow, 1 fast
    slow_tokens: int  # LLM tokens of a slow frame (after the 2x2 merge)
    fast_tokens: int


def format_seconds(t: float) -> str:
    return f"{t:.1f}"


def part_text(part: Part) -> str:
    """The text form of a part; images and videos become one placeholder pad each."""
    if part.kind == "text":
        return part.value
    if part.kind == "image":
        return "<|vision_start|><|image_pad|><|vision_end|>"
    if part.kind == "video":
        return "<|vision_start|><|video_pad|><|vision_end|>"
    ref = f"<|object_ref_start|>{part.ref}<|object_ref_end|>" if part.ref else ""
    if part.kind == "box":
        return ref + "<|box_start|>[[{},{},{},{}]]<|box_end|>".format(*part.value)
    if part.kind == "point":
        return ref + "<|point_start|>[[{},{}]]<|point_end|>".format(*part.value)
    if part.kind == "polygon":
        return ref + "<|polygon_start|>[" + ",".join(f"[{x},{y}]" for x, y in part.value) + "]<|polygon_end|>"
    if part.kind == "clip_time":
        return f"<|clip_time_start|>[{format_seconds(part.value[0])}, {format_seconds(part.value[1])}]<|clip_time_end|>"
    if part.kind == "ocr_text":
        return f"<|ocr_text_start|>{part.value}<|ocr_text_end|>"
    raise AssertionError(part.kind)


def video_token_ids(tok: KeyeTokenizer, layout: VideoLayout) -> list[int]:
    """The ids between ``<|vision_start|>`` and ``<|vision_end|>`` of one Slow-Fast video."""
    frame, pad = tok.token_id("<|frame|>"), tok.token_id("<|video_pad|>")
    fast_start, fast_end = tok.token_id("<|fast_start|>"), tok.token_id("<|fast_end|>")
    ids: list[int] = []
    for ts, kind in zip(layout.timestamps, layout.frame_types):
        ids.append(frame)
        ids += tok.encode(format_seconds(ts))
        if kind == 0:
            ids += [pad] * layout.slow_tokens
        else:
            ids += [fast_start] + [pad] * layout.fast_tokens + [fast_end]
    return ids


def _check_text(sample: Sample) -> None:
    for t in sample.turns:
        for p in t.parts:
            if p.kind in ("text", "ocr_text") and any(m in p.value for m in VISION_MARKERS):
                raise SampleError(sample.sample_id, "text contains a vision marker token (e.g. <|image_pad|>); "
                                                    "use an {\"image\": ...} or {\"video\": ...} part instead")


def _messages(sample: Sample) -> list[dict]:
    messages = [{"role": t.role, "content": "".join(part_text(p) for p in t.parts)} for t in sample.turns]
    if sample.think:  # Qwen3's soft switch on the last user turn
        for m in reversed(messages):
            if m["role"] == "user":
                m["content"] += f" /{sample.think}"
                break
    return messages


def prompt_of(sample: Sample) -> Sample:
    """``sample`` without its final assistant turn: what a model is given at evaluation."""
    if len(sample.turns) < 2 or sample.turns[-1].role != "assistant":
        raise SampleError(sample.sample_id, "an evaluation sample ends with the assistant turn holding the answer")
    return replace(sample, turns=sample.turns[:-1])


def render_sample(sample: Sample, tok: KeyeTokenizer, visual: list[list[int] | VideoLayout | int],
                  generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of ``sample``.

    ``visual`` has one entry per image/video part in order: an int (LLM tokens of an
    image) or a VideoLayout. Plain-text samples (``loss: all`` with one text turn) are
    rendered without the chat template and end with ``<|endoftext|>``. With
    ``generation_prompt`` the sample is rendered as a prompt (pass ``prompt_of(sample)``):
    the assistant header follows, with an empty thinking block unless the sample asks to think.
    """
    _check_text(sample)
    media = sample.media
    if len(visual) != len(media):
        raise SampleError(sample.sample_id, f"{len(media)} image/video parts but {len(visual)} visual inputs")
    if not generation_prompt and sample.task == "text" and sample.loss == "all" and len(sample.turns) == 1 and not media:
        ids = tok.encode("".join(part_text(p) for p in sample.turns[0].parts)) + [tok.pad_id]
        return ids, [True] * len(ids)
    enc = tok.encode_chat(_messages(sample), add_generation_prompt=generation_prompt,
                          enable_thinking=sample.think == "think" or not generation_prompt)
    mask = enc.assistant_mask if sample.loss == "assistant" else [True] * len(enc.ids)
    image_pad, video_pad = tok.token_id("<|image_pad|>"), tok.token_id("<|video_pad|>")
    ids_out: list[int] = []
    mask_out: list[bool] = []
    slots = iter(zip(media, visual))
    for tid, trained in zip(enc.ids, mask):
        if tid in (image_pad, video_pad):
            part, item = next(slots)
            if part.kind == "image":
                if not isinstance(item, int) or item <= 0:
                    raise SampleError(sample.sample_id, f"image {part.value}: expected a positive token count, got {item!r}")
                expanded = [image_pad] * item
            else:
                if not isinstance(item, VideoLayout):
                    raise SampleError(sample.sample_id, f"video {part.value}: expected a VideoLayout, got {type(item).__name__}")
                expanded = video_token_ids(tok, item)
            ids_out += expanded
            mask_out += [False] * len(expanded)
        else:
            ids_out.append(tid)
            mask_out.append(trained)
    return ids_out, mask_out
