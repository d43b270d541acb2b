"""A small, deterministic multimodal dataset for smoke training and evaluation, made offline.

`make_demo(out)` writes ``train.jsonl`` and ``eval.jsonl`` (the sample format of
``keyetron.data.samples``, paths relative to ``out``), ``images/*.png``, ``videos/*.mp4``
and ``demo.json`` (counts and the eval split's majority-answer baselines). The content is
synthetic shapes, words, scikit-image's bundled photos, moving-ball and scene-cut clips,
and text, so a ~60M-parameter model can learn it on CPU.

Every eval sample is a question whose last turn is the assistant's one-word answer, with
``meta: {"answer", "question_type"}``; train holds the same question types (with fresh
media and answers drawn uniformly) besides captions, grounding boxes, OCR spans,
temporal grounding, plain text and chat. Each (split, kind) draws from its own
``default_rng([seed, split, kind])``, so the same seed gives byte-identical manifests and
identical pixels; eval media are separate files drawn from the same distributions.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from keyetron.data.demo_media import (COLOURS, PHOTO_CAPTIONS, PHOTOS, SHAPES, VIDEO_FPS, WORDS, ball_frames,
                                      load_photos, normalised_box, photo_variant, scene_frames, shapes_image,
                                      sided_shape_image, word_image)
from keyetron.data.video import write_video

FORMAT = "keyetron-demo/1"
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SIDES_OF = {"circle": 0, "square": 4, "triangle": 3}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}
CAPTION_PROMPTS = ("Describe the image.", "What do you see?", "Write a short caption.")
# Fractions of each split per generator. Train: 40% shapes, 10% photos, 20% video, 15% grounding
# and OCR, 15% text. Eval holds the question types only.
TRAIN_MIX = {
    "shape_caption": 0.13, "colour": 0.09, "shape": 0.09, "count": 0.09,
    "photo_caption": 0.05, "photo_class": 0.05,
    "ball_caption": 0.03, "ball_direction": 0.05, "scene_caption": 0.03, "first_colour": 0.03,
    "scene_change_second": 0.02, "temporal_grounding": 0.04,
    "grounding_box": 0.045, "position": 0.03, "ocr_read": 0.045, "ocr_word": 0.03,
    "text": 0.08, "arithmetic": 0.03, "chat": 0.04,
}
EVAL_MIX = {
    "colour": 0.15, "shape": 0.15, "count": 0.15, "photo_class": 0.10,
    "ball_direction": 0.07, "first_colour": 0.07, "scene_change_second": 0.06,
    "position": 0.075, "ocr_word": 0.075, "arithmetic": 0.10,
}
KIND_INDEX = {k: i for i, k in enumerate(TRAIN_MIX)}  # part of every rng seed: append new kinds at the end
SPLIT_INDEX = {"train": 0, "eval": 1}


@dataclass
class _Split:
    """Where one split's media go, and what it has written so far."""

    out: Path
    name: str
    photos: dict[str, np.ndarray]
    images: int = 0
    videos: int = 0
    scenes: list[tuple[dict, list[str], list[int], int]] = field(default_factory=list)  # part, colours, changes, s

    def image(self, stem: str, rgb: np.ndarray) -> dict:
        rel = f"images/{stem}.png"
        Image.fromarray(rgb).save(self.out / rel, format="PNG")
        self.images += 1
        return {"image": rel}

    def video(self, stem: str, frames: np.ndarray) -> dict:
        rel = f"videos/{stem}.mp4"
        write_video(self.out / rel, frames, VIDEO_FPS)
        self.videos += 1
        return {"video": rel}

    def scene_video(self, rng: np.random.Generator, stem: str, colours: list[str], changes: list[int],
                    seconds: int) -> dict:
        part = self.video(stem, scene_frames(rng, colours, changes, seconds))
        self.scenes.append((part, colours, changes, seconds))
        return part


def _pick(rng: np.random.Generator, options) -> str:
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def _qa(sid: str, task: str, media: dict | None, question: str, answer, **extra) -> dict:
    user = [media, {"text": question}] if media else question
    return {"id": sid, "task": task, **extra,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _scene_colours(rng: np.random.Generator, n: int, first: str | None = None) -> list[str]:
    rest = [c for c in COLOURS if c != first]
    picked = [rest[i] for i in rng.choice(len(rest), size=n - (first is not None), replace=False)]
    return ([first] if first else []) + picked


# ---------------------------------------------------------------- question types (train and eval)
def _q_colour(sp: _Split, rng, sid: str, answer: str) -> dict:
    rgb, _ = shapes_image(rng, [(_pick(rng, SHAPES), answer)])
    return _qa(sid, "vqa", sp.image(sid, rgb), "What colour is the shape?", answer)


def _q_shape(sp: _Split, rng, sid: str, answer: str) -> dict:
    rgb, _ = shapes_image(rng, [(answer, _pick(rng, COLOURS))])
    return _qa(sid, "vqa", sp.image(sid, rgb), "What shape is shown?", answer)


def _q_count(sp: _Split, rng, sid: str, answer: str) -> dict:
    shape = _pick(rng, SHAPES)
    rgb, _ = shapes_image(rng, [(shape, _pick(rng, COLOURS)) for _ in range(int(answer))])
    return _qa(sid, "vqa", sp.image(sid, rgb), f"How many {shape}s are there?", answer)


def _q_photo_class(sp: _Split, rng, sid: str, answer: str) -> dict:
    name = _pick(rng, sorted(k for k, v in PHOTOS.items() if v == answer))
    return _qa(sid, "vqa", sp.image(sid, photo_variant(rng, sp.photos[name])), "What is in the picture?", answer)


def _q_position(sp: _Split, rng, sid: str, answer: str) -> dict:
    rgb, _ = sided_shape_image(rng, _pick(rng, SHAPES), _pick(rng, COLOURS), answer)
    return _qa(sid, "grounding", sp.image(sid, rgb), "Is the shape on the left or the right?", answer)


def _q_ocr_word(sp: _Split, rng, sid: str, answer: str) -> dict:
    return _qa(sid, "ocr", sp.image(sid, word_image(rng, answer)), "What word is written?", answer)


def _q_ball_direction(sp: _Split, rng, sid: str, answer: str) -> dict:
    frames = ball_frames(rng, _pick(rng, COLOURS), answer, int(rng.integers(4, 7)))
    return _qa(sid, "video", sp.video(sid, frames), "Which way does the ball move?", answer)


def _q_first_colour(sp: _Split, rng, sid: str, answer: str) -> dict:
    seconds = int(rng.integers(4, 7))
    colours = _scene_colours(rng, int(rng.integers(2, 4)), first=answer)
    changes = sorted(int(c) for c in rng.choice(np.arange(1, seconds), size=len(colours) - 1, replace=False))
    part = sp.scene_video(rng, sid, colours, changes, seconds)
    return _qa(sid, "video", part, "What colour is the first scene?", answer)


def _q_scene_change_second(sp: _Split, rng, sid: str, answer: str) -> dict:
    change = int(answer)
    seconds = _pick(rng, [s for s in (4, 5, 6) if s > change])
    part = sp.scene_video(rng, sid, _scene_colours(rng, 2), [change], int(seconds))
    return _qa(sid, "video", part, "At which second does the scene change?", answer)


def _q_arithmetic(sp: _Split, rng, sid: str, answer: str) -> dict:
    total = int(answer)
    a = int(rng.integers(max(0, total - 9), min(9, total) + 1))
    return _qa(sid, "chat", None, f"What is {a} + {total - a}?", answer, think="no_think")


Question = Callable[[_Split, np.random.Generator, str, str], dict]
QUESTIONS: dict[str, tuple[tuple[str, ...], Question]] = {
    "colour": (tuple(COLOURS), _q_colour),
    "shape": (SHAPES, _q_shape),
    "count": (("1", "2", "3", "4"), _q_count),
    "photo_class": (tuple(sorted(set(PHOTOS.values()))), _q_photo_class),
    "position": (("left", "right"), _q_position),
    "ocr_word": (WORDS, _q_ocr_word),
    "ball_direction": (("left", "right"), _q_ball_direction),
    "first_colour": (tuple(COLOURS), _q_first_colour),
    "scene_change_second": (("1", "2", "3", "4"), _q_scene_change_second),
    "arithmetic": (tuple(str(s) for s in range(19)), _q_arithmetic),
}


# ---------------------------------------------------------------- train-only kinds
def _shape_caption(sp: _Split, rng, sid: str) -> dict:
    items = [(_pick(rng, SHAPES), _pick(rng, COLOURS)) for _ in range(int(rng.integers(1, 5)))]
    rgb, _ = shapes_image(rng, items)
    named = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}" for shape, colour in items]
    if len(items) == 1:
        caption = f"{named[0].capitalize()} on a light background."
    else:
        caption = f"{NUMBER_WORDS[len(items)].capitalize()} shapes: {', '.join(named[:-1])} and {named[-1]}."
    loss = "all" if rng.random() < 0.5 else "assistant"
    return _qa(sid, "caption", sp.image(sid, rgb), _pick(rng, CAPTION_PROMPTS), caption, loss=loss)


def _photo_caption(sp: _Split, rng, sid: str) -> dict:
    name = _pick(rng, PHOTOS)
    rgb = photo_variant(rng, sp.photos[name])
    return _qa(sid, "caption", sp.image(sid, rgb), _pick(rng, CAPTION_PROMPTS), PHOTO_CAPTIONS[name])


def _ball_caption(sp: _Split, rng, sid: str) -> dict:
    colour, direction = _pick(rng, COLOURS), _pick(rng, ("left", "right"))
    part = sp.video(sid, ball_frames(rng, colour, direction, int(rng.integers(4, 7))))
    path = "from left to right" if direction == "right" else "from right to left"
    return _qa(sid, "video", part, "Describe the video.", f"A {colour} ball moves {path}.")


def _scene_caption(sp: _Split, rng, sid: str) -> dict:
    seconds = int(rng.integers(4, 7))
    colours = _scene_colours(rng, int(rng.integers(2, 4)))
    changes = sorted(int(c) for c in rng.choice(np.arange(1, seconds), size=len(colours) - 1, replace=False))
    part = sp.scene_video(rng, sid, colours, changes, seconds)
    when = (f"The scene changes at second {changes[0]}." if len(changes) == 1
            else f"The scenes change at seconds {changes[0]} and {changes[1]}.")
    text = "The video shows " + ", then ".join(f"a {c} scene" for c in colours) + ". " + when
    return _qa(sid, "video", part, "Describe the video.", text)


def _temporal_grounding(sp: _Split, rng, sid: str) -> dict:
    """When is one scene of a clip shown: reuses a scene clip of this split when there is one."""
    if sp.scenes:
        part, colours, changes, seconds = sp.scenes[int(rng.integers(len(sp.scenes)))]
    else:
        seconds, colours = int(rng.integers(4, 7)), _scene_colours(rng, 2)
        changes = [int(rng.integers(1, seconds))]
        part = sp.scene_video(rng, sid, colours, changes, seconds)
    k = int(rng.integers(len(colours)))
    bounds = [0, *changes, seconds]
    return _qa(sid, "temporal_grounding", part, f"When is the scene {colours[k]}?",
               [{"clip_time": [float(bounds[k]), float(bounds[k + 1])]}])


def _grounding_box(sp: _Split, rng, sid: str) -> dict:
    """Box of one shape among up to two distractors that differ from it in shape or colour."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    items = [pairs[i] for i in rng.choice(len(pairs), size=int(rng.integers(1, 4)), replace=False)]
    rgb, boxes = shapes_image(rng, items)
    ref = f"the {items[0][1]} {items[0][0]}"
    box = normalised_box(boxes[0], rgb.shape[1], rgb.shape[0])
    question = _pick(rng, (f"Find {ref}.", f"Where is {ref}?"))
    return _qa(sid, "grounding", sp.image(sid, rgb), question, [{"box": box, "ref": ref}])


def _ocr_read(sp: _Split, rng, sid: str) -> dict:
    word = _pick(rng, WORDS)
    return _qa(sid, "ocr", sp.image(sid, word_image(rng, word)), "Read the text in the image.", [{"ocr_text": word}])


def _fact(rng) -> str:
    colour, shape, word = _pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, WORDS)
    a, b, n = int(rng.integers(10)), int(rng.integers(10)), int(rng.integers(1, 5))
    sides = "is round and has no corners" if shape == "circle" else f"has {SIDES_OF[shape]} sides"
    ends = _pick(rng, ("from left to right", "from right to left"))
    return _pick(rng, (f"A {colour} {shape} is drawn on a light background.", f"{a} plus {b} is {a + b}.",
                       f"A {shape} {sides}.", f"There are {NUMBER_WORDS[n]} {shape}s in the picture.",
                       f"In the video, the {colour} ball moves {ends}.",
                       f"The word {word} has {len(word)} letters."))


def _text(sp: _Split, rng, sid: str) -> dict:
    return {"id": sid, "task": "text", "text": " ".join(_fact(rng) for _ in range(int(rng.integers(3, 7))))}


def _exchange(rng) -> tuple[str, str, str]:
    """(question, answer, reasoning) for a chat turn."""
    kind = int(rng.integers(4))
    if kind == 0:
        a, b = int(rng.integers(10)), int(rng.integers(10))
        return f"What is {a} + {b}?", str(a + b), f"{a} plus {b} makes {a + b}."
    if kind == 1:
        shape = _pick(rng, SHAPES)
        return (f"How many sides does a {shape} have?", str(SIDES_OF[shape]),
                f"A {shape} has {SIDES_OF[shape]} straight sides.")
    if kind == 2:
        word = _pick(rng, WORDS)
        return (f"How many letters are in the word {word}?", str(len(word)),
                f"{word} is spelled {' '.join(word)}, that is {len(word)} letters.")
    (x, y), mixed = list(MIXES.items())[int(rng.integers(len(MIXES)))]
    return f"What colour do you get by mixing {x} and {y}?", mixed, f"Mixing {x} paint with {y} paint gives {mixed}."


def _chat(sp: _Split, rng, sid: str) -> dict:
    """Two or three exchanges; in think mode the last answer carries its reasoning."""
    think = _pick(rng, ("think", "no_think"))
    messages = []
    exchanges = [_exchange(rng) for _ in range(int(rng.integers(2, 4)))]
    for i, (question, answer, reasoning) in enumerate(exchanges):
        if think == "think" and i == len(exchanges) - 1:
            answer = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": sid, "task": "chat", "think": think, "messages": messages}


TRAIN_ONLY: dict[str, Callable[[_Split, np.random.Generator, str], dict]] = {
    "shape_caption": _shape_caption, "photo_caption": _photo_caption, "ball_caption": _ball_caption,
    "scene_caption": _scene_caption, "temporal_grounding": _temporal_grounding, "grounding_box": _grounding_box,
    "ocr_read": _ocr_read, "text": _text, "chat": _chat,
}
assert set(TRAIN_MIX) == set(TRAIN_ONLY) | set(QUESTIONS) and set(EVAL_MIX) <= set(QUESTIONS)


# ---------------------------------------------------------------- splits, summary, entry point
def allocate(total: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `total` samples by the fractions of `mix` (largest remainder; ties go to the earlier kind)."""
    exact = {k: total * f / sum(mix.values()) for k, f in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(mix, key=lambda k: -(exact[k] - counts[k]))  # stable: earlier kind first on ties
    for k in by_remainder[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _generate(sp: _Split, seed: int, size: int) -> list[dict]:
    split = SPLIT_INDEX[sp.name]
    samples = []
    for kind, count in allocate(size, TRAIN_MIX if sp.name == "train" else EVAL_MIX).items():
        rng = np.random.default_rng([seed, split, KIND_INDEX[kind]])
        if sp.name == "eval":  # every answer equally often (to within one), in a seeded order
            answers, build = QUESTIONS[kind]
            order = rng.permutation(len(answers))
            for i in range(count):
                answer = answers[order[i % len(answers)]]
                sample = build(sp, rng, f"eval-{kind}-{i:05d}", answer)
                samples.append({**sample, "meta": {"answer": answer, "question_type": kind}})
        elif kind in QUESTIONS:
            answers, build = QUESTIONS[kind]
            samples += [build(sp, rng, f"train-{kind}-{i:05d}", _pick(rng, answers)) for i in range(count)]
        else:
            samples += [TRAIN_ONLY[kind](sp, rng, f"train-{kind}-{i:05d}") for i in range(count)]
    order = np.random.default_rng([seed, split, len(KIND_INDEX)]).permutation(len(samples))
    return [samples[i] for i in order]


def majority_baseline(answers: list[str]) -> dict:
    """Accuracy of always giving the most common answer (ties: the alphabetically first)."""
    if not answers:
        return {"answer": None, "accuracy": 0.0}
    counts = Counter(answers)
    best = max(sorted(counts), key=lambda a: counts[a])
    return {"answer": best, "accuracy": counts[best] / len(answers)}


@dataclass(frozen=True)
class DemoSummary:
    """What `make_demo` wrote; `to_dict()` minus "out" is demo.json."""

    out: Path
    seed: int
    train_size: int
    eval_size: int
    tasks: dict[str, dict[str, int]]  # split -> task -> samples
    media: dict[str, dict[str, int]]  # split -> {"images", "videos"} files
    eval_question_types: dict[str, int]
    baselines: dict  # {"overall": {"answer", "accuracy"}, "per_question_type": {type: {...}}}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "complete": True, "out": str(self.out), "seed": self.seed,
                "sizes": {"train": self.train_size, "eval": self.eval_size}, "tasks": self.tasks,
                "media": self.media, "eval_question_types": self.eval_question_types, "baselines": self.baselines}


def _prepare(out: Path, seed: int) -> None:
    """Refuse foreign non-empty folders; clear the media of an earlier demo; mark the folder as a demo."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder; give make_demo a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no demo.json, so it is not a demo dataset; "
                              "nothing was written: pick a new or empty folder (or an earlier demo's folder)")
    for sub, pattern in (("images", "*.png"), ("videos", "*.mp4")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in sorted((out / sub).glob(pattern)):
            old.unlink()
    # Written first, so a run that dies half-way leaves a folder that can be regenerated.
    (out / "demo.json").write_text(json.dumps({"format": FORMAT, "complete": False, "seed": seed}) + "\n")


def make_demo(out: str | Path, *, seed: int = 0, train_size: int = 3000, eval_size: int = 300) -> DemoSummary:
    """Write the demo dataset into `out` (see the module docstring); returns what was written."""
    for name, value in (("seed", seed), ("train_size", train_size), ("eval_size", eval_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"make_demo: {name} must be a non-negative integer, got {value!r}")
    out = Path(out)
    _prepare(out, seed)
    photos = load_photos()
    tasks, media, written = {}, {}, {}
    for name, size in (("train", train_size), ("eval", eval_size)):
        split = _Split(out, name, photos)
        written[name] = _generate(split, seed, size)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in written[name])
        tasks[name] = dict(sorted(Counter(s["task"] for s in written[name]).items()))
        media[name] = {"images": split.images, "videos": split.videos}
    metas = [s["meta"] for s in written["eval"]]
    by_type: dict[str, list[str]] = {}
    for m in metas:
        by_type.setdefault(m["question_type"], []).append(m["answer"])
    baselines = {"overall": majority_baseline([m["answer"] for m in metas]),
                 "per_question_type": {t: majority_baseline(a) for t, a in sorted(by_type.items())}}
    summary = DemoSummary(out, seed, train_size, eval_size, tasks, media,
                          {t: len(a) for t, a in sorted(by_type.items())}, baselines)
    record = {k: v for k, v in summary.to_dict().items() if k != "out"}
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary
