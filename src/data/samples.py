"""The sample format: one JSON object per line of a JSONL manifest.

Every sample is a conversation: ``messages`` is a list of turns, each with a ``role``
(system / user / assistant) and ``content``, a string or a list of parts:

    {"text": "..."}                           plain text
    {"image": "path.png"}                     an image (path relative to the manifest)
    {"video": "clip.mp4"}                     a video, Slow-Fast encoded
    {"box": [x1, y1, x2, y2], "ref": "cat"}   grounding box, integers in [0, 1000]
    {"point": [x, y]} / {"polygon": [[x, y], ...]}  grounding point / polygon
    {"clip_time": [t1, t2]}                   temporal grounding, seconds
    {"ocr_text": "..."}                       OCR text span

Optional fields: ``id`` (required, unique), ``task`` (caption, ocr, vqa, grounding,
interleaved, video, temporal_grounding, text, chat; informational), ``think``
(``think`` / ``no_think``, for chat samples), ``loss`` (``all`` trains every text token,
as pre-training does; ``assistant`` trains assistant turns only, as SFT does). A
pre-training text sample may be given as ``{"id": ..., "text": "..."}``.

Anything malformed raises ``SampleError`` naming the sample id (or line) and the field,
so the loader can count and log the skip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
TASKS = ("caption", "ocr", "vqa", "grounding", "interleaved", "video", "temporal_grounding", "text", "chat")
PART_KINDS = ("text", "image", "video", "box", "point", "polygon", "clip_time", "ocr_text")


class SampleError(ValueError):
    """A sample that cannot be used; ``sample_id`` and ``reason`` go into the skip log."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


@dataclass(frozen=True)
class Part:
    kind: str  # one of PART_KINDS
    value: Any  # str for text/ocr_text, Path for image/video, numbers for grounding
    ref: str | None = None  # the referred object of a box / point / polygon


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Sample:
    sample_id: str
    turns: tuple[Turn, ...]
    task: str = "chat"
    loss: str = "assistant"  # "all" | "assistant"
    think: str | None = None  # None | "think" | "no_think"
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def media(self) -> list[Part]:
        return [p for t in self.turns for p in t.parts if p.kind in ("image", "video")]


def _coords(sample_id: str, where: str, value: Any, n: int | None) -> tuple[int, ...]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise SampleError(sample_id, f"{where}: expected a list of {n or 'some'} integers in [0, 1000], got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
            raise SampleError(sample_id, f"{where}: coordinates are integers normalised to [0, 1000], got {value!r}")
    return tuple(value)


def _part(sample_id: str, where: str, raw: Any, root: Path) -> Part:
    if isinstance(raw, str):
        return Part("text", raw)
    if not isinstance(raw, dict):
        raise SampleError(sample_id, f"{where}: a content part is a string or an object, got {type(raw).__name__}")
    kinds = [k for k in raw if k in PART_KINDS]
    extra = sorted(set(raw) - set(PART_KINDS) - {"ref"})
    if len(kinds) != 1 or extra:
        raise SampleError(sample_id, f"{where}: a part has exactly one of {list(PART_KINDS)} (plus 'ref' for grounding), got keys {sorted(raw)}")
    kind, value = kinds[0], raw[kinds[0]]
    ref = raw.get("ref")
    if ref is not None and (kind not in ("box", "point", "polygon") or not isinstance(ref, str)):
        raise SampleError(sample_id, f"{where}: 'ref' is a string and only goes with box, point or polygon")
    if kind in ("text", "ocr_text"):
        if not isinstance(value, str):
            raise SampleError(sample_id, f"{where}.{kind}: expected a string, got {type(value).__name__}")
        return Part(kind, value)
    if kind in ("image", "video"):
        if not isinstance(value, str) or not value:
            raise SampleError(sample_id, f"{where}.{kind}: expected a file path string, got {value!r}")
        path = Path(value)
        return Part(kind, path if path.is_absolute() else root / path)
    if kind == "box":
        box = _coords(sample_id, f"{where}.box", value, 4)
        if box[0] > box[2] or box[1] > box[3]:
            raise SampleError(sample_id, f"{where}.box: expected [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {list(box)}")
        return Part(kind, box, ref)
    if kind == "point":
        return Part(kind, _coords(sample_id, f"{where}.point", value, 2), ref)
    if kind == "polygon":
        if not isinstance(value, list) or len(value) < 3:
            raise SampleError(sample_id, f"{where}.polygon: expected at least 3 [x, y] points, got {value!r}")
        return Part(kind, tuple(_coords(sample_id, f"{where}.polygon[{i}]", p, 2) for i, p in enumerate(value)), ref)
    # clip_time
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or not 0 <= value[0] <= value[1]):
        raise SampleError(sample_id, f"{where}.clip_time: expected [t1, t2] seconds with 0 <= t1 <= t2, got {value!r}")
    return Part(kind, (float(value[0]), float(value[1])))


def parse_sample(raw: Any, root: str | Path = ".", line: int | None = None, prompt: bool = False) -> Sample:
    """Validate one manifest object; paths are resolved against ``root`` (the manifest's folder).
    ``prompt``: the object is a generation prompt, whose conversation may end with the user."""
    root = Path(root)
    fallback = f"<line {line}>" if line is not None else "<unnamed>"
    if not isinstance(raw, dict):
        raise SampleError(fallback, f"expected a JSON object, got {type(raw).__name__}")
    sid = raw.get("id")
    if not isinstance(sid, str) or not sid:
        raise SampleError(fallback, f"field 'id' is required and must be a non-empty string, got {sid!r}")
    allowed = {"id", "task", "messages", "text", "think", "loss", "meta"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SampleError(sid, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    task = raw.get("task", "text" if "text" in raw else "chat")
    if task not in TASKS:
        raise SampleError(sid, f"field 'task': {task!r} is not one of {list(TASKS)}")
    if ("text" in raw) == ("messages" in raw):
        raise SampleError(sid, "exactly one of 'messages' (a conversation) or 'text' (plain pre-training text) is required")
    if "text" in raw:
        if not isinstance(raw["text"], str) or not raw["text"]:
            raise SampleError(sid, f"field 'text': expected a non-empty string, got {raw['text']!r}")
        turns = (Turn("assistant", (Part("text", raw["text"]),)),)
        default_loss = "all"
    else:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise SampleError(sid, "field 'messages': expected a non-empty list of turns")
        turns_list = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
                raise SampleError(sid, f"{where}: expected {{'role': one of {list(ROLES)}, 'content': ...}}, got {m!r:.120}")
            content = m["content"]
            parts = [content] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                raise SampleError(sid, f"{where}.content: expected a string or a non-empty list of parts")
            turns_list.append(Turn(m["role"], tuple(_part(sid, f"{where}.content[{j}]", p, root) for j, p in enumerate(parts))))
        turns = tuple(turns_list)
        if not prompt and not any(t.role == "assistant" for t in turns) and raw.get("loss", "assistant") == "assistant":
            raise SampleError(sid, "no assistant turn, so nothing to train; add one or set \"loss\": \"all\"")
        default_loss = "assistant"
    loss = raw.get("loss", default_loss)
    if loss not in ("all", "assistant"):
        raise SampleError(sid, f"field 'loss': {loss!r} is not 'all' or 'assistant'")
    think = raw.get("think")
    if think not in (None, "think", "no_think"):
        raise SampleError(sid, f"field 'think': {think!r} is not 'think' or 'no_think'")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise SampleError(sid, "field 'meta': expected an object")
    return Sample(sid, turns, task, loss, think, meta)
