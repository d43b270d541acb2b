"""The packed-row loader: every usable sample once per epoch, exact resume from its state."""
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset
from keyetron.data.loader import LoaderConfig
from keyetron.data.streaming_rows import StreamingRows
from keyetron.data.packing import PADDING_SAMPLE_ID, PIECE_SEPARATOR
from keyetron.data.sources import JsonlSource
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model.config import load_model_config

ROW = 96


@pytest.fixture(scope="module")
def dataset_factory(tmp_path_factory):
    tiny_cfg = load_model_config("tiny")
    root = tmp_path_factory.mktemp("loader")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(40):
        words = int(torch.randint(2, 40, (1,), generator=gen))
        lines.append({"id": f"t{i}", "text": " ".join(f"w{j}" for j in range(words))})
    lines.append({"id": "long", "text": " ".join(f"long{j}" for j in range(150))})  # split into pieces
    for i in range(4):
        Image.new("RGB", (56, 56 + 28 * i), (i * 60, 0, 0)).save(root / f"i{i}.png")
        lines.append({"id": f"img{i}", "messages": [{"role": "user", "content": [{"image": f"i{i}.png"}, "c?"]},
                                                     {"role": "assistant", "content": "red"}]})
    lines.append({"id": "broken", "messages": [{"role": "user", "content": [{"image": "gone.png"}]},
                                               {"role": "assistant", "content": "x"}]})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = KeyeTokenizer()

    def make():
        return SampleDataset(JsonlSource(root / "m.jsonl"), DocumentBuilder(tiny_cfg, tok, MediaConfig(image_max_tokens=16)))
    return make


CFG = LoaderConfig(row_tokens=ROW, buffer_docs=8, min_fill=0.9, seed=3)


def same_rows(a, b):
    return (a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.cu_seqlens, b.cu_seqlens) and torch.equal(a.targets, b.targets)
            and torch.equal(a.position_ids, b.position_ids)
            and (a.pixel_values is None) == (b.pixel_values is None)
            and (a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values)))


def rows_of_one_epoch(loader):
    rows = []
    while True:
        row = next(loader)
        if loader.epoch != 0:  # the epoch number moves on only once its last row was handed out
            return rows
        rows.append(row)


def test_one_epoch_has_every_usable_sample_once_and_skips_are_counted(dataset_factory):
    loader = StreamingRows(dataset_factory(), CFG)
    rows = rows_of_one_epoch(loader)
    ids = Counter(s.split(PIECE_SEPARATOR)[0] for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID)
    assert set(ids) == {f"t{i}" for i in range(40)} | {f"img{i}" for i in range(4)} | {"long"}
    assert ids["long"] >= 2  # split into pieces
    pieces = Counter(s for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID)
    assert set(pieces.values()) == {1}  # every document or piece exactly once
    assert all(r.num_tokens == ROW for r in rows)
    assert loader.dataset.skips.counts == {"bad_media": 1}
    real = sum(r.num_tokens - (r.document_lengths[-1] if r.sample_ids[-1] == PADDING_SAMPLE_ID else 0) for r in rows)
    assert real / (len(rows) * ROW) > 0.85


def test_epochs_are_reshuffled_deterministically(dataset_factory):
    a, b = StreamingRows(dataset_factory(), CFG), StreamingRows(dataset_factory(), CFG)
    assert a.epoch_order(0) == b.epoch_order(0) and a.epoch_order(0) != a.epoch_order(1)
    assert sorted(a.epoch_order(1)) == list(range(len(a.dataset)))


@pytest.mark.parametrize("stop_at", [1, 5, 11, 23])
def test_resume_from_state_gives_exactly_the_same_rows(dataset_factory, stop_at):
    reference = StreamingRows(dataset_factory(), CFG)
    expected = [next(reference) for _ in range(stop_at + 25)]  # crosses into the second epoch
    first = StreamingRows(dataset_factory(), CFG)
    for _ in range(stop_at):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store plain data
    resumed = StreamingRows(dataset_factory(), CFG)
    resumed.load_state_dict(state)
    for k in range(stop_at, stop_at + 25):
        assert same_rows(next(resumed), expected[k]), f"row {k} differs after resuming at row {stop_at}"
    assert resumed.dataset.skips.counts == reference.dataset.skips.counts


def test_an_epoch_without_a_usable_sample_stops_with_the_skip_summary(tmp_path, tiny_cfg):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "task": "vqa"}) + "\n")
    ds = SampleDataset(JsonlSource(tmp_path / "m.jsonl"), DocumentBuilder(tiny_cfg, KeyeTokenizer()))
    with pytest.raises(RuntimeError, match="no usable sample") as info:
        next(StreamingRows(ds, CFG))
    assert "x [m.jsonl:1]" in str(info.value)
