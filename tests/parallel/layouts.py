"""Shared fixtures of the layout tests: a tiny Keye model, rows with images and a Slow-Fast
video in every step, and the single-process reference step they must equal."""
from __future__ import annotations

import dataclasses

import torch

from keyetron.data.batch import PackedBatch
from keyetron.data.packing import build_row
from keyetron.model import build_model, load_model_config
from keyetron.train.recipe import OptimSection
from keyetron.train.trainer import accumulate_gradients, optimizer_param_groups
from synthetic import make_document

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


def reference_run(steps: int, n_rows: int, cfg=None, row_tokens: int | None = None
                  ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process: all rows of a step accumulated, global-norm clipping, AdamW."""
    model = fresh_model(cfg)
    opt = torch.optim.AdamW(optimizer_param_groups(model, OPTIM), betas=OPTIM.betas, eps=OPTIM.eps)
    losses = []
    for step in range(steps):
        rows = step_rows(step, n_rows, cfg, row_tokens)
        opt.zero_grad(set_to_none=True)
        total = accumulate_gradients(model, rows, "cpu", None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
        opt.step()
        losses.append(total / sum(r.num_loss_tokens for r in rows))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
