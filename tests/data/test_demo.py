"""The demo dataset: valid samples, decodable media that show what the answers say, determinism, baselines."""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keyetron.data.demo import EVAL_MIX, QUESTIONS, allocate, make_demo
from keyetron.data.demo_media import COLOURS, VIDEO_FPS, VIDEO_WH
from keyetron.data.image import image_size, load_image, probe_image
from keyetron.data.render import VideoLayout, render_sample
from keyetron.data.samples import parse_sample
from keyetron.data.slowfast import plan_video
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.data.video import decode_frames, probe_video

SIZES = {"train_size": 100, "eval_size": 40}


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    """Two runs with seed 0 and one with seed 1."""
    root = tmp_path_factory.mktemp("demo")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_demo(root / name, seed=seed, **SIZES)
    return {name: root / name for name in "abc"}


def lines(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def samples(folder: Path, split: str):
    return [parse_sample(raw, root=folder, line=i + 1) for i, raw in enumerate(lines(folder, split))]


def nearest_colour(pixels: np.ndarray) -> str:
    """The palette name most of these (N, 3) pixels are closest to."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], float)
    votes = np.abs(pixels[:, None, :].astype(float) - palette[None]).sum(-1).argmin(1)
    return names[np.bincount(votes, minlength=len(names)).argmax()]


def test_every_line_parses_and_every_media_file_decodes(demos):
    folder = demos["a"]
    for split, size in (("train", SIZES["train_size"]), ("eval", SIZES["eval_size"])):
        parsed = samples(folder, split)
        assert len(parsed) == size and len({s.sample_id for s in parsed}) == size
        decoded = Counter()
        for s in parsed:
            for part in s.media:
                assert part.value.is_relative_to(folder) and part.value.is_file()
                if part.kind == "image":
                    h, w = probe_image(part.value)
                    assert 112 <= h <= 224 and 112 <= w <= 224
                    if decoded[s.task] < 2:  # full decodes are slow on a busy CPU: two per task
                        assert load_image(part.value).pixel_values.shape[1:] == (3, 14, 14)
                        decoded[s.task] += 1
                else:
                    info = probe_video(part.value)
                    assert (info.width, info.height, info.fps) == (*VIDEO_WH, VIDEO_FPS)
                    assert info.duration in (4.0, 5.0, 6.0) and info.num_frames == info.duration * VIDEO_FPS


def test_no_stray_files_and_eval_media_are_held_out(demos):
    folder = demos["a"]
    used = {split: {p.value for s in samples(folder, split) for p in s.media} for split in ("train", "eval")}
    assert not used["train"] & used["eval"]
    on_disk = set((folder / "images").iterdir()) | set((folder / "videos").iterdir())
    assert on_disk == used["train"] | used["eval"]


def test_same_seed_gives_identical_manifests_and_pixels(demos):
    a, b = demos["a"], demos["b"]
    for name in ("train.jsonl", "eval.jsonl", "demo.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert pngs == sorted(p.name for p in (b / "images").iterdir())
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in pngs)
    videos = sorted(p.name for p in (a / "videos").iterdir())
    assert videos == sorted(p.name for p in (b / "videos").iterdir())
    for n in videos[:6]:
        times = np.arange(probe_video(a / "videos" / n).num_frames) / VIDEO_FPS
        np.testing.assert_array_equal(decode_frames(a / "videos" / n, times), decode_frames(b / "videos" / n, times))


def test_different_seeds_differ(demos):
    a, c = demos["a"], demos["c"]
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    assert (a / "eval.jsonl").read_bytes() != (c / "eval.jsonl").read_bytes()
    name = "eval-colour-00000.png"
    assert (a / "images" / name).read_bytes() != (c / "images" / name).read_bytes()


def test_eval_answer_is_the_whole_last_assistant_turn(demos):
    for s in samples(demos["a"], "eval"):
        answer, qtype = s.meta["answer"], s.meta["question_type"]
        assert qtype in EVAL_MIX and answer in QUESTIONS[qtype][0]
        last = s.turns[-1]
        assert last.role == "assistant" and [(p.kind, p.value) for p in last.parts] == [("text", answer)]


def test_eval_answers_are_balanced_and_question_types_follow_the_mix(demos):
    parsed = samples(demos["a"], "eval")
    assert dict(Counter(s.meta["question_type"] for s in parsed)) == {
        k: n for k, n in allocate(SIZES["eval_size"], EVAL_MIX).items() if n}
    for qtype, (answers, _build) in QUESTIONS.items():
        counts = Counter(s.meta["answer"] for s in parsed if s.meta["question_type"] == qtype)
        assert max(counts[a] for a in answers) - min(counts[a] for a in answers) <= 1, (qtype, counts)


def test_demo_json_baselines_are_recomputed_from_eval_jsonl(demos):
    folder = demos["a"]
    record = json.loads((folder / "demo.json").read_text())
    metas = [raw["meta"] for raw in lines(folder, "eval")]

    def majority(answers):
        counts = Counter(answers)
        top = max(counts.values())
        return {"answer": min(a for a, n in counts.items() if n == top), "accuracy": top / len(answers)}

    assert record["baselines"]["overall"] == majority([m["answer"] for m in metas])
    types = sorted({m["question_type"] for m in metas})
    assert record["baselines"]["per_question_type"] == {
        t: majority([m["answer"] for m in metas if m["question_type"] == t]) for t in types}
    assert record["eval_question_types"] == dict(Counter(m["question_type"] for m in metas))
    assert record["tasks"]["train"] == dict(Counter(raw["task"] for raw in lines(folder, "train")))
    assert record["seed"] == 0 and record["sizes"] == {"train": 100, "eval": 40} and record["complete"]


def test_videos_show_what_the_answers_say(demos):
    folder = demos["a"]
    checked = Counter()
    for s in samples(folder, "eval"):
        qtype, answer = s.meta["question_type"], s.meta["answer"]
        if s.task != "video":
            continue
        path = s.media[0].value
        n = probe_video(path).num_frames
        if qtype == "ball_direction":
            first, last = decode_frames(path, [0.0, (n - 1) / VIDEO_FPS])
            xs = [np.nonzero((f.max(-1).astype(int) - f.min(-1)) > 80)[1].mean() for f in (first, last)]
            assert ("right" if xs[1] > xs[0] else "left") == answer
        elif qtype == "first_colour":
            assert nearest_colour(decode_frames(path, [0.0])[0].reshape(-1, 3)) == answer
        elif qtype == "scene_change_second":
            t = int(answer)
            before, at, start = decode_frames(path, [t - 1 / VIDEO_FPS, float(t), 0.0])
            assert nearest_colour(before.reshape(-1, 3)) == nearest_colour(start.reshape(-1, 3))
            assert nearest_colour(at.reshape(-1, 3)) != nearest_colour(before.reshape(-1, 3))
        checked[qtype] += 1
    assert set(checked) == {"ball_direction", "first_colour", "scene_change_second"}


def test_images_show_what_the_answers_say(demos):
    from PIL import Image

    for s in samples(demos["a"], "eval"):
        if s.meta["question_type"] in ("colour", "position"):
            rgb = np.asarray(Image.open(s.media[0].value).convert("RGB"))
            ink = (rgb.max(-1).astype(int) - rgb.min(-1)) > 80  # saturated pixels: the shape
            if s.meta["question_type"] == "colour":
                assert nearest_colour(rgb[ink]) == s.meta["answer"]
            else:
                side = "left" if np.nonzero(ink)[1].mean() < rgb.shape[1] / 2 else "right"
                assert side == s.meta["answer"]


def test_train_holds_every_kind_of_target(demos):
    parsed = samples(demos["a"], "train")
    kinds = {p.kind for s in parsed for t in s.turns if t.role == "assistant" for p in t.parts}
    assert {"text", "box", "clip_time", "ocr_text"} <= kinds
    assert {s.think for s in parsed if s.task == "chat"} >= {"think", "no_think"}
    assert {s.loss for s in parsed if s.task == "caption"} == {"all", "assistant"}


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        make_demo(tmp_path, train_size=2, eval_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_regenerates_over_an_earlier_demo_without_leaving_stale_media(tmp_path):
    make_demo(tmp_path, seed=3, train_size=20, eval_size=10)
    summary = make_demo(tmp_path, seed=4, train_size=6, eval_size=10)
    used = {p.value for split in ("train", "eval") for s in samples(tmp_path, split) for p in s.media}
    assert set((tmp_path / "images").iterdir()) | set((tmp_path / "videos").iterdir()) == used
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record == {k: v for k, v in summary.to_dict().items() if k != "out"} and record["seed"] == 4


def test_allocate_keeps_the_total():
    for total in (0, 1, 7, 40, 300, 3001):
        counts = allocate(total, EVAL_MIX)
        assert sum(counts.values()) == total and set(counts) == set(EVAL_MIX)


def test_samples_render_with_the_keye_tokenizer(demos):
    tok = KeyeTokenizer()
    folder = demos["a"]
    picked = {}
    for split in ("train", "eval"):
        for s in samples(folder, split):
            picked.setdefault((split, s.task), s)
    for (split, _task), s in sorted(picked.items()):
        visual = []
        for part in s.media:
            if part.kind == "image":
                visual.append(image_size(probe_image(part.value)).llm_tokens)
            else:
                plan, _ = plan_video(part.value)
                visual.append(VideoLayout(plan.timestamps, plan.frame_types, plan.slow_tokens, plan.fast_tokens))
        ids, mask = render_sample(s, tok, visual)
        assert len(ids) == len(mask) and any(mask)
        if split == "eval":
            trained = tok.decode([i for i, m in zip(ids, mask) if m])
            assert trained.endswith(s.meta["answer"] + "<|im_end|>")
