"""The one trainer: recipe in, trained model, checkpoints, logs and a summary out.

The same loop for every objective and layout, one process included (``Topology.single()``):

1. the recipe's task (``keyetron.train.tasks``: the objective, the model it trains, its
   data, FLOPs and evaluation) builds the model and the objective, identically on every rank;
2. ``train.freeze`` freezes parameters by name prefix, ``parallelize_keye`` installs the
   layout (``parallel`` section; nothing in one process but activation checkpointing),
   ``ParallelEngine`` builds the optimizer;
3. every step takes ``grad_accum`` batches from the task's loader and the engine steps them
   (each batch's summed loss divided by the step's global count: accumulation and every
   layout give the gradient of one big batch); the LR schedule follows;
4. checkpoints: one process writes the single-process layout (``keyetron.checkpoint``),
   several write the sharded one (``keyetron.parallel.sharded_checkpoint``); either resumes
   under any layout the other can hold, and ``checkpoint.start_from`` continues an earlier
   stage under this recipe's layout, row length and RoPE base.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from keyetron.backend.device import default_device, device_name, supports_bf16, synchronize
from keyetron.config import ConfigError
from keyetron.checkpoint import (CheckpointNotFound, is_distributed_checkpoint, load_checkpoint,
                                 mark_distributed_checkpoint, resolve_checkpoint, save_checkpoint, step_dir)
from keyetron.data.dataset import Skip, SkipLog
from keyetron.flops import FlopCount, peak_flops
from keyetron.model.config import config_differences, config_yaml
from keyetron.model.keye import build_model, set_attention_kernel
from keyetron.optim import MODULES, param_groups
from keyetron.parallel.engine import ParallelEngine, trained_modules
from keyetron.parallel.mixed_precision import cast_model, full_precision_state, master_targets
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.sharded_checkpoint import load_distributed, save_distributed
from keyetron.parallel.topology import Topology
from keyetron.train.merge import Checkpoint, init_from_checkpoint
from keyetron.train.metrics import MetricSink, Progress, log_sample_ids, setup_logging
from keyetron.train.preempt import Preemption
from keyetron.train.recipe import Recipe, model_config_of, recipe_yaml
from keyetron.train.schedule import lr_lambda
from keyetron.train.tasks import TASKS

log = logging.getLogger("keyetron.train")


def apply_freeze(named: list[tuple[str, nn.Parameter]], prefixes: list[str]) -> None:
    """``train.freeze``: freeze the parameters whose name starts with any prefix (a part such as
    ``vit``, or deeper: ``llm.embed_tokens``, ``vit.layers.0``, ``text_tower``)."""
    names = [n for n, _ in named]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            deeper = "llm.embed_tokens" if "llm" in tops else "vit.layers.0"
            raise ValueError(f"train.freeze: {prefix!r} matches no parameter; use a module prefix such as {tops} "
                             f"or a deeper one like {deeper!r}")
    for name, p in named:
        if any(name == x or name.startswith(x + ".") for x in prefixes):
            p.requires_grad_(False)


@dataclass
class StepResult:
    loss: float  # mean per unit over the step (all ranks)
    count: int  # the objective's units of the step (loss tokens, pairs), all ranks
    tokens: int  # work units (LLM tokens, ViT patches), all ranks
    flops: FlopCount
    grad_norm: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0  # the learning rate of the step's update (the first optimizer group's)

    @property
    def loss_tokens(self) -> int:
        return self.count


class Trainer:
    """One process, or one rank of a parallel layout (``topo``; every rank builds the same model)."""

    def __init__(self, recipe: Recipe, device: torch.device | None = None, topo: Topology | None = None):
        self.recipe = r = recipe
        self.out = Path(r.output_dir)
        self.device = device or default_device()
        self._check_kernels()
        self.topo = topo or Topology.single(self.device)
        self.is_main = self.topo.rank == 0
        setup_logging(self.out, write_file=self.is_main)
        torch.manual_seed(r.train.seed)
        # bf16: bf16 weights, fp32 main gradients and master weights (keyetron.parallel.mixed_precision);
        # autocast: fp32 weights under bf16 autocast; auto: bf16 where the device runs it fast, else fp32.
        self.precision = r.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if supports_bf16(self.device) else "fp32"
        self.param_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.autocast_dtype = torch.bfloat16 if self.precision == "autocast" else None
        self.compute_dtype = self.param_dtype or self.autocast_dtype or torch.float32
        # Where to start, checked before anything is built: the run's own checkpoint (an intact one),
        # else an earlier stage's (checkpoint.start_from), over model.init's weights.
        resume = resolve_checkpoint(r.checkpoint.resume, r.checkpoint_dir)
        starts = [("model.init", r.model.init, "a Hugging Face folder, a keyetron step-N checkpoint or a "
                   "`keyetron merge` output")]
        if resume is None:
            starts.append(("checkpoint.start_from", r.checkpoint.start_from, "the earlier stage's step-N checkpoint "
                           "folder"))
        for key, value, what in starts:
            if value and not Path(value).exists():
                raise CheckpointNotFound(f"{key} {value} does not exist; give {what}")
        self.cfg = model_config_of(r.model)  # the named config with the recipe's overrides (RoPE base)
        # -- the task's model and objective, then the layout and the engine --------------------
        self.task = TASKS[r.train.objective](self)
        self.model, self.objective = self.task.model, self.task.objective
        set_attention_kernel(self.model, r.model.attention)
        named = list(trained_modules(self.model, self.objective).named_parameters())
        apply_freeze(named, r.train.freeze)
        part_of = self.task.part_of
        self.trainable = {part: any(p.requires_grad for n, p in named if part_of(n) == part)
                          for part in self.task.parts}
        self.param_counts = {part: sum(p.numel() for n, p in named if part_of(n) == part) for part in self.task.parts}
        if self.task.carried:
            self.param_counts["+".join(self.task.carried) + " (carried)"] = sum(
                p.numel() for m in self.task.carried.values() for p in m.parameters())
        self.par = parallelize_keye(self.model, self.topo, r.parallel, row_tokens=r.data.loader.row_tokens,
                                    micro_batches=r.train.grad_accum,
                                    activation_checkpointing=r.model.activation_checkpointing,
                                    param_dtype=self.param_dtype, fp8=r.train.fp8, compile=r.train.compile)
        if self.param_dtype is not None:
            cast_model(self.objective, self.param_dtype)
        self.engine = ParallelEngine(self.par, self.objective, r.optim, autocast_dtype=self.autocast_dtype,
                                     groups=param_groups(trained_modules(self.model, self.objective).named_parameters(),
                                                         r.optim, part_of=part_of, lr_scale=self.task.lr_scale,
                                                         order=self.task.parts))
        self.optimizer = self.engine.optimizer.inner  # the LR schedule drives its groups
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(r.schedule, r.train.steps))
        # What checkpoints hold: the trained modules and the parts carried along (rank 0).
        self.checkpointed = trained_modules(self.model, self.objective)
        for name, module in self.task.carried.items():
            self.checkpointed.add_module(name, module)
        # -- data, FLOPs, and where to start -------------------------------------------------------
        self.task.build_data(self)
        self.loader, self.dataset, self.flops = self.task.loader, self.task.dataset, self.task.counter
        self.peak = peak_flops(device_name(self.device), self.compute_dtype,
                               tf32=torch.backends.cuda.matmul.allow_tf32,
                               override=r.log.peak_tflops * 1e12 if r.log.peak_tflops else None)
        self.step = 0
        self.history: list[dict] = []
        if resume is not None:
            self._resume(resume)
            log.info("resumed from %s at step %d", resume, self.step)
        elif r.checkpoint.start_from:
            self._start_from(Path(r.checkpoint.start_from), set(r.checkpoint.start_reset))

    # -- checkpoints ----------------------------------------------------------------------------
    def _model_parts(self) -> nn.Module:
        """The Keye model's parts among the checkpointed modules (model.safetensors of the one-process layout)."""
        box = nn.Module()
        for name, child in self.checkpointed.named_children():
            if name in MODULES:
                box.add_module(name, child)
        return box

    @property
    def _objective_file(self) -> str | None:
        has_own = any(True for _ in self.objective.parameters())
        return f"{self.objective.name}.safetensors" if has_own else None

    def _check_architecture(self, path: Path, key: str, allow: tuple[str, ...] = ()) -> None:
        """Refuse, in one line, a checkpoint written for another architecture than this recipe's
        (``allow``: fields that may differ, e.g. a context extension's RoPE base)."""
        saved = Checkpoint(path).model_config()
        if saved is None:
            return
        differ = [d for d in config_differences(saved, self.cfg) if d.split(":")[0] not in allow]
        if differ:
            raise ConfigError(f"{key} {path} was written for another architecture than model.config "
                              f"{self.recipe.model.config}: {'; '.join(differ[:4])}"
                              f"{' ...' if len(differ) > 4 else ''}. Use the model config it was trained with "
                              f"({saved.name}, its model.yaml), or start a new run (checkpoint.resume: none)")

    def _resume(self, path: Path, restore_loader: bool = True, key: str = "checkpoint.resume",
                allow: tuple[str, ...] = ()) -> None:
        self._check_architecture(path, key, allow)
        try:
            self._load(path, restore_loader)
        except (CheckpointNotFound, ConfigError, ValueError):
            raise
        except Exception as err:  # a file that passed the cheap checks and still does not read
            raise CheckpointNotFound(f"{key} {path} could not be read ({type(err).__name__}: {err}); it may be "
                                     "truncated or corrupt: resume from another checkpoint") from err

    def _load(self, path: Path, restore_loader: bool) -> None:
        if not is_distributed_checkpoint(path):
            if self.topo.distributed and (self.engine.sharding != "none" or self.topo.dims.world_size !=
                                          self.topo.dims.dp):
                raise ConfigError(f"checkpoint {path} was written by one process; a run of layout {self.topo.dims} "
                                  f"with parallel.sharding {self.engine.sharding} cannot load it. Continue it in one "
                                  "process, or start from its weights (model.init)")
            state = load_checkpoint(path, self._model_parts(), self.optimizer, self.scheduler)
            if self._objective_file:
                file = path / self._objective_file
                if not file.is_file():
                    raise CheckpointNotFound(f"checkpoint {path} has no {self._objective_file}: it was not written by "
                                             f"a {self.recipe.train.objective} run; to start from its weights use "
                                             "model.init")
                own = load_file(str(file))
                want = self.objective.state_dict()
                if set(own) != set(want) or any(own[k].shape != want[k].shape for k in want):
                    raise ValueError(f"{file} does not fit this objective (was it written with another "
                                     f"{self.recipe.train.objective} configuration?)")
                self.objective.load_state_dict(own)
            self._load_masters(path)
            self.step, self.history = state.step, state.extra.get("history", [])
            if restore_loader:
                self._restore_loader({0: state.loader}, path)
            torch.set_rng_state(torch.tensor(state.rng, dtype=torch.uint8))
            return
        extra = load_distributed(path, self.checkpointed, self.engine.optimizer, self.topo)
        self.step, self.history = extra["step"], extra.get("history", [])
        self.scheduler.load_state_dict(extra["scheduler"])
        if restore_loader:
            self._restore_loader({int(dp): state for dp, state in extra["loaders"].items()}, path)

    def _check_kernels(self) -> None:
        """``train.fp8`` / ``train.compile`` where they cannot run: one line, before anything is built."""
        r = self.recipe
        if r.train.fp8:
            from keyetron.backend.fp8 import fp8_problem

            problem = fp8_problem(self.device, build_model(model_config_of(r.model), device="meta"))
            if problem:
                raise ConfigError(f"train.fp8: {problem}; or set train.fp8: false")
        if r.train.compile:
            from keyetron.backend.compile import compile_problem

            problem = compile_problem(self.device)
            if problem:
                raise ConfigError(f"train.compile: {problem}; or set train.compile: false")

    @torch.no_grad()
    def _load_masters(self, path: Path) -> None:
        """bf16 parameters: their fp32 masters from the checkpoint's full-precision tensors, then the
        parameters rounded from them (the files hold fp32 masters, or an fp32 run's weights)."""
        masters = self.engine.optimizer.masters
        if not masters.of:
            return
        files = [("model.safetensors", self._model_parts())]
        if self._objective_file:
            files.append((self._objective_file, self.objective))
        for name, module in files:
            tensors = load_file(str(path / name))
            for key, master in master_targets(module, masters).items():
                master.copy_(tensors[key])
        self.engine.optimizer.publish()

    def _start_from(self, path: Path, reset: set[str]) -> None:
        """Continue an earlier stage's checkpoint (``checkpoint.start_from``) under this recipe's
        layout, row length and RoPE base, keeping what ``reset`` does not name."""
        if "optimizer" in reset:
            self._check_architecture(path, "checkpoint.start_from", allow=("text.rope_theta",))
            init_from_checkpoint(self.model, str(path), key="checkpoint.start_from")
            extra = None
        else:
            step, history = self.step, self.history
            self._resume(path, restore_loader="data" not in reset, key="checkpoint.start_from",
                         allow=("text.rope_theta",))
            extra = self.step
            if "schedule" in reset:
                self.step, self.history = step, history
                # the new stage's learning rates and schedule, from step 0, over the carried moments
                fresh = param_groups(trained_modules(self.model, self.objective).named_parameters(), self.recipe.optim,
                                     part_of=self.task.part_of, lr_scale=self.task.lr_scale, order=self.task.parts)
                for group, want in zip(self.optimizer.param_groups, fresh):
                    group["lr"] = group["initial_lr"] = want["lr"]
                    group["weight_decay"] = want["weight_decay"]
                self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                    self.optimizer, lr_lambda(self.recipe.schedule, self.recipe.train.steps))
        log.info("started from %s (step %s of the earlier stage), reset: %s", path, extra, sorted(reset) or "nothing")

    def _restore_loader(self, loaders: dict[int, dict], path: Path) -> None:
        """This rank's data position from every data-parallel rank's loader state in the checkpoint."""
        if len(loaders) != self.topo.dims.dp:
            log.info("checkpoint %s was written with %d data-parallel readers, this run has %d: the remaining "
                     "samples are dealt to the new readers", path, len(loaders), self.topo.dims.dp)
        self.loader.restore(loaders, self.topo.dp_rank, self.topo.dims.dp)

    def save(self) -> Path:
        if self.topo.distributed:
            return self._save_distributed()
        extra_files = {}
        masters = self.engine.optimizer.masters  # bf16 parameters are written as their fp32 masters
        if self._objective_file:
            extra_files[self._objective_file] = full_precision_state(self.objective, masters)
        path = save_checkpoint(self.recipe.checkpoint_dir, self.step, self._model_parts(), self.optimizer,
                               self.scheduler, self.loader.state_dict(), {"history": self.history},
                               recipe_yaml(self.recipe), self.recipe.checkpoint.keep, extra_files,
                               model_text=config_yaml(self.cfg),
                               model_state=full_precision_state(self._model_parts(), masters))
        log.info("saved checkpoint %s", path)
        return path

    def _save_distributed(self) -> Path:
        states = [None] * self.topo.world_size
        dist.all_gather_object(states, (self.topo.dp_rank, self.loader.state_dict()))
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "loaders": {str(dp): st for dp, st in states if st is not None}, "layout": str(self.topo.dims)}
        path = save_distributed(step_dir(self.recipe.checkpoint_dir, self.step), self.checkpointed,
                                self.engine.optimizer, self.topo, extra)
        if self.is_main:
            mark_distributed_checkpoint(path, self.step, self.recipe.checkpoint.keep, recipe_yaml(self.recipe),
                                        model_text=config_yaml(self.cfg))
        dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        batches = self.loader.next_rows(self.recipe.train.grad_accum)
        if self.recipe.log.sample_ids:
            log_sample_ids(self.out, self.topo, self.step + 1, batches)
        lr = self.optimizer.param_groups[0]["lr"]  # what this step's update uses; the scheduler then moves on
        stats = self.engine.step(batches)
        if stats.skipped:
            log.warning("step %d: gradient norm is %s; the update is skipped", self.step + 1, stats.grad_norm)
        self.scheduler.step()
        flops = sum((self.task.flops(b) for b in batches), FlopCount())
        # Whole batches are counted once per data-parallel rank (its CP/TP/PP ranks share them).
        totals = torch.tensor([*dataclasses.astuple(flops), sum(b.num_tokens for b in batches)], dtype=torch.float64)
        if self.topo.distributed and self.topo.dims.dp > 1:
            dist.all_reduce(totals, group=self.topo.group("dp"))
        synchronize(self.device)
        self.step += 1
        counted = FlopCount(*(int(v) for v in totals[:-1].tolist()))
        return StepResult(stats.loss, stats.count, int(totals[-1]), counted, stats.grad_norm,
                          time.perf_counter() - t0, stats.metrics, lr)

    # -- the run ----------------------------------------------------------------------------
    def run_eval(self, sink: MetricSink, checkpoint: Path | None = None) -> dict | None:
        result = self.task.evaluate(self, checkpoint)
        if result is None:
            return None
        metrics, line, summary = result
        sink.write(self.step, metrics)
        log.info("step %d %s", self.step, line)
        return summary

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
                 device_name(self.device), self.topo.dims, self.precision,
                 {k: f"{v / 1e6:.1f}M" for k, v in self.param_counts.items()}, self.trainable)
        progress = Progress(r.train.steps, self.step)
        window: list[StepResult] = []
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
            if r.eval.every and self.step % r.eval.every == 0 and not (last or stop) and not self.topo.distributed:
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
        count = sum(w.count for w in window)
        unit = self.objective.unit
        metrics = {
            "train/loss": sum(w.loss * w.count for w in window) / max(count, 1),
            "train/lr": window[-1].lr,
            "train/grad_norm": window[-1].grad_norm,
            f"train/{unit}": count,
            f"perf/{unit}_per_s": count / seconds,
            "perf/tokens_per_s": sum(w.tokens for w in window) / seconds,
            "perf/step_s": seconds / len(window),
            "perf/tflops": flops.total / seconds / 1e12,
            "perf/vit_tflop": flops.vit / 1e12,
            "perf/llm_tflop": flops.llm / 1e12,
            "data/skipped": self.dataset.skips.total,
            "data/epoch": self.loader.epoch,
        }
        for name in self.objective.metric_names:
            metrics[f"train/{name}"] = sum(w.metrics[name] * w.count for w in window) / max(count, 1)
        report = self.loader.last_report
        if report:  # the balancer's predicted imbalance of the window's last step
            metrics["balance/vit_max_over_mean"] = report["vit"]["max_over_mean"]
            metrics["balance/llm_max_over_mean"] = report["llm"]["max_over_mean"]
            for kind, share in report.get("mix", {}).items():  # the step's token mixture (data.loader.mixture)
                metrics[f"data/mix_{kind}"] = share
            if "predicted_step_s" in report:  # calibrated cost model: its error against the measured step
                metrics["balance/predicted_step_s"] = report["predicted_step_s"]
                metrics["balance/prediction_error"] = report["predicted_step_s"] / window[-1].seconds - 1
        metrics.update(self.task.metrics())
        metrics["perf/tokens_per_s_per_device"] = metrics["perf/tokens_per_s"] / self.topo.world_size
        if self.peak:
            metrics["perf/mfu"] = flops.total / (seconds * self.topo.world_size * self.peak)
        return metrics

    def _gather_skips(self) -> None:
        """Rank 0's skip log becomes the whole job's: each data-parallel rank's readers skip their
        own samples (the first stage-0 rank of each speaks for its group, which agrees)."""
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

    def _summary(self, report: dict | None) -> dict:
        losses = [h["train/loss"] for h in self.history]
        out = {
            "name": self.recipe.name, "steps": self.step, "device": device_name(self.device),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "skips": {"total": self.dataset.skips.total, "by_kind": dict(self.dataset.skips.counts),
                      "examples": [vars(s) for s in self.dataset.skips.entries[:50]]},
            "peak_flops": self.peak,
        }
        out.update(self.task.summary())
        if report is not None:
            out["eval"] = report
        return out


def train(recipe: Recipe) -> dict:
    return Trainer(recipe).fit()


__all__ = ["StepResult", "Trainer", "apply_freeze", "train"]
