"""Topology-aware loading: in every layout, each sample of a step is opened and its media
decoded exactly once in the whole job, by a stage-0 rank that then holds the pixels alone;
later pipeline stages read nothing and receive metadata only (targets on the last stage)."""
import json
from collections import Counter

import pytest
import torch

import keyetron.data.dataset as dataset_module
from distributed import run_ranks
from keyetron.batch import IGNORE_INDEX
from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset
from keyetron.data.demo import make_demo
from keyetron.data.cost_index import build_cost_index
from keyetron.data.loader import LoaderConfig
from keyetron.data.streaming_rows import StreamingRows
from keyetron.data.packing import PADDING_SAMPLE_ID
from keyetron.data.sources import open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model import load_model_config
from keyetron.parallel.balanced_rows import BalancedRows
from keyetron.parallel.balancer import CostModel
from keyetron.parallel.loading import balanced_owners, build_loader
from keyetron.parallel.topology import ParallelDims, Topology

MEDIA = MediaConfig(image_max_tokens=16, video_total_tokens=96, video_fps=1.0)
LOADER = LoaderConfig(row_tokens=256, buffer_docs=8, seed=0)
BALANCED = LoaderConfig(row_tokens=256, seed=0, balance=True)
MODEL = CostModel(1.0, 0.0, 1.0, 0.0, units="flop", source="tokens and patches")  # owners balance patches
STEPS, ROWS = 3, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=5, train_size=48, eval_size=2)
    return out / "train.jsonl"


def instrumented_dataset(manifest):
    """A dataset that logs every record it opens and every media part it decodes."""
    cfg = load_model_config("tiny")
    dataset = SampleDataset(open_source(str(manifest)), DocumentBuilder(cfg, KeyeTokenizer(cfg.tokenizer), MEDIA))
    events = {"opened": [], "decoded": []}
    source_record = dataset.source.record

    def record(index):
        events["opened"].append(index)
        return source_record(index)

    dataset.source.record = record
    return dataset, events


def _load(rank, world, manifest, dims, costs=None):
    topo = Topology.from_process_group(dims, "cpu")
    dataset, events = instrumented_dataset(manifest)
    decode = dataset_module.decode_media

    def counted(part, media, patch_size):
        events["decoded"].append((events["opened"][-1], str(part.value)))  # (record, media file)
        return decode(part, media, patch_size)

    dataset_module.decode_media = counted
    try:
        cfg = BALANCED if costs else LOADER
        loader = build_loader(dataset, cfg, topo, pad_token_id=0, fetch_size=5, costs=costs, rows_per_step=ROWS,
                              cost_model=MODEL)
        steps = []
        for _ in range(STEPS):
            rows = loader.next_rows(ROWS)
            steps.append([{
                "ids": list(r.sample_ids), "input_ids": r.input_ids.tolist(), "targets": r.targets.tolist(),
                "positions": r.position_ids.tolist(), "loss_tokens": r.num_loss_tokens,
                "items": 0 if r.vision_grid_thw is None else r.vision_grid_thw.shape[0],
                "local_patches": 0 if r.pixel_values is None else r.pixel_values.shape[0],
                "local_items": r.local_items(topo.cp_rank * topo.dims.tp + topo.tp_rank)
                if getattr(r, "vision_owner", None) is not None else None,
            } for r in rows])
    finally:
        dataset_module.decode_media = decode
    return {"coords": (topo.pp_rank, topo.dp_rank, topo.cp_rank, topo.tp_rank), "steps": steps, **events}


def reference_rows(manifest, dp_rank, dp, costs=None):
    dataset, _ = instrumented_dataset(manifest)
    if costs:
        loader = BalancedRows(dataset, BALANCED, costs, ROWS, 0, dp_rank, dp, MODEL)
    else:
        loader = StreamingRows(dataset, LOADER, pad_token_id=0, dp_rank=dp_rank, dp_size=dp)
    return [loader.next_rows(ROWS) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def costs(demo, tmp_path_factory):
    dataset, _ = instrumented_dataset(demo)
    return build_cost_index(dataset, tmp_path_factory.mktemp("index") / "costs.json")


@pytest.mark.parametrize("dims,balanced", [
    (ParallelDims(pp=2, dp=1, tp=2), False), (ParallelDims(cp=2, dp=2), False), (ParallelDims(pp=3, dp=1), False),
    (ParallelDims(dp=2, tp=2), False), (ParallelDims(pp=2, dp=1, tp=2), True), (ParallelDims(cp=2, dp=2), True)],
    ids=lambda v: ("balanced" if v else "streaming") if isinstance(v, bool) else str(v))
def test_every_sample_of_a_step_is_opened_and_decoded_once_in_the_whole_job(demo, costs, dims, balanced):
    costs = costs if balanced else None
    results = run_ranks(dims.world_size, _load, demo, dims, costs)
    by_coords = {r["coords"]: r for r in results}
    opened = Counter(i for r in results for i in r["opened"])
    decoded = Counter(tuple(v) for r in results for v in r["decoded"])
    assert opened and max(opened.values()) == 1, "a record was opened twice"
    assert decoded and max(decoded.values()) == 1, "a sample's media file was decoded twice"
    for r in results:
        pp, dp, cp, tp = r["coords"]
        if pp > 0:  # later stages read nothing and hold no token ids
            assert not r["opened"] and not r["decoded"]
    consumed = []
    for dp in range(dims.dp):
        leader = by_coords[(0, dp, 0, 0)]
        want = reference_rows(demo, dp, dims.dp, costs)  # the rows one reader of this shard would make
        for s, rows in enumerate(want):
            for k, row in enumerate(rows):
                got = leader["steps"][s][k]
                assert got["ids"] == list(row.sample_ids)
                assert got["input_ids"] == row.input_ids.tolist() and got["targets"] == row.targets.tolist()
                consumed += [i for i in row.sample_ids if i != PADDING_SAMPLE_ID]
                group = [by_coords[(0, dp, c, t)]["steps"][s][k] for c in range(dims.cp) for t in range(dims.tp)]
                # each visual item's pixels are on exactly one rank of the row group
                n_items = got["items"]
                if len(group) > 1 and n_items:
                    owned = sorted(i for g in group for i in g["local_items"])
                    assert owned == list(range(n_items))
                    assert sum(g["local_patches"] for g in group) == int(row.vision_grid_thw.prod(1).sum())
                for stage in range(1, dims.pp):
                    later = by_coords[(stage, dp, 0, 0)]["steps"][s][k]
                    assert later["ids"] == got["ids"] and later["positions"] == row.position_ids.tolist()
                    assert later["local_patches"] == 0 and set(later["input_ids"]) == {0}
                    assert later["loss_tokens"] == row.num_loss_tokens
                    if stage == dims.pp - 1:
                        assert later["targets"] == row.targets.tolist()
                    else:  # middle stages: metadata only
                        assert set(later["targets"]) == {IGNORE_INDEX}
    assert len(consumed) == len(set(consumed)), "a sample was handed to two data-parallel ranks"
    with open(demo) as f:
        id_of = [json.loads(line)["id"] for line in f]
    assert set(consumed) <= {id_of[i] for i in opened}  # what was handed out was opened (once) somewhere


def test_rows_do_not_depend_on_how_many_records_are_fetched_at_once(demo):
    def rows(fetch):
        dataset, _ = instrumented_dataset(demo)
        loader = StreamingRows(dataset, LOADER, pad_token_id=0, fetch_size=fetch)
        return [next(loader) for _ in range(8)]

    for a, b in zip(rows(1), rows(7)):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.pixel_values, b.pixel_values) if a.pixel_values is not None else b.pixel_values is None


def test_balanced_owners_share_a_rows_vit_work_largest_first():
    weights = [900.0, 100.0, 400.0, 0.0, 350.0, 0.0, 250.0]
    owners = balanced_owners(weights, 2)
    load = [sum(w for w, o in zip(weights, owners) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(weights)  # the LPT bound
    assert sorted(load) == [1000.0, 1000.0]  # here it is exact
    counts = [owners.count(r) for r in range(2)]
    assert max(counts) - min(counts) <= 1  # text-only records (weight 0) even out the records opened
