"""Loader states across a change of data-parallel size: D readers stopped mid-epoch and
resharded to D' readers hand out every remaining sample of the epoch exactly once."""
import json
from collections import Counter

import pytest
import torch

from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset
from keyetron.data.loader import LoaderConfig
from keyetron.data.streaming_rows import StreamingRows, reshard_streaming_states
from keyetron.data.packing import PADDING_SAMPLE_ID
from keyetron.data.sources import JsonlSource
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model.config import load_model_config

ROW = 96
CFG = LoaderConfig(row_tokens=ROW, buffer_docs=4, min_fill=0.9, seed=5)
USABLE = {f"t{i}" for i in range(60)} | {"long", "img"}


@pytest.fixture(scope="module")
def dataset_factory(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("resize")
    gen = torch.Generator().manual_seed(1)
    lines = [{"id": f"t{i}", "text": " ".join(f"w{j}" for j in range(int(torch.randint(2, 40, (1,), generator=gen))))}
             for i in range(60)]
    lines.append({"id": "long", "text": " ".join(f"long{j}" for j in range(200))})  # cut into pieces
    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "i.png")
    lines.append({"id": "img", "messages": [{"role": "user", "content": [{"image": "i.png"}, "c?"]},
                                            {"role": "assistant", "content": "red"}]})
    lines.append({"id": "broken", "messages": [{"role": "user", "content": [{"image": "gone.png"}]},
                                               {"role": "assistant", "content": "x"}]})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg, tok = load_model_config("tiny"), KeyeTokenizer()
    return lambda: SampleDataset(JsonlSource(root / "m.jsonl"), DocumentBuilder(cfg, tok, MediaConfig(image_max_tokens=16)))


def readers(dataset_factory, dp):
    return [StreamingRows(dataset_factory(), CFG, dp_rank=r, dp_size=dp) for r in range(dp)]


def rows_until_epoch_end(loader, limit=None):
    """Rows of epoch 0 from ``loader``, at most ``limit`` of them."""
    rows = []
    while limit is None or len(rows) < limit:
        row = next(loader)
        if loader.epoch != 0:  # the epoch number moves on only once its last row was handed out
            break
        rows.append(row)
    return rows


def pieces(rows) -> Counter:
    return Counter(s for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID)


def assert_every_usable_sample_once(rows):
    got = pieces(rows)
    assert set(got.values()) == {1}, {s: n for s, n in got.items() if n > 1}  # nothing repeated
    assert {s.split("#piece")[0] for s in got} == USABLE  # nothing lost
    assert sum(s.startswith("long#piece") for s in got) >= 2


def test_data_parallel_readers_split_each_epoch_between_them(dataset_factory):
    rows = [row for loader in readers(dataset_factory, 3) for row in rows_until_epoch_end(loader)]
    assert_every_usable_sample_once(rows)


@pytest.mark.parametrize("old_dp,new_dp,stops", [(4, 2, [1, 2, 3, 1]), (2, 3, [2, 5]), (3, 1, [0, 4, 2])])
def test_resharded_readers_hand_out_every_remaining_sample_once(dataset_factory, old_dp, new_dp, stops):
    old = readers(dataset_factory, old_dp)
    rows = [row for loader, stop in zip(old, stops) for row in rows_until_epoch_end(loader, stop)]
    states = json.loads(json.dumps({r: loader.state_dict() for r, loader in enumerate(old)}))  # as checkpointed
    assert len({s["cursor"] for s in states.values()}) > 1  # the readers stopped at different places
    assert any(s["pending"] or s["packer"]["buffered"] for s in states.values())  # with documents in flight
    new = readers(dataset_factory, new_dp)
    for r, state in reshard_streaming_states({int(k): v for k, v in states.items()}, new_dp).items():
        new[r].load_state_dict(state)
    rows += [row for loader in new for row in rows_until_epoch_end(loader)]
    assert_every_usable_sample_once(rows)
    assert sum((loader.dataset.skips.counts for loader in new), Counter()) == {"bad_media": 1}


def test_resizing_twice_still_hands_out_every_sample_once(dataset_factory):
    old = readers(dataset_factory, 4)
    rows = [row for loader, stop in zip(old, [1, 0, 2, 1]) for row in rows_until_epoch_end(loader, stop)]
    mid = readers(dataset_factory, 2)
    for r, state in reshard_streaming_states({r: x.state_dict() for r, x in enumerate(old)}, 2).items():
        mid[r].load_state_dict(state)
    rows += [row for loader, stop in zip(mid, [2, 1]) for row in rows_until_epoch_end(loader, stop)]
    new = readers(dataset_factory, 3)
    for r, state in reshard_streaming_states({r: x.state_dict() for r, x in enumerate(mid)}, 3).items():
        new[r].load_state_dict(state)
    rows += [row for loader in new for row in rows_until_epoch_end(loader)]
    assert_every_usable_sample_once(rows)


def test_a_reader_resumes_exactly_under_the_same_data_parallel_size(dataset_factory):
    reference = StreamingRows(dataset_factory(), CFG, dp_rank=1, dp_size=2)
    expected = [next(reference) for _ in range(20)]  # crosses into the second epoch
    first = StreamingRows(dataset_factory(), CFG, dp_rank=1, dp_size=2)
    for _ in range(3):
        next(first)
    resumed = StreamingRows(dataset_factory(), CFG, dp_rank=1, dp_size=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [r.sample_ids for r in (next(resumed) for _ in range(17))] == [r.sample_ids for r in expected[3:]]


def test_a_state_of_another_size_must_be_resharded(dataset_factory):
    state = StreamingRows(dataset_factory(), CFG, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="reshard_streaming_states"):
        StreamingRows(dataset_factory(), CFG).load_state_dict(state)
