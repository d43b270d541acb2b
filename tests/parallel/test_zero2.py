"""ZeRO-2 (sharded gradients, optimizer state and master weights over dp x cp) equals one
process over 3 fp64 optimizer steps with clipping active (loss, first gradient norm and every
parameter to 1e-10), alone and with TP, CP and PP, every rank accumulating 2 micro-batches;
no rank ever holds the full LLM gradient; its checkpoints load under ZeRO-1, another ZeRO-2
layout and one process."""
import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.sharded_checkpoint import load_distributed, load_into_single_process, save_distributed
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.parallel.zero2 import split_buckets
from keyetron.parallel.config import ParallelConfig
from keyetron.optim import optimizer_param_groups
from synthetic import accumulate_gradients
from layouts import OPTIM, PP_LAYERS, PP_ROW, build_engine, fresh_model, reference_run, step_rows, tiny_config

STEPS, MICRO = 3, 2  # optimizer steps; packed rows (micro-batches) per data-parallel rank and step
BUCKET = 3000  # elements: several buckets per group, the 4.9M-element embedding and head alone in theirs


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _build(topo, cfg=None, pp=False, sharding="zero2", bucket=BUCKET):
    model = fresh_model(cfg)
    return model, build_engine(model, topo, sharding=sharding, bucket_numel=bucket, row_tokens=PP_ROW if pp else None,
                               micro_batches=MICRO)


def _run(rank, world, dims, pp, bucket):
    topo = Topology.from_process_group(dims, "cpu")
    cfg, row = (tiny_config(PP_LAYERS), PP_ROW) if pp else (None, None)
    model, engine = _build(topo, cfg, pp, bucket=bucket)
    n_rows = MICRO * topo.dims.dp
    losses, norms = [], []
    for step in range(STEPS):
        rows = step_rows(step, n_rows, cfg, row)[topo.dp_rank * MICRO:(topo.dp_rank + 1) * MICRO]
        stats = engine.step(rows)
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    return losses, norms[0], {n: full(p) for n, p in model.named_parameters()}


def _reference(n_rows, cfg=None, row=None):
    losses, params = reference_run(STEPS, n_rows, cfg, row)
    model = fresh_model(cfg)
    accumulate_gradients(model, step_rows(0, n_rows, cfg, row), "cpu", None)
    first_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    assert first_norm > OPTIM.clip_grad  # the clip changes every update compared
    return losses, first_norm, params


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(n_rows, pp):
        if (n_rows, pp) not in cache:
            cache[n_rows, pp] = _reference(n_rows, tiny_config(PP_LAYERS), PP_ROW) if pp else _reference(n_rows)
        return cache[n_rows, pp]
    return get


LAYOUTS = {  # name: (dims, world, pipeline, bucket elements; None: the default, one bucket per group here)
    "ZeRO2-DP2": (ParallelDims(dp=2), 2, False, BUCKET),
    "ZeRO2-DP2-one-bucket": (ParallelDims(dp=2), 2, False, None),
    "ZeRO2-DP4": (ParallelDims(dp=4), 4, False, BUCKET),
    "ZeRO2-TP2xDP2": (ParallelDims(dp=2, tp=2), 4, False, BUCKET),
    "ZeRO2-CP2xDP2": (ParallelDims(dp=2, cp=2), 4, False, BUCKET),
    "ZeRO2-PP2xDP2": (ParallelDims(pp=2, dp=2), 4, True, BUCKET),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_zero2_layout_equals_single_process(references, name):
    dims, world, pp, bucket = LAYOUTS[name]
    ref_losses, ref_norm, ref_params = references(MICRO * dims.dp, pp)
    seen = set()
    for losses, first_norm, params in run_ranks(world, _run, dims, pp, bucket):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        assert first_norm == pytest.approx(ref_norm, rel=1e-12)
        for pname, value in params.items():
            torch.testing.assert_close(value, ref_params[pname], rtol=0, atol=1e-10, msg=f"{name}: {pname}")
            seen.add(pname)
    assert seen == set(ref_params)


def _gradient_memory(rank, world, dims):
    topo = Topology.from_process_group(dims, "cpu")
    model, engine = _build(topo)
    llm_numel = sum(p.numel() for p in model.llm.parameters())
    largest = max(p.numel() for p in model.llm.parameters())
    for step in range(2):
        rows = step_rows(step, MICRO * topo.dims.dp)[topo.dp_rank * MICRO:(topo.dp_rank + 1) * MICRO]
        engine.step(rows)
    opt = engine.optimizer
    held = [n for n, p in model.llm.named_parameters() if p.grad is not None]
    n_buckets = sum(len(layout.buckets) for layout in opt.layouts if layout is not None)
    return (llm_numel, largest, n_buckets, held, opt.gradient_slice_numel(), opt.peak_unreduced_numel,
            opt.unreduced_numel)


@pytest.mark.parametrize("dims,world", [(ParallelDims(dp=2), 2), (ParallelDims(dp=4), 4)])
def test_zero2_holds_a_gradient_slice_never_the_full_gradient(dims, world):
    """After the step no LLM parameter holds a ``.grad``; the rank's summed gradient is its 1/N
    slice (plus bucket padding); during backward at most the largest parameter and a few small
    buckets were held in full at once, never the whole LLM gradient (ZeRO-1 holds all of it)."""
    for llm_numel, largest, n_buckets, held, slice_numel, peak, now in run_ranks(world, _gradient_memory, dims):
        assert held == []
        assert now == 0
        assert llm_numel / world <= slice_numel <= llm_numel / world + n_buckets  # padding: < 1 per bucket
        assert largest <= peak <= largest + 8 * BUCKET
        assert peak < 0.51 * llm_numel  # the embedding and the head are each half of this tiny LLM


def test_recipe_accepts_zero2():
    assert ParallelConfig(sharding="zero2").sharding == "zero2"
    with pytest.raises(ValueError, match="zero2"):
        ParallelConfig(sharding="zero4")


def test_buckets_tile_the_group_and_pad_each_to_the_ranks():
    numels = [5, 1, 7, 2, 2, 9]
    buckets = split_buckets(numels, 4, 6)
    assert [(b.first, b.stop) for b in buckets] == [(0, 2), (2, 3), (3, 6)]
    assert [(b.start, b.numel, b.size, b.at) for b in buckets] == [(0, 6, 2, 0), (6, 7, 2, 2), (13, 13, 4, 4)]


# -- checkpoints ------------------------------------------------------------------------------------
ROWS = 2


def _rows(topo, step):
    share = ROWS // topo.dims.dp
    return step_rows(step, ROWS)[topo.dp_rank * share:(topo.dp_rank + 1) * share]


def _state(model, optimizer) -> dict:
    out = {f"model.{k}": full(v) for k, v in model.state_dict().items()}
    inner = optimizer.inner
    for gi, g in enumerate(inner.param_groups):
        for pi, p in enumerate(g["params"]):
            out[f"group{gi}.{pi}"] = full(p)
            out.update({f"group{gi}.{pi}.{k}": full(v) for k, v in inner.state.get(p, {}).items()})
    return out


def _save_zero2_dp2(rank, world, path):
    """Two ZeRO-2 steps, save; a fresh ZeRO-2 engine loads it back bitwise."""
    topo = Topology.from_process_group(ParallelDims(dp=2), "cpu")
    model, engine = _build(topo)
    for step in range(2):
        engine.step(_rows(topo, step))
    save_distributed(path, model, engine.optimizer, topo, {"step": 2})
    model2, engine2 = _build(topo)
    load_distributed(path, model2, engine2.optimizer, topo)
    a, b = _state(model, engine.optimizer), _state(model2, engine2.optimizer)
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


def _resume(rank, world, dims, sharding, bucket, path):
    topo = Topology.from_process_group(dims, "cpu")
    model, engine = _build(topo, sharding=sharding, bucket=bucket)
    extra = load_distributed(path, model, engine.optimizer, topo)
    engine.step(_rows(topo, 2))
    return extra, {n: full(p) for n, p in model.named_parameters()}


def _resume_single_process(path):
    model = fresh_model()
    opt = torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)
    extra = load_into_single_process(path, model, opt)
    opt.zero_grad(set_to_none=True)
    accumulate_gradients(model, step_rows(2, ROWS), "cpu", None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
    opt.step()
    return [(extra, {n: p.detach().clone() for n, p in model.named_parameters()})]


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero2") / "dp2-step2"
    return path, run_ranks(2, _save_zero2_dp2, str(path))


@pytest.fixture(scope="module")
def reference_after_3_steps():
    return reference_run(3, ROWS)[1]


RESUME_LAYOUTS = {  # name: (dims, world, sharding, bucket); world 1: one process with torch AdamW
    "ZeRO1-DP2": (ParallelDims(dp=2), 2, "zero1", None),
    "ZeRO2-CP2xDP2-other-buckets": (ParallelDims(dp=2, cp=2), 4, "zero2", 5000),
    "single": (None, 1, None, None),
}


@pytest.mark.parametrize("name", list(RESUME_LAYOUTS))
def test_zero2_checkpoint_resumes_under_another_layout(zero2_checkpoint, reference_after_3_steps, name):
    path, round_trips = zero2_checkpoint
    assert round_trips == [[], []]  # same layout: bitwise
    dims, world, sharding, bucket = RESUME_LAYOUTS[name]
    results = (_resume_single_process(path) if world == 1
               else run_ranks(world, _resume, dims, sharding, bucket, str(path)))
    for extra, params in results:
        assert extra == {"step": 2}
        for pname, ref in reference_after_3_steps.items():
            torch.testing.assert_close(params[pname], ref, rtol=0, atol=1e-10, msg=f"{name}: {pname}")
