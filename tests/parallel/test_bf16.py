"""``train.precision: bf16`` (bf16 weights, fp32 main gradients, fp32 masters) under every layout.

Tolerance, derived: bf16 keeps 8 significant bits (unit roundoff u = 2**-8 = 3.9e-3). The
forward of the 2-layer tiny model rounds activations a few dozen times per path, with
errors that mostly cancel in the mean over tokens: the loss of a step lands within a few u
of the fp32 loss (measured: < 1e-3 relative); we allow 2.5e-2. AdamW
divides each gradient by its running RMS, so a relative gradient error e moves an update
of size lr by about e * lr; over 3 steps at lr 1e-2 with gradient errors of a few u the
fp32 master weights stay within ~3 * 1e-2 * 10 u = 1.2e-3 of the fp32 run, except where
a gradient is itself at the rounding level and its sign is noise: there an update can
differ by up to 2 lr per step. So we compare the *whole* update: the distance between the
bf16 and the fp32 run's weights must stay under 20% of the distance the fp32 run moved
(one process in bf16 measures 5.6% over the whole model and 12.9% over pipeline stage 0's
parameters, whose embedding rows and ViT see the smallest gradients), and every master must
be within 3 steps x 2 lr (the ViT's lr is 2 x 1e-2: 0.12). A layout whose gradient were
wrong (a rank stepping on its own rows only, a dropped micro-batch) changes the update's
direction, not just its rounding: one process stepping on 2 of the 4 rows lands 63% away.
"""
import pytest
import torch

from distributed import run_ranks
from keyetron.model import build_model
from keyetron.objectives import LanguageModelObjective
from keyetron.optim import optimizer_param_groups
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.engine import ParallelEngine
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.topology import ParallelDims, Topology
from layouts import OPTIM, PP_LAYERS, PP_ROW, step_rows, tiny_config
from synthetic import accumulate_gradients

STEPS, ROWS = 3, 4
LOSS_RTOL = 2.5e-2
UPDATE_RATIO = 0.20
MAX_WEIGHT_DIFF = STEPS * 2 * OPTIM.lr * max(OPTIM.lr_scale.values())  # the ViT's lr is scaled


def _rows(step: int, pp: bool):
    rows = step_rows(step, ROWS, tiny_config(PP_LAYERS) if pp else None, PP_ROW if pp else None)
    for row in rows:  # the documents carry fp64 pixels: what the loader would give, in fp32
        row.pixel_values = row.pixel_values.float() if row.pixel_values is not None else None
    return rows


def fp32_reference(pp: bool):
    cfg = tiny_config(PP_LAYERS) if pp else tiny_config()
    model = build_model(cfg, dtype=torch.float32, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = LanguageModelObjective()
    opt = torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)
    losses = []
    for step in range(STEPS):
        rows = _rows(step, pp)
        opt.zero_grad(set_to_none=True)
        total = accumulate_gradients(model, rows, "cpu", None, objective)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
        opt.step()
        losses.append(total / sum(objective.count(r) for r in rows))
    return losses, start, {n: p.detach().clone() for n, p in model.named_parameters()}


def _masters(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value as the optimizer holds it (master, FSDP shard, ZeRO slice)."""
    model = engine.model
    opt = engine.optimizer
    out = {}
    of = {id(p): m for p, m in opt.masters.of.items()}
    for name, p in model.named_parameters():
        t = of.get(id(p), p)
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()
    return out


def _run(rank, world, dims, sharding, pp):
    topo = Topology.from_process_group(dims, "cpu") if world > 1 else Topology.single()
    model = build_model(tiny_config(PP_LAYERS) if pp else tiny_config(), dtype=torch.float32, seed=0)
    par = parallelize_keye(model, topo, ParallelConfig(sharding=sharding), row_tokens=PP_ROW if pp else None,
                           micro_batches=ROWS // topo.dims.dp, param_dtype=torch.bfloat16)
    engine = ParallelEngine(par, LanguageModelObjective(), OPTIM)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not n.startswith("llm.")
               or sharding != "fsdp2")
    per = ROWS // topo.dims.dp
    losses = []
    for step in range(STEPS):
        rows = _rows(step, pp)[topo.dp_rank * per:(topo.dp_rank + 1) * per]
        losses.append(engine.step(rows).loss)
    # after the step, the bf16 weights are the masters rounded
    for name, p in model.named_parameters():
        if p.dtype == torch.bfloat16:
            master = _masters(engine)[name]
            full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            assert torch.equal(full, master.to(torch.bfloat16)), name
    return losses, _masters(engine)


@pytest.fixture(scope="module")
def reference():
    return {pp: fp32_reference(pp) for pp in (False, True)}


LAYOUTS = {  # name: (dims, world, sharding, pipeline)
    "single": (ParallelDims(), 1, "none", False),
    "DP2": (ParallelDims(dp=2), 2, "none", False),
    "DP2-ZeRO1": (ParallelDims(dp=2), 2, "zero1", False),
    "DP2-ZeRO2": (ParallelDims(dp=2), 2, "zero2", False),
    "DP2-FSDP2": (ParallelDims(dp=2), 2, "fsdp2", False),
    "TP2": (ParallelDims(tp=2), 2, "zero1", False),
    "CP2": (ParallelDims(cp=2), 2, "zero1", False),
    "PP2": (ParallelDims(pp=2), 2, "zero1", True),
    "TP2xDP2-ZeRO1": (ParallelDims(dp=2, tp=2), 4, "zero1", False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_layout_follows_the_fp32_single_process_run(reference, name):
    dims, world, sharding, pp = LAYOUTS[name]
    ref_losses, start, ref = reference[pp]
    results = run_ranks(world, _run, dims, sharding, pp) if world > 1 else [_run(0, 1, dims, sharding, pp)]
    for losses, masters in results:
        assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
        names = list(masters)  # a pipeline stage holds its own layers
        moved = torch.sqrt(sum(((ref[n] - start[n]) ** 2).sum() for n in names))
        off = torch.sqrt(sum(((masters[n] - ref[n]) ** 2).sum() for n in names))
        assert off < UPDATE_RATIO * moved, f"{name}: bf16 weights are {off:.4g} from fp32's, which moved {moved:.4g}"
        worst = max((masters[n] - ref[n]).abs().max().item() for n in names)
        assert worst <= MAX_WEIGHT_DIFF, f"{name}: a weight differs from fp32's by {worst}"


def test_the_main_gradient_of_an_accumulated_step_is_the_fp32_sum_of_the_micro_batches():
    """Eight micro-batches: the engine's fp32 main gradient equals the fp32 sum of each
    micro-batch's bf16 gradient, and a bf16 running sum (what autograd would keep in a bf16
    ``.grad``) would not."""
    rows = [r for step in range(2) for r in _rows(step, False)]
    model = build_model(tiny_config(), dtype=torch.float32, seed=0)
    par = parallelize_keye(model, Topology.single(), param_dtype=torch.bfloat16)
    engine = ParallelEngine(par, LanguageModelObjective(), OPTIM)
    engine.forward_backward(rows)
    main = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.main_grad is not None}

    count = sum(engine.objective.count(r) for r in rows)
    fp32_sum, bf16_sum = {}, {}
    for row in rows:  # each micro-batch alone, as the engine scales it
        engine.optimizer.zero_grad()
        loss = engine.objective(model(row), row).loss_sum / count
        loss.backward()
        for n, p in model.named_parameters():
            g = p.main_grad  # this micro-batch's bf16 gradient, widened
            if g is None:
                continue
            fp32_sum[n] = fp32_sum[n] + g if n in fp32_sum else g.clone()
            bf16_sum[n] = (bf16_sum[n] + g.to(torch.bfloat16)) if n in bf16_sum else g.to(torch.bfloat16)
    assert set(main) == set(fp32_sum)
    for n in main:
        torch.testing.assert_close(main[n], fp32_sum[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(bf16_sum[n].float(), main[n]) for n in main), "a bf16 sum would have passed"


def _full_masters(engine) -> dict[str, torch.Tensor]:
    """Every LLM parameter's fp32 master, gathered from the ZeRO slices (and the ViT's masters)."""
    import torch.distributed as dist

    opt, names = engine.optimizer, {id(p): n for n, p in engine.model.named_parameters()}
    out = {names[id(p)]: m.detach().clone() for p, m in opt.masters.of.items()}
    for layout, g in zip(opt.layouts, opt.param_groups):
        if layout is None:
            continue
        params, numels, padded, _size = layout
        flat = torch.empty(padded, dtype=torch.float32)
        dist.all_gather_into_tensor(flat, g["params"][0].detach(), group=opt.group)
        offset = 0
        for p, n in zip(params, numels):
            out[names[id(p)]] = flat[offset:offset + n].view_as(p).clone()
            offset += n
    return out


def _save_bf16_zero1(rank, world, path):
    from keyetron.parallel.sharded_checkpoint import save_distributed

    topo = Topology.from_process_group(ParallelDims(dp=2), "cpu")
    model = build_model(tiny_config(), dtype=torch.float32, seed=0)
    par = parallelize_keye(model, topo, ParallelConfig(sharding="zero1"), param_dtype=torch.bfloat16)
    engine = ParallelEngine(par, LanguageModelObjective(), OPTIM)
    for step in range(2):
        engine.step(_rows(step, False)[rank * 2:(rank + 1) * 2])
    save_distributed(path, engine.modules, engine.optimizer, topo)
    return _full_masters(engine)


def test_a_bf16_zero1_checkpoint_loads_exactly_into_one_fp32_process_and_back(tmp_path):
    from keyetron.parallel.sharded_checkpoint import load_distributed, save_distributed

    masters = run_ranks(2, _save_bf16_zero1, tmp_path / "bf16")[0]
    model = build_model(tiny_config(), dtype=torch.float32, seed=1)  # other weights: all must be loaded
    engine = ParallelEngine(parallelize_keye(model, Topology.single()), LanguageModelObjective(), OPTIM)
    load_distributed(tmp_path / "bf16", engine.modules, engine.optimizer, Topology.single())
    params = dict(model.named_parameters())
    assert set(params) == set(masters)
    for name, master in masters.items():
        assert torch.equal(params[name].detach(), master), name  # fp32 values, not the bf16 rounding
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters.values())
    # ... and an fp32 checkpoint into a bf16 run: masters exact, weights rounded from them
    save_distributed(tmp_path / "fp32", engine.modules, engine.optimizer, Topology.single())
    model = build_model(tiny_config(), dtype=torch.float32, seed=2)
    engine = ParallelEngine(parallelize_keye(model, Topology.single(), param_dtype=torch.bfloat16),
                            LanguageModelObjective(), OPTIM)
    load_distributed(tmp_path / "fp32", engine.modules, engine.optimizer, Topology.single())
    for p, m in engine.optimizer.masters.of.items():
        name = next(n for n, q in model.named_parameters() if q is p)
        assert torch.equal(m, masters[name]) and torch.equal(p.detach(), masters[name].to(torch.bfloat16)), name
