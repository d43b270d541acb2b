"""An objective written in this one file, with nothing added to ``keyetron.parallel``, trains under
DP2 (with and without ZeRO-1), TP2, CP2 and PP2 exactly as in one process: loss, its logged
extra and every parameter after 3 fp64 AdamW steps with clipping (1e-10).

The toy is sequence-level on purpose, the hard case for a layout: per document, the softplus of
minus the mean log-probability of its targets. The mean is nonlinear in the document's sums, so
under context parallelism, where a long document is split over ranks, it is only right if the
sums cover the whole document on every rank and each document is counted once
(``ModelOutput.document_sums`` / ``counted_documents``)."""
import pytest
import torch
import torch.nn.functional as F

from distributed import run_ranks
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.objectives import Objective, ObjectiveLoss
from keyetron.parallel.topology import ParallelDims, Topology
from layouts import PP_LAYERS, PP_ROW, build_engine, fresh_model, reference_run, step_rows, tiny_config
from synthetic import make_document

STEPS = 3


class DocumentMeanLogProb(Objective):
    """softplus(-mean target log-probability) per document; normalised per document."""

    name = "document_mean_logprob"
    unit = "documents"
    metric_names = ("mean_logprob",)

    def count(self, batch) -> int:
        """Documents with at least one target (padding documents have none)."""
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        document = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        targets = torch.zeros(lengths.numel()).index_add(0, document, (batch.targets != IGNORE_INDEX).float())
        return int((targets > 0).sum())

    def forward(self, output, batch) -> ObjectiveLoss:
        logprobs = output.token_logprobs()
        sums = output.document_sums(torch.stack([logprobs, torch.ones_like(logprobs)], dim=1))  # whole documents
        counted = output.counted_documents() & (sums[:, 1] > 0)
        mean = sums[:, 0] / sums[:, 1].clamp(min=1)
        return ObjectiveLoss((F.softplus(-mean) * counted).sum(), int(counted.sum()),
                             {"mean_logprob": (mean * counted).sum()})


def rows_of(step: int, pp: bool) -> list[PackedBatch]:
    """The layout tests' rows (text, an image, a Slow-Fast video) for pipelines (static shapes);
    otherwise rows that also hold a long text document, longer than half the row, so context
    parallelism splits it over its two ranks."""
    if pp:
        return step_rows(step, 4, tiny_config(PP_LAYERS), PP_ROW)
    cfg, gen = tiny_config(), torch.Generator().manual_seed(2000 + step)
    return [PackedBatch.from_documents([
        make_document(cfg, gen, text=40, sample_id=f"s{step}r{r}long"),
        make_document(cfg, gen, text=5 + r, images=[(4, 4)], sample_id=f"s{step}r{r}a"),
        make_document(cfg, gen, text=3, video=[(4, 4), (2, 2), (4, 4)], sample_id=f"s{step}r{r}v"),
    ]) for r in range(2)]


def _run(rank, world, dims, sharding, pp):
    topo = Topology.from_process_group(dims, "cpu")
    cfg, row_tokens = (tiny_config(PP_LAYERS), PP_ROW) if pp else (None, None)
    rows_per_step = 4 if pp else 2
    per_rank = rows_per_step // topo.dims.dp
    model = fresh_model(cfg)
    engine = build_engine(model, topo, sharding=sharding, objective=DocumentMeanLogProb(), row_tokens=row_tokens,
                          micro_batches=per_rank)
    losses, extras, split = [], [], 0
    for step in range(STEPS):
        rows = rows_of(step, pp)[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
        split += sum(len(engine.par.slicer(r).attention.plan.split_documents) for r in rows) if dims.cp > 1 else 0
        stats = engine.step(rows)
        losses.append(stats.loss)
        extras.append(stats.metrics["mean_logprob"])
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, extras, params, split


@pytest.fixture(scope="module")
def references():
    return {pp: reference_run(STEPS, 4 if pp else 2, tiny_config(PP_LAYERS) if pp else None,
                              objective=DocumentMeanLogProb(), rows_of=lambda step, pp=pp: rows_of(step, pp))
            for pp in (False, True)}


def _reference_extras(pp: bool) -> list[float]:
    """The logged mean log-probability of each step in one process (the parameters of the step's start)."""
    model = fresh_model(tiny_config(PP_LAYERS) if pp else None)
    engine = build_engine(model, Topology.single(), objective=DocumentMeanLogProb())
    return [engine.step(rows_of(step, pp)).metrics["mean_logprob"] for step in range(STEPS)]


LAYOUTS = {  # name: (dims, sharding, pipeline)
    "DP2": (ParallelDims(dp=2), "none", False),
    "DP2-ZeRO1": (ParallelDims(dp=2), "zero1", False),
    "TP2": (ParallelDims(dp=1, tp=2), "zero1", False),
    "CP2": (ParallelDims(dp=1, cp=2), "zero1", False),
    "PP2": (ParallelDims(dp=1, pp=2), "zero1", True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_plugin_objective_equals_one_process_under_every_layout(references, name):
    dims, sharding, pp = LAYOUTS[name]
    ref_losses, ref_params = references[pp]
    ref_extras = _reference_extras(pp)
    seen = set()
    for losses, extras, params, split in run_ranks(dims.world_size, _run, dims, sharding, pp):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        assert extras == pytest.approx(ref_extras, rel=1e-12, abs=1e-12)
        for pname, value in params.items():
            torch.testing.assert_close(value, ref_params[pname], rtol=0, atol=1e-10, msg=f"{name}: {pname}")
            seen.add(pname)
        if dims.cp > 1:
            assert split > 0, "no document was split over the context-parallel ranks: the test would prove nothing"
    assert seen == set(ref_params)
