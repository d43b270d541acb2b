"""Cost-balanced steps: every rank computes the same assignment and builds only its rows; the
global state resumes exactly and survives a change of data-parallel size without losing or
repeating a sample."""
import json

import pytest

from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleCost, SampleDataset
from keyetron.data.demo import make_demo
from keyetron.data.loader import LoaderConfig, epoch_order
from keyetron.data.packing import PADDING_SAMPLE_ID
from keyetron.data.sources import open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model import load_model_config
from keyetron.data.cost_index import build_cost_index, load_cost_index
from keyetron.parallel.balanced_rows import BalancedRows, reshard_balanced_states
from keyetron.parallel.balancer import CostModel

MEDIA = MediaConfig(image_max_tokens=16, video_total_tokens=96, video_fps=1.0)
CFG = LoaderConfig(row_tokens=256, seed=1, balance=True)
ROWS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=7, train_size=60, eval_size=2)
    return out / "train.jsonl"


def dataset(manifest):
    cfg = load_model_config("tiny")
    return SampleDataset(open_source(str(manifest)), DocumentBuilder(cfg, KeyeTokenizer(cfg.tokenizer), MEDIA))


@pytest.fixture(scope="module")
def costs(demo, tmp_path_factory):
    return build_cost_index(dataset(demo), tmp_path_factory.mktemp("index") / "costs.json")


def readers(demo, costs, dp, cfg=CFG):
    model = CostModel.from_flops("tiny")
    return [BalancedRows(dataset(demo), cfg, costs, ROWS, 0, r, dp, model) for r in range(dp)]


def step(loaders):
    return [loader.next_rows(ROWS) for loader in loaders]


def ids(rows):
    return [s for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID]


def test_the_index_is_reused_only_for_the_same_data_and_settings(demo, costs, tmp_path):
    path = tmp_path / "c.json"
    build_cost_index(dataset(demo), path)
    assert load_cost_index(path, dataset(demo)) == costs
    cfg = load_model_config("tiny")
    other = SampleDataset(open_source(str(demo)), DocumentBuilder(cfg, KeyeTokenizer(cfg.tokenizer),
                                                                  MediaConfig(image_max_tokens=32)))
    assert load_cost_index(path, other) is None  # other media settings: other token counts


def test_each_step_deals_disjoint_samples_in_full_rows_to_every_rank(demo, costs):
    loaders = readers(demo, costs, 3)
    seen = []
    while loaders[0].cursors["all"] < 40:  # within epoch 0 (60 records): no sample may come twice
        per_rank = step(loaders)
        assert all(len(rows) == ROWS for rows in per_rank)
        assert all(r.num_tokens == CFG.row_tokens for rows in per_rank for r in rows)
        got = [i for rows in per_rank for i in ids(rows)]
        assert len(got) == len(set(got)) and not set(got) & set(seen)
        seen += got
        # every rank computed the same assignment, close to balanced on the LLM phase
        reports = [{k: v for k, v in loader.last_report.items() if k != "scheduler_ms"} for loader in loaders]
        assert all(r == reports[0] for r in reports)
        assert reports[0]["llm"]["ratio_to_lower_bound"] < 1.25
    # the documents are the ones the index priced: tokens never exceed the prediction
    assert len(seen) > 20


def test_a_resumed_loader_continues_with_the_same_rows(demo, costs):
    loaders = readers(demo, costs, 2)
    for _ in range(3):
        step(loaders)
    states = {r: loader.state_dict() for r, loader in enumerate(loaders)}
    want = [step(loaders) for _ in range(3)]
    resumed = readers(demo, costs, 2)
    for r, loader in enumerate(resumed):
        loader.load_state_dict(json.loads(json.dumps(states[r])))  # what a checkpoint stores
    got = [step(resumed) for _ in range(3)]
    for a, b in zip(want, got):
        assert [ids(rows) for rows in a] == [ids(rows) for rows in b]
        assert all(x.input_ids.equal(y.input_ids) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("old,new", [(4, 2), (2, 3), (3, 1)])
def test_a_new_data_parallel_size_consumes_the_rest_of_the_epoch_exactly_once(demo, costs, old, new):
    cfg = LoaderConfig(row_tokens=256, seed=1, balance=True, samples_per_step=7)
    loaders = readers(demo, costs, old, cfg)
    seen = [i for _ in range(2) for rows in step(loaders) for i in ids(rows)]
    states = reshard_balanced_states({r: loader.state_dict() for r, loader in enumerate(loaders)}, new)
    resized = readers(demo, costs, new, cfg)
    for r, loader in enumerate(resized):
        loader.load_state_dict(states[r])
    n = len(costs)
    while resized[0].cursors["all"] < n:
        seen += [i for rows in step(resized) for i in ids(rows)]
    state = resized[0].state_dict()
    orders = [epoch_order(list(range(n)), cfg, e) for e in (0, 1)]
    carry = [p for _, p in state["carry"]]
    drawn = [costs[orders[p // n][p % n]] for p in range(state["cursors"]["all"]) if p not in carry]
    # every drawn sample handed out once (none lost, none repeated), before and after the resize
    assert sorted(seen) == sorted(c.sample_id for c in drawn if isinstance(c, SampleCost) and c.llm_tokens <= cfg.row_tokens)
    assert state["cursors"]["all"] >= n


def test_a_token_mixture_holds_at_token_level_over_the_steps(demo, costs):
    mixture = {"video": 0.24, "image": 0.50, "text": 0.26}
    cfg = LoaderConfig(row_tokens=256, seed=1, balance=True, mixture=mixture)
    loaders = readers(demo, costs, 2, cfg)
    tokens = dict.fromkeys(mixture, 0)
    kind_of = {c.sample_id: c for c in costs if isinstance(c, SampleCost)}
    for _ in range(6):
        for rows in step(loaders):
            for i in ids(rows):
                tokens[kind_of[i].kind] += kind_of[i].llm_tokens
        assert set(loaders[0].last_report["mix"]) <= set(mixture)  # the step's own measured shares
    total = sum(tokens.values())
    for kind, share in mixture.items():  # within a sample or two of the target after 6 steps
        assert abs(tokens[kind] / total - share) < 0.05, (kind, tokens[kind] / total)
    # the state carries the mixture's accounting: a resumed loader draws the same
    again = readers(demo, costs, 2, cfg)
    for a, b in zip(again, loaders):
        a.load_state_dict(b.state_dict())
    assert [ids(r) for r in step(again)] == [ids(r) for r in step(loaders)]
