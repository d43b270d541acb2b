"""Shared fixtures of the layout tests: a tiny Keye model, rows with images and a Slow-Fast
video in every step, and the single-process reference step they must equal."""
from __future__ import annotations

import dataclasses

import torch

from keyetron.batch import PackedBatch
from keyetron.data.packing import build_row
from keyetron.model import build_model, load_model_config
from keyetron.objectives import LanguageModelObjective
from keyetron.optim import OptimSection, optimizer_param_groups
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.engine import ParallelEngine
from keyetron.parallel.parallelize import parallelize_keye
from synthetic import accumulate_gradients, make_document

OPTIM = OptimSection(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=0.5,
                     lr_scale={"vit": 2.0})


def tiny_config(num_layers: int | None = None):
    """The tiny test model; pipeline tests give it more decoder layers to split."""
    cfg = load_model_config("tiny")
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=num_layers))
    return cfg


PP_LAYERS = 4  # decoder layers of the pipeline tests' model (2 stages x 2 virtual stages)
PP_ROW = 80  # pipeline tests pad every row to this length (static activation shapes)


def step_rows(step: int, n_rows: int, cfg=None, row_tokens: int | None = None) -> list[PackedBatch]:
    """``n_rows`` packed rows for ``step``: every row has text, an image and a slow/fast video;
    with ``row_tokens`` each row is padded to that length (a padding document, no loss)."""
    cfg = cfg or tiny_config()
    gen = torch.Generator().manual_seed(1000 + step)
    rows = []
    for r in range(n_rows):
        docs = [
            make_document(cfg, gen, text=5 + r, images=[(4, 4)], dtype=torch.float64, sample_id=f"s{step}r{r}a"),
            make_document(cfg, gen, text=3, video=[(4, 4), (2, 2), (4, 4)], dtype=torch.float64,
                          sample_id=f"s{step}r{r}v"),
            make_document(cfg, gen, text=7 + 2 * r, dtype=torch.float64, sample_id=f"s{step}r{r}t"),
        ]
        rows.append(build_row(docs, row_tokens) if row_tokens else PackedBatch.from_documents(docs))
    return rows


def fresh_model(cfg=None):
    return build_model(cfg or tiny_config(), dtype=torch.float64, seed=0)


def build_engine(model, topo, *, sharding: str = "zero1", sequence_parallel: bool = True, schedule: str = "1f1b",
                 virtual: int = 1, row_tokens: int | None = None, micro_batches: int = 1, objective=None,
                 bucket_numel: int | None = None) -> ParallelEngine:
    """The layout installed on ``model`` and the engine that steps it with the LM objective."""
    cfg = ParallelConfig(sharding=sharding, sequence_parallel=sequence_parallel, schedule=schedule,
                         virtual_stages=virtual)
    par = parallelize_keye(model, topo, cfg, row_tokens=row_tokens, micro_batches=micro_batches)
    return ParallelEngine(par, objective or LanguageModelObjective(), OPTIM, bucket_numel=bucket_numel)


def reference_run(steps: int, n_rows: int, cfg=None, row_tokens: int | None = None, objective=None,
                  rows_of=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process: all rows of a step accumulated, global-norm clipping, AdamW (default
    objective: the language model's; default rows: ``step_rows``, else ``rows_of(step)``)."""
    objective = objective or LanguageModelObjective()
    model = fresh_model(cfg)
    opt = torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)
    losses = []
    for step in range(steps):
        rows = rows_of(step) if rows_of else step_rows(step, n_rows, cfg, row_tokens)
        opt.zero_grad(set_to_none=True)
        total = accumulate_gradients(model, rows, "cpu", None, objective)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
        opt.step()
        losses.append(total / sum(objective.count(r) for r in rows))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
