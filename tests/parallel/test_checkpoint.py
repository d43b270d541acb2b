"""Distributed checkpoints are layout-independent: a checkpoint written under TP2 with ZeRO-1
after 2 steps resumes under CP2xDP2 (ZeRO over 4 ranks), DP2 without ZeRO and in one process
with torch AdamW, and the 3rd step equals the single-process reference (fp64, 1e-10).
Under each of those layouts and TP2 a save/load round trip is bitwise exact (model, master
weights, AdamW state, step, lr); a checkpoint refuses a model with another config, naming
the checkpoint and the key."""
from dataclasses import replace

import pytest
import torch

from distributed import run_ranks
from keyetron.parallel.sharded_checkpoint import flat_range_blocks, load_distributed, load_into_single_process, save_distributed
from keyetron.parallel.topology import ParallelDims, Topology
from keyetron.optim import optimizer_param_groups
from synthetic import accumulate_gradients
from layouts import OPTIM, build_engine, fresh_model, reference_run, step_rows, tiny_config

ROWS = 2
EXTRA = {"step": 2, "scheduler": {"last_epoch": 2, "base_lrs": [0.01, 0.02]}}


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _my_rows(topo, step):
    share = ROWS // topo.dims.dp
    return step_rows(step, ROWS)[topo.dp_rank * share:(topo.dp_rank + 1) * share]


def _build(topo, zero1):
    model = fresh_model()
    return model, build_engine(model, topo, sharding="zero1" if zero1 else "none")


def training_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor this rank holds: model state, and per optimizer group its lr, its
    parameters (ZeRO: the master slice) and their AdamW state."""
    out = {f"model.{k}": _local(v).detach().clone() for k, v in model.state_dict().items()}
    inner = getattr(optimizer, "inner", optimizer)
    for gi, g in enumerate(inner.param_groups):
        out[f"group{gi}.lr"] = torch.tensor(g["lr"], dtype=torch.float64)
        for pi, p in enumerate(g["params"]):
            out[f"group{gi}.{pi}"] = _local(p).detach().clone()
            for k, v in inner.state.get(p, {}).items():
                out[f"group{gi}.{pi}.{k}"] = _local(v).detach().clone()
    return out


def not_bitwise_equal(a: dict, b: dict) -> list[str]:
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b))
                                      if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _scale_lrs(optimizer, factor):  # a scheduler's change of lr, exact in binary floating point
    for g in getattr(optimizer, "inner", optimizer).param_groups:
        g["lr"] *= factor


def _train_and_save(rank, world, dims, zero1, path):
    """Two steps, save, and load into a fresh engine of the same layout (the round trip)."""
    topo = Topology.from_process_group(dims, "cpu")
    model, engine = _build(topo, zero1)
    for step in range(2):
        engine.step(_my_rows(topo, step))
    save_distributed(path, model, engine.optimizer, topo, EXTRA)
    model2, engine2 = _build(topo, zero1)
    extra = load_distributed(path, model2, engine2.optimizer, topo)
    return None, extra, not_bitwise_equal(training_state(model, engine.optimizer),
                                          training_state(model2, engine2.optimizer)), None


def _resume(rank, world, dims, zero1, path, own_path):
    """Load ``path``; round-trip through ``own_path`` into a fresh engine; take step 3 with it."""
    topo = Topology.from_process_group(dims, "cpu")
    model, engine = _build(topo, zero1)
    extra = load_distributed(path, model, engine.optimizer, topo)
    _scale_lrs(engine.optimizer, 0.5)
    save_distributed(own_path, model, engine.optimizer, topo, {"own": 1})
    model2, engine2 = _build(topo, zero1)
    own_extra = load_distributed(own_path, model2, engine2.optimizer, topo)
    diffs = not_bitwise_equal(training_state(model, engine.optimizer), training_state(model2, engine2.optimizer))
    _scale_lrs(engine2.optimizer, 2.0)
    engine2.step(_my_rows(topo, 2))
    params = {n: _full(p) for n, p in model2.named_parameters()}
    return extra, own_extra, diffs, params if rank == 0 else None


def _resume_single_process(path, own_path):
    def build():
        model = fresh_model()
        return model, torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)

    model, opt = build()
    extra = load_into_single_process(path, model, opt)
    _scale_lrs(opt, 0.5)
    save_distributed(own_path, model, opt, Topology.single(), {"own": 1})
    model2, opt2 = build()
    own_extra = load_into_single_process(own_path, model2, opt2)
    diffs = not_bitwise_equal(training_state(model, opt), training_state(model2, opt2))
    _scale_lrs(opt2, 2.0)
    rows = step_rows(2, ROWS)
    opt2.zero_grad(set_to_none=True)
    accumulate_gradients(model2, rows, "cpu", None)
    torch.nn.utils.clip_grad_norm_(model2.parameters(), OPTIM.clip_grad)
    opt2.step()
    return [(extra, own_extra, diffs, {n: p.detach().clone() for n, p in model2.named_parameters()})]


@pytest.fixture(scope="module")
def saved_tp2_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tp2-step2"
    return path, run_ranks(2, _train_and_save, ParallelDims(tp=2), True, str(path))


@pytest.fixture(scope="module")
def saved_tp2(saved_tp2_run):
    return saved_tp2_run[0]


LOAD_LAYOUTS = {  # name: (dims, world, zero1); world 1 is one process with torch AdamW, no process group
    "CP2xDP2": (ParallelDims(dp=2, cp=2), 4, True),
    "DP2-noZeRO": (ParallelDims(dp=2), 2, False),
    "single": (None, 1, False),
}


@pytest.fixture(scope="module")
def resumed(saved_tp2_run, tmp_path_factory):
    """Each layout's resume run, made once and shared by the tests that read it."""
    saved_tp2, cache = saved_tp2_run[0], {"TP2": saved_tp2_run[1]}

    def get(name):
        if name not in cache:
            dims, world, zero1 = LOAD_LAYOUTS[name]
            own = str(tmp_path_factory.mktemp("own") / name)
            cache[name] = (_resume_single_process(saved_tp2, own) if world == 1
                           else run_ranks(world, _resume, dims, zero1, str(saved_tp2), own))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def reference():
    return reference_run(3, ROWS)[1]


@pytest.mark.parametrize("name", list(LOAD_LAYOUTS))
def test_tp2_zero_checkpoint_resumes_under_another_layout(resumed, reference, name):
    results = resumed(name)
    assert all(extra == EXTRA for extra, *_ in results)
    params = results[0][3]
    assert set(params) == set(reference)
    for pname, ref in reference.items():
        torch.testing.assert_close(params[pname], ref, rtol=0, atol=1e-10, msg=f"{name}: {pname}")


@pytest.mark.parametrize("name", ["TP2", *LOAD_LAYOUTS])
def test_round_trip_under_same_layout_is_bitwise_exact(resumed, name):
    for rank, (_, own_extra, diffs, _) in enumerate(resumed(name)):
        assert own_extra == (EXTRA if name == "TP2" else {"own": 1})
        assert diffs == [], f"{name} rank {rank}: differs after save/load: {diffs[:5]}"


@pytest.mark.parametrize("change, key", [
    ({"intermediate_size": 96}, "llm.layers.0.mlp.gate_proj.weight has shape (64, 32) in the checkpoint, (96, 32)"),
    ({"num_layers": 3}, "llm.layers.2.input_layernorm.weight is missing from the checkpoint"),
])
def test_checkpoint_refuses_a_model_with_another_config(saved_tp2, change, key):
    cfg = tiny_config()
    model = fresh_model(replace(cfg, text=replace(cfg.text, **change)))
    with pytest.raises(ValueError) as err:
        load_into_single_process(saved_tp2, model, None)
    assert str(saved_tp2) in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5), ()])
def test_flat_range_blocks_tile_the_range_exactly(shape):
    n = max(1, torch.Size(shape).numel())
    values = torch.arange(n).reshape(shape)
    for start in range(n):
        for stop in range(start, n + 1):
            seen = []
            for offsets, sizes, flat in flat_range_blocks(shape, start, stop):
                block = values[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                assert block.reshape(-1).tolist() == list(range(flat, flat + block.numel()))
                seen += block.reshape(-1).tolist()
            assert seen == list(range(start, stop))
