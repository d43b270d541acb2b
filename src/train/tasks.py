"""What each recipe objective brings to the one training loop (``keyetron.train.trainer``).

A task is an objective (``keyetron.objectives``) plus what goes with it: the model it trains
(built and initialised identically on every rank), the loader of its batches, how its FLOPs
are counted, how it is evaluated and what it adds to the logged metrics. Everything else —
the parallel layout, the engine's step, checkpoints, resume, the LR schedule, logging,
preemption — is the trainer's, the same for every task.

- ``LanguageModelTask`` (``train.objective: lm``, stages 1-3): the whole Keye model, packed
  rows from the one loader (streaming or cost-balanced, topology-aware under a parallel
  layout), exact-match evaluation of greedy answers.
- ``ContrastiveTask`` (``train.objective: siglip``, stage 0): the ViT against a SigLIP text
  tower (``ContrastiveObjective``), image-caption pair batches, retrieval evaluation. Only
  the ViT runs; the projector and the LLM are *carried*: global rank 0 keeps them in host
  memory so that the run's checkpoints hold a whole Keye model for stage 1's ``model.init``.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from keyetron.backend.device import autocast
from keyetron.data.dataset import DocumentBuilder, SampleCost, SampleDataset
from keyetron.data.pairs import (CaptionTokenizer, ContrastiveBatch, ContrastiveBatchBuilder, PairBatches, PairDataset,
                                 build_each, read_image_captions)
from keyetron.data.sources import ConcatSource, open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.flops import FlopCount, FlopCounter, frame_patches, parameter_counts_from_config
from keyetron.model import build_model
from keyetron.model.siglip_text import load_siglip_checkpoint, load_text_config
from keyetron.objectives import LanguageModelObjective
from keyetron.objectives.contrastive import PARTS, ContrastiveObjective, build_contrastive_objective
from keyetron.optim import MODULES, top_level_part
from keyetron.parallel.balancer import CostModel
from keyetron.parallel.loading import build_loader, ensure_cost_index
from keyetron.train.evaluate import evaluate
from keyetron.train.merge import init_from_checkpoint

log = logging.getLogger("keyetron.train")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


class LanguageModelTask:
    """Next-token prediction of packed rows with the whole model (see the module docstring)."""

    objective_name = "lm"
    parts = MODULES  # ``optim.lr_scale`` keys, the order of the optimizer groups
    part_of = staticmethod(top_level_part)

    def __init__(self, trainer):
        r = trainer.recipe
        self.recipe = r
        self.model = build_model(trainer.cfg, device=trainer.device, seed=r.train.seed)
        if r.model.init:
            init_from_checkpoint(self.model, r.model.init)
        self.objective = LanguageModelObjective()
        self.carried: dict[str, nn.Module] = {}
        self.lr_scale = r.optim.lr_scale

    def build_data(self, trainer) -> None:
        """The tokenizer, the training and eval datasets, and this rank's loader of packed rows."""
        from keyetron.io.client import decoder_from_config

        r, topo = self.recipe, trainer.topo
        self.tokenizer = KeyeTokenizer(trainer.cfg.tokenizer)
        builder = DocumentBuilder(trainer.cfg, self.tokenizer, r.data.media, decoder=decoder_from_config(r.data))
        self.dataset = SampleDataset(ConcatSource([open_source(s) for s in r.data.sources]), builder)
        cfg = r.data.loader
        costs = cost_model = None
        if cfg.balance:
            costs = ensure_cost_index(self.dataset, cfg.cost_index or trainer.out / "cost_index.json", topo)
            cost_model = CostModel.load(cfg.calibration) if cfg.calibration else \
                CostModel.from_flops(trainer.cfg, trainer.trainable)
        # Data-parallel ranks share one global order; under a parallel layout only pipeline stage 0
        # reads, each sample once (keyetron.parallel.loading).
        self.loader = build_loader(self.dataset, cfg, topo, pad_token_id=self.tokenizer.pad_id,
                                   rows_per_step=r.train.grad_accum, costs=costs, cost_model=cost_model)
        self.eval_dataset = SampleDataset(open_source(r.data.eval), builder) if r.data.eval else None
        self.counter = FlopCounter(trainer.cfg, trainer.trainable)

    def flops(self, batch) -> FlopCount:
        return self.counter.count_batch(batch)

    def evaluate(self, trainer, checkpoint) -> tuple[dict, str, dict] | None:
        """Exact match of greedy answers on the eval split, in one process: the training model, or
        under a parallel layout the whole model read back from ``checkpoint`` on rank 0."""
        if self.eval_dataset is None:
            return None
        model = trainer.model
        if trainer.topo.distributed:
            from keyetron.parallel.sharded_checkpoint import load_into_single_process

            if not trainer.is_main or checkpoint is None:
                return None
            model = build_model(trainer.cfg, device=trainer.device, seed=self.recipe.train.seed)
            load_into_single_process(checkpoint, model, None)
        ev = self.recipe.eval
        report = evaluate(model, self.eval_dataset, device=trainer.device, dtype=trainer.autocast_dtype,
                          max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, max_samples=ev.max_samples)
        for sid, want, got in report.examples[:6]:
            log.info("  eval %s: expected %r, generated %r", sid, want, got)
        summary = {"exact_match": report.exact_match, "majority_baseline": report.majority_baseline,
                   "per_type_majority_baseline": report.per_type_majority_baseline, "samples": report.samples,
                   "by_type": report.by_type, "skipped": report.skipped}
        return report.metrics(), report.summary(), summary

    def metrics(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict:
        return {}


def caption_tokenizer_path(recipe) -> str | None:
    """``contrastive.tokenizer``; unset: the SigLIP checkpoint's tokenizer when the folder has one,
    else None (the Qwen3 tokenizer, for towers with its vocabulary: ``tiny``, ``small``)."""
    from pathlib import Path

    c = recipe.contrastive
    if c.tokenizer:
        return c.tokenizer
    folder = Path(c.siglip_checkpoint) if c.siglip_checkpoint else None
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        return str(folder)
    return None


class ContrastiveFlops:
    """Counted FLOPs of a stage-0 step by ``keyetron.flops``'s rules: the ViT per image (its
    counter), the pooling head's key/value projections per patch and MLP per image, the text
    tower per fixed-length caption (forward only when frozen). The loss itself is negligible."""

    def __init__(self, cfg, text, vit_trains: bool, text_trains: bool):
        self.vit = FlopCounter(cfg, {"vit": vit_trains, "projector": False, "llm": False})
        d, mlp = cfg.vision.hidden_size, cfg.vision.intermediate_size
        self.head_per_patch = 6 * 2 * d * d
        self.head_per_image = 6 * (2 * d * d + 2 * d * mlp)
        h, n = text.hidden_size, text.max_length
        linear = text.num_layers * (4 * h * h + 2 * h * text.intermediate_size) + h * text.projection_size
        attention = 12 * text.num_layers * h * n * n
        self.text_per_caption = 6 * linear * n + attention if text_trains else 2 * linear * n + attention // 3

    def count(self, batch: ContrastiveBatch) -> FlopCount:
        vit = self.vit.count([], frame_patches(batch.vision_grid_thw))
        per_pair = self.head_per_image + self.text_per_caption
        towers = self.head_per_patch * batch.num_tokens + per_pair * batch.num_pairs
        return FlopCount(vit_linear=vit.vit_linear, vit_attention=vit.vit_attention, objective=towers)


class ContrastiveTask:
    """Stage 0: the ViT against a SigLIP text tower on image-caption pairs (see the module docstring).

    Weights (``model.init``, ``contrastive.siglip_checkpoint``) are read on global rank 0 only,
    which alone carries the projector and LLM (on the host); the other ranks build the ViT
    and the objective and receive rank 0's weights."""

    objective_name = "siglip"
    parts = PARTS
    part_of = staticmethod(ContrastiveObjective.part_of)

    def __init__(self, trainer):
        r, c, topo = trainer.recipe, trainer.recipe.contrastive, trainer.topo
        self.recipe = r
        dims = topo.dims
        if dims.tp != 1 or dims.pp != 1 or dims.cp != 1:
            raise ValueError(f"layout {dims}: stage 0 (train.objective: siglip) is data parallel only; set "
                             "parallel.tp, parallel.pp and parallel.cp to 1")
        self.text_cfg = load_text_config(c.text_tower)
        self.lr_scale = c.lr_scale
        self.carried = {}
        failure = None
        try:
            full = None
            if trainer.is_main:
                full = build_model(trainer.cfg, device="cpu", seed=r.train.seed)
                if r.model.init:
                    init_from_checkpoint(full, r.model.init)
            siglip = build_contrastive_objective(trainer.cfg.vision, self.text_cfg,
                                                 vit=full.vit if full is not None else None,
                                                 freeze_text=c.freeze_text_tower, seed=r.train.seed,
                                                 device=trainer.device)
            if trainer.is_main and c.siglip_checkpoint:
                loaded = load_siglip_checkpoint(siglip, c.siglip_checkpoint, vision=c.load_vit)
                log.info("loaded %d tensors of SigLIP checkpoint %s", len(loaded), c.siglip_checkpoint)
        except Exception as err:  # the other ranks must hear of it before they wait for the weights
            failure = err
        _agree(topo, failure, trainer.device)
        if topo.distributed:  # every rank starts from rank 0's weights
            for p in siglip.parameters():
                dist.broadcast(p.data, src=0, group=topo.group("dp"))
        # The model trained here holds the ViT alone (its forward gives the ViT's features): built
        # on the meta device (nothing allocated) and handed the real ViT.
        self.model = build_model(trainer.cfg, device="meta")
        self.model.vit, self.model.projector, self.model.llm = siglip.vit, None, None
        if full is not None:
            self.carried = {"projector": full.projector, "llm": full.llm}
        self.objective = siglip.objective
        self.objective.negatives_group = topo.group("dp")
        for module in self.objective.modules():  # the pooling head's and text tower's attention
            if hasattr(module, "kernel"):
                module.kernel = r.model.attention
        self.siglip = siglip

    def build_data(self, trainer) -> None:
        r, topo = self.recipe, trainer.topo
        c = r.contrastive
        tokenizer = CaptionTokenizer.for_tower(self.text_cfg, caption_tokenizer_path(r))
        self.builder = ContrastiveBatchBuilder(tokenizer, r.data.media)
        source = ConcatSource([open_source(s) for s in r.data.sources])
        self.dataset = PairDataset(source, self.builder, candidates=self._one_image_records(trainer, source))
        from keyetron.data.loader import Loader

        self.loader = Loader(PairBatches(self.dataset, c.batch_size, r.data.loader, topo.dp_rank, topo.dims.dp))
        self.eval_pairs = None
        if r.data.eval and trainer.is_main:
            self.eval_pairs = read_image_captions(r.data.eval)[: r.eval.max_samples or None]
        trains = trainer.trainable
        self.counter = ContrastiveFlops(trainer.cfg, self.text_cfg, trains["vit"], trains["text_tower"])

    def _one_image_records(self, trainer, source) -> list[bool]:
        """Per record, whether it is a one-image sample, from the cost index (built by rank 0 from
        metadata when missing), so that no rank reads the records of another."""
        r = self.recipe
        builder = DocumentBuilder(trainer.cfg, KeyeTokenizer(trainer.cfg.tokenizer), r.data.media)
        indexed = SampleDataset(source, builder)
        costs = ensure_cost_index(indexed, r.data.loader.cost_index or trainer.out / "cost_index.json", trainer.topo)
        return [isinstance(c, SampleCost) and c.kind == "image" and len(c.vit_patches) == 1 for c in costs]

    def flops(self, batch) -> FlopCount:
        return self.counter.count(batch)

    def evaluate(self, trainer, checkpoint) -> tuple[dict, str, dict] | None:
        if not self.eval_pairs:
            return None
        report = retrieval_accuracy(self.siglip, self.builder, self.eval_pairs, trainer.device, trainer.autocast_dtype,
                                    self.recipe.eval.batch_size)
        if report is None:
            return None
        line = (f"retrieval over {report['pairs']} held-out pairs: image->text top-1 {100 * report['i2t_top1']:.1f}%, "
                f"text->image top-1 {100 * report['t2i_top1']:.1f}% (chance {100 * report['chance']:.1f}%)")
        return {f"eval/{k}": v for k, v in report.items()}, line, report

    def metrics(self) -> dict[str, float]:
        o = self.objective
        return {"train/temperature": float(o.logit_scale.detach().exp()),
                "train/logit_bias": float(o.logit_bias.detach()),
                "data/not_pairs": self.loader.assignment.passed_over}

    def summary(self) -> dict:
        return {"objective": "siglip", "not_pairs": self.loader.assignment.passed_over}


def _agree(topo, failure: Exception | None, device) -> None:
    """Every rank raises if one failed to build its part."""
    ok = torch.tensor([0.0 if failure else 1.0], device=device)
    if topo.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if failure is not None:
        raise failure
    if not ok.item():
        raise RuntimeError("another rank failed to build the stage-0 model (see its error)")


@torch.no_grad()
def retrieval_accuracy(siglip, builder: ContrastiveBatchBuilder, pairs, device, dtype: torch.dtype | None,
                       batch_size: int = 32) -> dict | None:
    """Top-1 retrieval over ``pairs``, each image against every caption and back.

    A retrieved caption counts as right when its text equals the true one (the demo's
    question captions repeat); ``chance`` is the expected top-1 of a random pick.
    """
    img, txt, captions = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = build_each(builder, chunk)
        if batch is None:
            continue
        batch = batch.to(device)
        with autocast(device, dtype):
            img.append(siglip.embed_images(batch.pixel_values, batch.vision_grid_thw).float())
            txt.append(siglip.embed_texts(batch.input_ids).float())
        kept = set(batch.sample_ids)
        captions += [p.caption for p in chunk if p.sample_id in kept]
    if not captions:
        return None
    sim = F.normalize(torch.cat(img), dim=-1) @ F.normalize(torch.cat(txt), dim=-1).T
    same = torch.tensor([[a == b for b in captions] for a in captions], device=sim.device)
    rows = torch.arange(len(captions), device=sim.device)
    return {"pairs": len(captions),
            "i2t_top1": float(same[rows, sim.argmax(dim=1)].float().mean()),
            "t2i_top1": float(same[sim.argmax(dim=0), rows].float().mean()),
            "chance": float(same.float().mean())}


TASKS = {"lm": LanguageModelTask, "siglip": ContrastiveTask}


def carried_parameter_counts(cfg) -> dict[str, int]:
    counts = parameter_counts_from_config(cfg)
    return {"projector+llm (carried)": counts["projector"] + counts["llm"]}


__all__ = ["ContrastiveFlops", "ContrastiveTask", "LanguageModelTask", "TASKS", "caption_tokenizer_path",
           "retrieval_accuracy"]
