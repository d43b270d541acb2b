"""The single-process trainer: recipe in, trained model, checkpoints, logs and a summary out.

One optimizer step takes ``grad_accum`` packed rows. Each row's summed token loss is
divided by the number of loss tokens of the *whole step*, so accumulation gives exactly
the gradient of one big batch (every loss token weighs the same, however the rows were
filled). The parallel engine (keyetron.parallel) reuses this loop's pieces.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keyetron.data.batch import PackedBatch
from keyetron.backend.device import autocast, default_device, device_name, supports_bf16, synchronize
from keyetron.data.dataset import DocumentBuilder, SampleDataset, Skip, SkipLog
from keyetron.data.loader import reshard_loader_states
from keyetron.data.sources import ConcatSource, open_source
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model import build_model, load_model_config
from keyetron.model.keye import KeyeVLModel, set_activation_checkpointing, set_attention_kernel
from keyetron.train.checkpoint import (CheckpointNotFound, init_from_checkpoint, is_distributed_checkpoint,
                                      load_checkpoint, mark_distributed_checkpoint, resolve_checkpoint,
                                      save_checkpoint, step_dir)
from keyetron.train.data_setup import build_decoder, build_loader, log_sample_ids
from keyetron.train.evaluate import EvalReport, evaluate
from keyetron.train.flops import FlopCount, FlopCounter, peak_flops
from keyetron.train.metrics import MetricSink, Progress, setup_logging
from keyetron.train.preempt import Preemption
from keyetron.train.recipe import MODULES, OptimSection, Recipe, recipe_yaml
from keyetron.train.schedule import lr_lambda

log = logging.getLogger("keyetron.train")


def apply_freeze(model: torch.nn.Module, prefixes: list[str]) -> dict[str, bool]:
    """Freeze parameters whose name starts with any prefix; returns which top modules still train."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"train.freeze: {prefix!r} matches no parameter; use a module prefix such as {tops} "
                             f"or a deeper one like 'llm.embed_tokens'")
    for name, p in model.named_parameters():
        if any(name == x or name.startswith(x + ".") for x in prefixes):
            p.requires_grad_(False)
    return {m: any(p.requires_grad for p in getattr(model, m).parameters()) for m in MODULES}


def optimizer_param_groups(model: torch.nn.Module, opt: OptimSection) -> list[dict]:
    """Parameter groups per (module, decay): decay on matrices only, a per-module lr scale."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "embed" not in name
        groups.setdefault((name.split(".")[0], decay), []).append(p)
    if not groups:
        raise ValueError("every parameter is frozen (train.freeze); nothing would train")
    return [{"params": ps, "lr": opt.lr * opt.lr_scale.get(module, 1.0),
             "weight_decay": opt.weight_decay if decay else 0.0, "name": f"{module}/{'decay' if decay else 'no_decay'}"}
            for (module, decay), ps in sorted(groups.items())]


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    opt = recipe.optim
    # The fused kernel (CPU and CUDA) updates all tensors in one pass: on a CPU the default
    # per-tensor loop cost ~0.3 s a step for the 63M-parameter demo model.
    return torch.optim.AdamW(optimizer_param_groups(model, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                             fused=True)


def accumulate_gradients(model: KeyeVLModel, rows: list[PackedBatch], device, autocast_dtype) -> float:
    """Backward over ``rows`` one at a time, each weighted by the step's total loss tokens.

    The gradient equals that of one forward over all rows together; returns the summed loss.
    """
    loss_tokens = max(sum(r.num_loss_tokens for r in rows), 1)
    total = 0.0
    for row in rows:
        with autocast(device, autocast_dtype):
            out = model(row.to(device))
        (out.loss_sum / loss_tokens).backward()
        total += float(out.loss_sum.detach())
    return total


@dataclass
class StepResult:
    loss: float
    loss_tokens: int
    tokens: int
    flops: FlopCount
    grad_norm: float
    seconds: float


class Trainer:
    """Single-process by default; with a distributed ``topo`` the step runs through
    ``keyetron.parallel.engine.ParallelEngine`` (every rank builds the same model first)."""

    def __init__(self, recipe: Recipe, device: torch.device | None = None, topo=None):
        from keyetron.parallel.topology import Topology

        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.device = device or default_device()
        self.topo = topo or Topology.single(self.device)
        self.is_main = self.topo.rank == 0
        setup_logging(self.out, write_file=self.is_main)
        torch.manual_seed(recipe.train.seed)
        want_bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and supports_bf16(self.device))
        if recipe.train.precision == "bf16" and not supports_bf16(self.device):
            raise ValueError(f"train.precision bf16 was asked for but {self.device} does not support it; use auto or fp32")
        self.autocast_dtype = torch.bfloat16 if want_bf16 else None
        self.cfg = load_model_config(recipe.model.config)
        if recipe.model.rope_theta is not None:  # context extension raises the RoPE base (1e6 -> 8e6)
            self.cfg = dataclasses.replace(self.cfg, text=dataclasses.replace(self.cfg.text,
                                                                              rope_theta=recipe.model.rope_theta))
        self.model: KeyeVLModel = build_model(self.cfg, device=self.device, seed=recipe.train.seed)
        if recipe.model.init:
            init_from_checkpoint(self.model, recipe.model.init)
        set_attention_kernel(self.model, recipe.model.attention)
        set_activation_checkpointing(self.model, vit="vit" in recipe.model.activation_checkpointing,
                                     llm="llm" in recipe.model.activation_checkpointing)
        self.trainable = apply_freeze(self.model, recipe.train.freeze)
        self.param_counts = {m: sum(p.numel() for p in getattr(self.model, m).parameters()) for m in MODULES}
        self.engine = None
        if self.topo.distributed:
            self.engine = build_engine(self.model, self.topo, recipe, self.autocast_dtype)
            self.optimizer = self.engine.optimizer.inner  # the LR schedule drives its groups
        else:
            self.optimizer = build_optimizer(self.model, recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe.schedule, recipe.train.steps))
        self.tokenizer = KeyeTokenizer(self.cfg.tokenizer)
        builder = DocumentBuilder(self.cfg, self.tokenizer, recipe.data.media, decoder=build_decoder(recipe.data))
        source = ConcatSource([open_source(s) for s in recipe.data.sources])
        self.dataset = SampleDataset(source, builder)
        # The data-parallel ranks share one global order, each taking every dp-th position of it;
        # under a parallel layout only pipeline stage 0 reads, each sample once (keyetron.parallel.loading).
        self.loader = build_loader(self.dataset, recipe, self.cfg, self.trainable, self.topo, self.tokenizer.pad_id,
                                   self.out)
        self.eval_dataset = SampleDataset(open_source(recipe.data.eval), builder) if recipe.data.eval else None
        self.flops = FlopCounter(self.cfg, self.trainable)
        matmul_dtype = self.autocast_dtype or torch.float32
        self.peak = peak_flops(device_name(self.device), matmul_dtype,
                               tf32=torch.backends.cuda.matmul.allow_tf32,
                               override=recipe.log.peak_tflops * 1e12 if recipe.log.peak_tflops else None)
        self.step = 0
        self.history: list[dict] = []
        resume = resolve_checkpoint(recipe.checkpoint.resume, recipe.checkpoint_dir)
        if resume is not None:
            self._resume(resume)
            log.info("resumed from %s at step %d", resume, self.step)
        elif recipe.checkpoint.start_from:
            self._start_from(Path(recipe.checkpoint.start_from), set(recipe.checkpoint.start_reset))

    def _resume(self, path: Path, restore_loader: bool = True) -> None:
        from keyetron.parallel.checkpoint import load_distributed, load_into_single_process

        if not is_distributed_checkpoint(path):
            state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
            self.step, self.history = state.step, state.extra.get("history", [])
            if restore_loader:
                self._restore_loader({0: state.loader}, path)
            torch.set_rng_state(torch.tensor(state.rng, dtype=torch.uint8))
            return
        if self.engine is not None:
            extra = load_distributed(path, self.model, self.engine.optimizer, self.topo)
        else:  # a multi-process run continued in one process
            extra = load_into_single_process(path, self.model, self.optimizer)
        self.step, self.history = extra["step"], extra.get("history", [])
        self.scheduler.load_state_dict(extra["scheduler"])
        if restore_loader:
            self._restore_loader({int(dp): state for dp, state in extra["loaders"].items()}, path)

    def _start_from(self, path: Path, reset: set[str]) -> None:
        """Continue an earlier stage's checkpoint (``checkpoint.start_from``) under this recipe's
        layout, row length and RoPE base, keeping what ``reset`` does not name."""
        if not path.exists():
            raise CheckpointNotFound(f"checkpoint.start_from {path} does not exist; give the earlier stage's "
                                     f"step-N checkpoint folder")
        if "optimizer" in reset:
            init_from_checkpoint(self.model, str(path))
            extra = None
        else:
            step, history = self.step, self.history
            self._resume(path, restore_loader="data" not in reset)
            extra = self.step
            if "schedule" in reset:
                self.step, self.history = step, history
                # the new stage's learning rates and schedule, from step 0, over the carried moments
                fresh = optimizer_param_groups(self.model, self.recipe.optim)
                for group, want in zip(self.optimizer.param_groups, fresh):
                    group["lr"] = group["initial_lr"] = want["lr"]
                    group["weight_decay"] = want["weight_decay"]
                self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                    self.optimizer, lr_lambda(self.recipe.schedule, self.recipe.train.steps))
        log.info("started from %s (step %s of the earlier stage), reset: %s", path, extra, sorted(reset) or "nothing")

    def _restore_loader(self, loaders: dict[int, dict], path: Path) -> None:
        """This rank's data position from every data-parallel rank's loader state in the checkpoint."""
        if len(loaders) != self.topo.dims.dp:
            from keyetron.parallel.balanced_loading import reshard_balanced_states

            log.info("checkpoint %s was written with %d data-parallel readers, this run has %d: the remaining "
                     "samples are dealt to the new readers", path, len(loaders), self.topo.dims.dp)
            balanced = loaders[0].get("kind") == "balanced"
            loaders = (reshard_balanced_states if balanced else reshard_loader_states)(loaders, self.topo.dims.dp)
        self.loader.load_state_dict(loaders[self.topo.dp_rank])

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self) -> StepResult:
        if self.engine is not None:
            return self._parallel_step()
        t0 = time.perf_counter()
        rows = self.loader.next_rows(self.recipe.train.grad_accum)
        self._log_sample_ids(rows)
        loss_tokens = sum(r.num_loss_tokens for r in rows)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = accumulate_gradients(self.model, rows, self.device, self.autocast_dtype)
        flops = sum((self.flops.count_batch(row) for row in rows), FlopCount())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.recipe.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            log.warning("step %d: gradient norm is %s; the update is skipped", self.step + 1, float(grad_norm))
        self.scheduler.step()
        synchronize(self.device)
        self.step += 1
        tokens = sum(r.num_tokens for r in rows)
        return StepResult(total_loss / max(loss_tokens, 1), loss_tokens, tokens, flops, float(grad_norm),
                          time.perf_counter() - t0)

    def _parallel_step(self) -> StepResult:
        import torch.distributed as dist

        t0 = time.perf_counter()
        rows = self.loader.next_rows(self.recipe.train.grad_accum)
        self._log_sample_ids(rows)
        stats = self.engine.step(rows)
        self.scheduler.step()
        flops = sum((self.flops.count_batch(row) for row in rows), FlopCount())
        # Whole rows are counted once per data-parallel rank (its CP/TP/PP ranks share them).
        totals = torch.tensor([*dataclasses.astuple(flops), sum(r.num_tokens for r in rows)], dtype=torch.float64)
        if self.topo.dims.dp > 1:
            dist.all_reduce(totals, group=self.topo.group("dp"))
        synchronize(self.device)
        self.step += 1
        counted = FlopCount(*(int(v) for v in totals[:-1].tolist()))
        return StepResult(stats.loss, stats.loss_tokens, int(totals[-1]), counted, stats.grad_norm,
                          time.perf_counter() - t0)

    def _log_sample_ids(self, rows: list[PackedBatch]) -> None:
        if self.recipe.log.sample_ids:
            log_sample_ids(self.out, self.topo, self.step + 1, rows)

    # -- the run ----------------------------------------------------------------------------
    def save(self) -> Path:
        if self.engine is not None:
            return self._save_distributed()
        path = save_checkpoint(self.recipe.checkpoint_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.loader.state_dict(), {"history": self.history}, recipe_yaml(self.recipe),
                               self.recipe.checkpoint.keep)
        log.info("saved checkpoint %s", path)
        return path

    def _save_distributed(self) -> Path:
        import torch.distributed as dist
        from keyetron.parallel.checkpoint import save_distributed

        states = [None] * self.topo.world_size
        dist.all_gather_object(states, (self.topo.dp_rank, self.loader.state_dict()))
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "loaders": {str(dp): st for dp, st in states if st is not None}, "layout": str(self.topo.dims)}
        path = save_distributed(step_dir(self.recipe.checkpoint_dir, self.step), self.model, self.engine.optimizer,
                                self.topo, extra)
        if self.is_main:
            mark_distributed_checkpoint(path, self.step, self.recipe.checkpoint.keep, recipe_yaml(self.recipe))
        dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def run_eval(self, sink: MetricSink, checkpoint: Path | None = None) -> EvalReport | None:
        if self.eval_dataset is None:
            return None
        model = self.model
        if self.engine is not None:  # evaluate the whole model in one process, from the checkpoint just written
            from keyetron.parallel.checkpoint import load_into_single_process

            if not self.is_main or checkpoint is None:
                return None
            model = build_model(self.cfg, device=self.device, seed=self.recipe.train.seed)
            load_into_single_process(checkpoint, model, None)
        ev = self.recipe.eval
        report = evaluate(model, self.eval_dataset, device=self.device, dtype=self.autocast_dtype,
                          max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, max_samples=ev.max_samples)
        sink.write(self.step, report.metrics())
        log.info("step %d %s", self.step, report.summary())
        for sid, want, got in report.examples[:6]:
            log.info("  eval %s: expected %r, generated %r", sid, want, got)
        return report

    def fit(self) -> dict:
        r = self.recipe
        if self.step == 0 and self.is_main:  # a fresh run does not append to an earlier run's metrics
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.step == 0:  # nor to its sample ids (each rank owns its file)
            (self.out / f"sample_ids.dp{self.topo.dp_rank}.jsonl").unlink(missing_ok=True)
        sink = MetricSink(self.out, r.log.tensorboard and self.is_main, write=self.is_main)
        if self.is_main:
            (self.out / "recipe.yaml").write_text(recipe_yaml(r))
        log.info("run %s on %s (%s), layout %s, precision %s; parameters %s; trainable %s", r.name, self.device,
                 device_name(self.device), self.topo.dims, "bf16" if self.autocast_dtype else "fp32",
                 {k: f"{v / 1e6:.1f}M" for k, v in self.param_counts.items()}, self.trainable)
        progress = Progress(r.train.steps, self.step)
        window: list[StepResult] = []
        report = None
        preemption = Preemption().install()  # SIGUSR1 / SIGTERM: checkpoint, requeue, exit
        while self.step < r.train.steps:
            res = self.train_step()
            window.append(res)
            last = self.step == r.train.steps
            stop = not last and preemption.should_stop()  # all ranks alike
            if self.step % r.log.every == 0 or last or stop:
                metrics = self._window_metrics(window)
                self.history.append({"step": self.step, **metrics})
                sink.write(self.step, metrics)
                line = (f"step {self.step}/{r.train.steps} loss {metrics['train/loss']:.4f} lr "
                        f"{metrics['train/lr']:.2e} tok/s {metrics['perf/tokens_per_s']:.0f} TFLOP/s "
                        f"{metrics['perf/tflops']:.3f}" + (f" MFU {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""))
                log.info(line)
                window = []
            progress.update(self.step, f"loss {res.loss:.3f}")
            if r.checkpoint.every and self.step % r.checkpoint.every == 0 and not (last or stop):
                self.save()
            if r.eval.every and self.step % r.eval.every == 0 and not (last or stop) and self.engine is None:
                self.run_eval(sink)
            if stop:
                break
        progress.close()
        final = self.save()
        report = None if preemption.stopped else self.run_eval(sink, final)
        self._gather_skips()
        log.info(self.dataset.skips.summary())
        summary = self._summary(report) | preemption.finish(self.step, self.is_main)
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        sink.close()
        return summary

    def _window_metrics(self, window: list[StepResult]) -> dict[str, float]:
        seconds = sum(w.seconds for w in window)
        flops = sum((w.flops for w in window), FlopCount())
        loss_tokens = sum(w.loss_tokens for w in window)
        metrics = {
            "train/loss": sum(w.loss * w.loss_tokens for w in window) / max(loss_tokens, 1),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": window[-1].grad_norm,
            "train/loss_tokens": loss_tokens,
            "perf/tokens_per_s": sum(w.tokens for w in window) / seconds,
            "perf/step_s": seconds / len(window),
            "perf/tflops": flops.total / seconds / 1e12,
            "perf/vit_tflop": flops.vit / 1e12,
            "perf/llm_tflop": flops.llm / 1e12,
            "data/skipped": self.dataset.skips.total,
            "data/epoch": self.loader.epoch,
        }
        report = getattr(self.loader, "last_report", None)
        if report:  # the balancer's predicted imbalance of the window's last step
            metrics["balance/vit_max_over_mean"] = report["vit"]["max_over_mean"]
            metrics["balance/llm_max_over_mean"] = report["llm"]["max_over_mean"]
            for kind, share in report.get("mix", {}).items():  # the step's token mixture (data.loader.mixture)
                metrics[f"data/mix_{kind}"] = share
            if "predicted_step_s" in report:  # calibrated cost model: its error against the measured step
                metrics["balance/predicted_step_s"] = report["predicted_step_s"]
                metrics["balance/prediction_error"] = report["predicted_step_s"] / window[-1].seconds - 1
        metrics["perf/tokens_per_s_per_device"] = metrics["perf/tokens_per_s"] / self.topo.world_size
        if self.peak:
            metrics["perf/mfu"] = flops.total / (seconds * self.topo.world_size * self.peak)
        return metrics

    def _gather_skips(self) -> None:
        """Rank 0's skip log becomes the whole job's: each data-parallel rank's readers skip their
        own samples (the first stage-0 rank of each speaks for its group, which agrees)."""
        import torch.distributed as dist

        t = self.topo
        if not t.distributed:
            return
        states = [None] * t.world_size
        speaks = not (t.pp_rank or t.cp_rank or t.tp_rank)
        dist.all_gather_object(states, self.dataset.skips.state_dict() if speaks else None)
        if self.is_main:
            merged = SkipLog()
            for state in filter(None, states):
                merged.counts.update(state["counts"])
                merged.entries.extend(Skip(**e) for e in state["entries"][:SkipLog.MAX_KEPT - len(merged.entries)])
            self.dataset.skips.counts, self.dataset.skips.entries = merged.counts, merged.entries

    def _summary(self, report: EvalReport | None) -> dict:
        losses = [h["train/loss"] for h in self.history]
        out = {
            "name": self.recipe.name, "steps": self.step, "device": device_name(self.device),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "skips": {"total": self.dataset.skips.total, "by_kind": dict(self.dataset.skips.counts),
                      "examples": [vars(s) for s in self.dataset.skips.entries[:50]]},
            "peak_flops": self.peak,
        }
        if report is not None:
            out["eval"] = {"exact_match": report.exact_match, "majority_baseline": report.majority_baseline,
                           "per_type_majority_baseline": report.per_type_majority_baseline,
                           "samples": report.samples, "by_type": report.by_type, "skipped": report.skipped}
        return out


def build_engine(model: KeyeVLModel, topo, recipe: Recipe, autocast_dtype):
    """Apply the topology's layout to ``model`` and build the engine that steps it."""
    from keyetron.parallel.engine import ParallelEngine, PipelineOptions, parallelize_keye

    par = recipe.parallel
    parallelize_keye(model, topo, sequence_parallel=par.sequence_parallel)
    pipeline = None
    if topo.dims.pp > 1:
        pipeline = PipelineOptions(recipe.data.loader.row_tokens, recipe.train.grad_accum, par.schedule,
                                   par.virtual_stages)
    return ParallelEngine(model, topo, recipe.optim, sharding=par.sharding, autocast_dtype=autocast_dtype,
                          pipeline=pipeline)


def train(recipe: Recipe) -> dict:
    return Trainer(recipe).fit()


__all__ = ["Trainer", "accumulate_gradients", "apply_freeze", "build_optimizer", "init_from_checkpoint",
           "optimizer_param_groups", "train"]
