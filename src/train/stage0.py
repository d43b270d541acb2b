"""Stage 0: continue training the Keye ViT with SigLIP's sigmoid loss (``train.objective: siglip``).

``ContrastiveTrainer`` is ``Trainer`` with the stage's own pieces; the run loop (``fit``:
logging, metrics, periodic checkpoints and evaluation, preemption) is the LM trainer's.

- **Model**: the Keye model of ``model.config`` / ``model.init``, whose ViT
  (``model.vit``) is the one ``ContrastiveObjective`` trains, with the attention-pooling
  head and a SigLIP text tower (``contrastive.text_tower``; weights, logit scale and bias
  from ``contrastive.siglip_checkpoint``). The projector and LLM only ride along into the
  checkpoints, in host memory, on the one rank that writes them (global rank 0).
- **Data**: shuffled image-caption pairs, ``contrastive.batch_size`` per rank per step,
  exactly resumable (``keyetron.train.pair_loader``).
- **Step**: every rank's images against every rank's captions (``negatives_group``), the
  summed loss divided by the step's global pair count, gradients SUM-reduced over the
  data-parallel ranks (``PlainAdamW``): the step of one process over the union batch.
  The towers run under the recipe's precision (bf16 autocast), the loss over all cells in fp32.
  Global-norm clipping; AdamW over the objective's trainable parameters, lr per part
  (``contrastive.lr_scale``: vit, pool_head, text_tower, logit).
- **Checkpoints** (the single-process layout, written by rank 0): ``model.safetensors`` is
  the whole Keye model with the trained ViT, so a stage-1 recipe can ``model.init`` from it;
  ``contrastive.safetensors`` holds the head, text tower and logit parameters.
- **Eval**: image->text and text->image top-1 retrieval over the pairs of ``data.eval``.

Data parallel only: ``parallel.tp/pp/cp`` must be 1 (the recipe refuses others).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from keyetron.backend.attention import KERNELS
from keyetron.backend.device import autocast, default_device, device_name, supports_bf16, synchronize
from keyetron.data.sources import ConcatSource, open_source
from keyetron.model import build_model, load_model_config
from keyetron.model.config import KeyeConfig
from keyetron.model.siglip_text import SiglipTextConfig, load_siglip_checkpoint, load_text_config
from keyetron.train.checkpoint import CheckpointNotFound, load_checkpoint, resolve_checkpoint, save_checkpoint, step_dir
from keyetron.train.contrastive import (CaptionTokenizer, ContrastiveBatch, ContrastiveBatchBuilder,
                                        ContrastiveObjective, build_contrastive_objective, read_image_captions)
from keyetron.train.flops import FlopCounter, frame_patches, parameter_counts_from_config, peak_flops
from keyetron.train.metrics import MetricSink, setup_logging
from keyetron.train.pair_loader import PairDataset, PairLoader, build_each
from keyetron.train.recipe import CONTRASTIVE_PARTS, Recipe, recipe_yaml
from keyetron.train.schedule import lr_lambda
from keyetron.train.siglip_loss import distributed_sigmoid_loss_sum
from keyetron.train.trainer import Trainer, init_from_checkpoint

log = logging.getLogger("keyetron.train")

CONTRASTIVE_FILE = "contrastive.safetensors"  # beside model.safetensors: what is not a Keye-VL parameter
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def caption_tokenizer_path(recipe: Recipe) -> str | None:
    """``contrastive.tokenizer``; unset: the SigLIP checkpoint's tokenizer when the folder has one,
    else None (the Qwen3 tokenizer, for towers with its vocabulary: ``tiny``, ``small``)."""
    c = recipe.contrastive
    if c.tokenizer:
        return c.tokenizer
    folder = Path(c.siglip_checkpoint) if c.siglip_checkpoint else None
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        return str(folder)
    return None


def part_of(name: str) -> str:
    """The ``contrastive.lr_scale`` part of an objective parameter."""
    return "logit" if name.startswith("logit_") else name.split(".")[0]


def contrastive_param_groups(objective: ContrastiveObjective, recipe: Recipe) -> list[dict]:
    """Groups per (part, decay), the ViT first: decay on matrices only, ``contrastive.lr_scale`` per part."""
    opt, scale = recipe.optim, recipe.contrastive.lr_scale
    groups: dict[tuple[int, bool], list] = {}
    for name, p in objective.named_parameters():
        if p.requires_grad:
            decay = p.dim() >= 2 and "embed" not in name
            groups.setdefault((CONTRASTIVE_PARTS.index(part_of(name)), decay), []).append(p)
    if not groups:
        raise ValueError("every parameter of the stage-0 objective is frozen (train.freeze, "
                         "contrastive.freeze_text_tower); nothing would train")
    return [{"params": ps, "lr": opt.lr * scale.get(CONTRASTIVE_PARTS[i], 1.0),
             "weight_decay": opt.weight_decay if decay else 0.0,
             "name": f"{CONTRASTIVE_PARTS[i]}/{'decay' if decay else 'no_decay'}"}
            for (i, decay), ps in sorted(groups.items())]


def freeze_prefixes(objective: ContrastiveObjective, prefixes: list[str]) -> None:
    """``train.freeze`` on the objective's names (vit, vit.layers.0, pool_head, text_tower, logit_scale, ...)."""
    names = [n for n, _ in objective.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise ValueError(f"train.freeze: {prefix!r} matches no parameter of the stage-0 objective; use a prefix "
                             f"such as {sorted({n.split('.')[0] for n in names})} or a deeper one like 'vit.layers.0'")
    for name, p in objective.named_parameters():
        if any(name == x or name.startswith(x + ".") for x in prefixes):
            p.requires_grad_(False)


class ContrastiveFlops:
    """Counted FLOPs of a stage-0 step by ``keyetron.train.flops``'s rules: the ViT per image (its
    counter), the pooling head's key/value projections per patch and MLP per image, the text
    tower per fixed-length caption (forward only when frozen). The loss itself is negligible."""

    def __init__(self, cfg: KeyeConfig, text: SiglipTextConfig, vit_trains: bool, text_trains: bool):
        self.vit = FlopCounter(cfg, {"vit": vit_trains, "projector": False, "llm": False})
        d, mlp = cfg.vision.hidden_size, cfg.vision.intermediate_size
        self.head_per_patch = 6 * 2 * d * d
        self.head_per_image = 6 * (2 * d * d + 2 * d * mlp)
        h, n = text.hidden_size, text.max_length
        linear = text.num_layers * (4 * h * h + 2 * h * text.intermediate_size) + h * text.projection_size
        attention = 12 * text.num_layers * h * n * n
        self.text_per_caption = 6 * linear * n + attention if text_trains else 2 * linear * n + attention // 3

    def count(self, batch: ContrastiveBatch) -> int:
        vit = self.vit.count([], frame_patches(batch.grid_thw)).vit
        return (vit + self.head_per_patch * batch.num_tokens
                + (self.head_per_image + self.text_per_caption) * batch.num_pairs)


@dataclass
class PairStep:
    loss: float  # mean over the step's global pairs
    pairs: int  # all ranks
    patches: int  # ViT patches, all ranks
    flops: int  # all ranks
    grad_norm: float
    seconds: float


class ContrastiveTrainer(Trainer):
    """Stage 0 under the LM trainer's run loop (see the module docstring)."""

    def __init__(self, recipe: Recipe, device: torch.device | None = None, topo=None):
        # Not Trainer.__init__: the packed LM loader, LM tokenizer and parallel engine have no place here.
        from keyetron.parallel.data_parallel import PlainAdamW
        from keyetron.parallel.topology import Topology

        self.recipe = r = recipe
        self.out = Path(r.output_dir)
        self.device = device or default_device()
        self.topo = topo or Topology.single(self.device)
        dims = self.topo.dims
        if dims.tp != 1 or dims.pp != 1 or dims.cp != 1:
            raise ValueError(f"layout {dims}: stage 0 (train.objective: siglip) is data parallel only; set "
                             "parallel.tp, parallel.pp and parallel.cp to 1")
        self.is_main = self.topo.rank == 0
        self.dp_group = self.topo.group("dp")
        setup_logging(self.out, write_file=self.is_main)
        torch.manual_seed(r.train.seed)
        if r.train.precision == "bf16" and not supports_bf16(self.device):
            raise ValueError(f"train.precision bf16 was asked for but {self.device} does not support it; "
                             "use auto or fp32")
        want_bf16 = r.train.precision == "bf16" or (r.train.precision == "auto" and supports_bf16(self.device))
        self.autocast_dtype = torch.bfloat16 if want_bf16 else None
        self.cfg = load_model_config(r.model.config)
        c = r.contrastive
        text_cfg = load_text_config(c.text_tower)
        if r.model.attention not in KERNELS:
            raise ValueError(f"model.attention: unknown attention kernel {r.model.attention!r}; "
                             f"choose one of {KERNELS}")
        failure = self._build_weights(text_cfg)
        if failure is not None:
            self._sync_replicas(failure)  # raises, on every rank
        self.objective.negatives_group = self.dp_group
        for module in self.objective.modules():
            if hasattr(module, "kernel"):
                module.kernel = r.model.attention
        for layer in self.objective.vit.layers:
            layer.activation_checkpointing = "vit" in r.model.activation_checkpointing
        freeze_prefixes(self.objective, r.train.freeze)
        parts = {part: [p for n, p in self.objective.named_parameters() if part_of(n) == part]
                 for part in CONTRASTIVE_PARTS}
        self.trainable = {part: any(p.requires_grad for p in ps) for part, ps in parts.items()}
        carried = parameter_counts_from_config(self.cfg)
        self.param_counts = {part: sum(p.numel() for p in ps) for part, ps in parts.items()}
        self.param_counts["projector+llm (carried)"] = carried["projector"] + carried["llm"]
        self.engine = None
        self.optimizer = PlainAdamW(self.objective, contrastive_param_groups(self.objective, r), self.topo,
                                    betas=r.optim.betas, eps=r.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.inner, lr_lambda(r.schedule, r.train.steps))
        tokenizer = CaptionTokenizer.for_tower(text_cfg, caption_tokenizer_path(r))
        self.builder = ContrastiveBatchBuilder(tokenizer, r.data.media)
        source = ConcatSource([open_source(s) for s in r.data.sources])
        self.dataset = PairDataset(source, self.builder, candidates=self._one_image_records(source))
        self.loader = PairLoader(self.dataset, c.batch_size, r.data.loader, self.topo.dp_rank, dims.dp)
        self.eval_pairs = None
        if r.data.eval and self.is_main:
            self.eval_pairs = read_image_captions(r.data.eval)[: r.eval.max_samples or None]
        self.flops = ContrastiveFlops(self.cfg, text_cfg, self.trainable["vit"], self.trainable["text_tower"])
        self.peak = peak_flops(device_name(self.device), self.autocast_dtype or torch.float32,
                               tf32=torch.backends.cuda.matmul.allow_tf32,
                               override=r.log.peak_tflops * 1e12 if r.log.peak_tflops else None)
        self.step = 0
        self.history: list[dict] = []
        resume = resolve_checkpoint(r.checkpoint.resume, r.checkpoint_dir)
        if resume is not None:
            try:
                self._resume(resume)
                log.info("resumed from %s at step %d", resume, self.step)
            except Exception as err:  # e.g. rank 0's weights do not fit: every rank must stop
                failure = err
        self._sync_replicas(failure)

    def _build_weights(self, text_cfg: SiglipTextConfig) -> Exception | None:
        """The Keye model and the objective around its ViT; weights (``model.init``, the SigLIP
        checkpoint) are read on rank 0 only, which alone carries the projector and LLM (on the host):
        the other ranks receive the objective's weights in ``_sync_replicas``."""
        r, c = self.recipe, self.recipe.contrastive
        self.model = None
        try:
            if self.is_main:
                self.model = build_model(self.cfg, device="cpu", seed=r.train.seed)
                if r.model.init:
                    init_from_checkpoint(self.model, r.model.init)
            self.objective = build_contrastive_objective(
                self.cfg.vision, text_cfg, vit=self.model.vit if self.model is not None else None,
                freeze_text=c.freeze_text_tower, seed=r.train.seed, device=self.device)
            if self.is_main and c.siglip_checkpoint:
                loaded = load_siglip_checkpoint(self.objective, c.siglip_checkpoint, vision=c.load_vit)
                log.info("loaded %d tensors of SigLIP checkpoint %s", len(loaded), c.siglip_checkpoint)
        except Exception as err:  # the other ranks must hear of it before they wait for the weights
            return err
        return None

    def _sync_replicas(self, failure: Exception | None) -> None:
        """Every rank raises if one failed to build; then all start from rank 0's weights."""
        ok = torch.tensor([0.0 if failure else 1.0], device=self.device)
        if self.topo.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if failure is not None:
            raise failure
        if not ok.item():
            raise RuntimeError("another rank failed to build the stage-0 model (see its error)")
        if self.topo.distributed:
            for p in self.objective.parameters():
                dist.broadcast(p.data, src=0, group=self.dp_group)

    def _resume(self, path: Path) -> None:
        """Weights on rank 0 (the others receive them); optimizer, schedule and data position everywhere."""
        if not (path / CONTRASTIVE_FILE).is_file():
            raise CheckpointNotFound(f"checkpoint {path} has no {CONTRASTIVE_FILE}: not a stage-0 checkpoint; to start "
                                     "stage 0 from other weights use model.init")
        if self.model is not None:
            load_checkpoint(path, self.model)
            own = load_file(str(path / CONTRASTIVE_FILE))
            want = objective_tensors(self.objective)
            if set(own) != set(want) or any(own[k].shape != want[k].shape for k in want):
                raise ValueError(f"{path / CONTRASTIVE_FILE} does not fit this objective (was it written with another "
                                 "contrastive.text_tower?)")
            with torch.no_grad():
                for k, t in want.items():
                    t.copy_(own[k])
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        state = json.loads((path / "state.json").read_text())
        self.step, self.history = state["step"], state["extra"].get("history", [])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))

    # -- one optimizer step ---------------------------------------------------------------
    def _one_image_records(self, source) -> list[bool]:
        """Per record, whether it is a one-image sample, from the cost index (built by rank 0 from
        metadata when missing), so that no rank reads the records of another."""
        from keyetron.data.dataset import DocumentBuilder, SampleDataset
        from keyetron.data.tokenizer import KeyeTokenizer
        from keyetron.parallel.balanced_loading import ensure_cost_index

        r = self.recipe
        indexed = SampleDataset(source, DocumentBuilder(self.cfg, KeyeTokenizer(self.cfg.tokenizer), r.data.media))
        costs = ensure_cost_index(indexed, r.data.loader.cost_index or self.out / "cost_index.json", self.topo)
        return [c is not None and c.kind == "image" and len(c.vit_patches) == 1 for c in costs]

    def train_step(self) -> PairStep:
        from keyetron.parallel.data_parallel import clip_coefficient

        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        pairs = batch.num_pairs if batch is not None else 0
        if batch is not None:
            self._log_sample_ids([batch])
        counts = torch.tensor([pairs, float(pairs == 0)], dtype=torch.float64, device=self.device)
        if self.topo.distributed:
            dist.all_reduce(counts, group=self.dp_group)
        if counts[1] > 0:  # every rank stops here together
            raise RuntimeError(f"step {self.step + 1}: {int(counts[1])} data-parallel rank(s) have no pair whose image "
                               "decodes (see the skipped samples in the log); check the images of data.sources")
        global_pairs = float(counts[0])
        self.optimizer.zero_grad(set_to_none=True)
        b, obj = batch.to(self.device), self.objective
        with autocast(self.device, self.autocast_dtype):  # the towers; the loss over all cells in fp32
            img, txt = obj.embed_images(b.pixel_values, b.grid_thw), obj.embed_texts(b.input_ids)
        loss_sum = distributed_sigmoid_loss_sum(img.float(), txt.float(), obj.logit_scale, obj.logit_bias,
                                                obj.negatives_group)
        (loss_sum / global_pairs).backward()
        grad_norm = self.optimizer.reduce_and_norm()
        if torch.isfinite(grad_norm):
            self.optimizer.step(clip_coefficient(grad_norm, self.recipe.optim.clip_grad))
        else:
            log.warning("step %d: gradient norm is %s; the update is skipped", self.step + 1, float(grad_norm))
        self.scheduler.step()
        totals = torch.tensor([float(loss_sum.detach()), batch.num_tokens, self.flops.count(batch)],
                              dtype=torch.float64, device=self.device)
        if self.topo.distributed:
            dist.all_reduce(totals, group=self.dp_group)
        synchronize(self.device)
        self.step += 1
        return PairStep(float(totals[0]) / global_pairs, int(global_pairs), int(totals[1]), int(totals[2]),
                        float(grad_norm), time.perf_counter() - t0)

    # -- the run ----------------------------------------------------------------------------
    def save(self) -> Path:
        """The single-process layout, written by rank 0 (every rank holds the same weights)."""
        path = step_dir(self.recipe.checkpoint_dir, self.step)
        if self.is_main:
            path = save_checkpoint(self.recipe.checkpoint_dir, self.step, self.model, self.optimizer, self.scheduler,
                                   self.loader.state_dict(), {"history": self.history}, recipe_yaml(self.recipe),
                                   self.recipe.checkpoint.keep, {CONTRASTIVE_FILE: objective_tensors(self.objective)})
            log.info("saved checkpoint %s", path)
        if self.topo.distributed:
            dist.barrier()
        return path

    def run_eval(self, sink: MetricSink, checkpoint: Path | None = None) -> dict | None:
        if not self.eval_pairs:
            return None
        report = retrieval_accuracy(self.objective, self.builder, self.eval_pairs, self.device, self.autocast_dtype,
                                    self.recipe.eval.batch_size)
        if report is not None:
            sink.write(self.step, {f"eval/{k}": v for k, v in report.items()})
            log.info("step %d retrieval over %d held-out pairs: image->text top-1 %.1f%%, text->image top-1 %.1f%% "
                     "(chance %.1f%%)", self.step, report["pairs"], 100 * report["i2t_top1"],
                     100 * report["t2i_top1"], 100 * report["chance"])
        return report

    def _window_metrics(self, window: list[PairStep]) -> dict[str, float]:
        seconds = sum(w.seconds for w in window)
        pairs = sum(w.pairs for w in window)
        flops = sum(w.flops for w in window)
        metrics = {
            "train/loss": sum(w.loss * w.pairs for w in window) / pairs,
            "train/lr": self.scheduler.get_last_lr()[0],  # the first group's: the ViT's unless it is frozen
            "train/grad_norm": window[-1].grad_norm,
            "train/pairs": pairs,
            "train/temperature": float(self.objective.logit_scale.detach().exp()),
            "train/logit_bias": float(self.objective.logit_bias.detach()),
            "perf/pairs_per_s": pairs / seconds,
            "perf/tokens_per_s": sum(w.patches for w in window) / seconds,  # ViT patches
            "perf/step_s": seconds / len(window),
            "perf/tflops": flops / seconds / 1e12,
            "data/skipped": self.dataset.skips.total,
            "data/not_pairs": self.loader.passed_over,
            "data/epoch": self.loader.epoch,
        }
        metrics["perf/tokens_per_s_per_device"] = metrics["perf/tokens_per_s"] / self.topo.world_size
        if self.peak:
            metrics["perf/mfu"] = flops / (seconds * self.topo.world_size * self.peak)
        return metrics

    def _summary(self, report: dict | None) -> dict:
        out = super()._summary(None) | {"objective": "siglip", "not_pairs": self.loader.passed_over}
        if report is not None:
            out["eval"] = report
        return out


def objective_tensors(objective: ContrastiveObjective) -> dict[str, torch.Tensor]:
    """What a stage-0 checkpoint holds beside the Keye model: head, text tower, logit scale and bias."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("vit.")}


@torch.no_grad()
def retrieval_accuracy(objective: ContrastiveObjective, builder: ContrastiveBatchBuilder, pairs, device,
                       dtype: torch.dtype | None, batch_size: int = 32) -> dict | None:
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
            img.append(objective.embed_images(batch.pixel_values, batch.grid_thw).float())
            txt.append(objective.embed_texts(batch.input_ids).float())
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


__all__ = ["CONTRASTIVE_FILE", "ContrastiveFlops", "ContrastiveTrainer", "contrastive_param_groups",
           "objective_tensors", "retrieval_accuracy"]
