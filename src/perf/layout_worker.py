"""One layout of ``keyetron bench layouts``, run in every process of one torchrun launch.

    python -m torch.distributed.run --nproc-per-node N -m keyetron.perf.layout_worker \\
        --recipe R --layout tp2pp1cp1dp1 --warmup 1 --steps 4 --result out.json [--set KEY=VALUE ...]

Each rank builds the recipe's ``Trainer`` (the same engine in every layout) and runs ``warmup + steps`` real optimizer steps through ``Trainer.train_step``: the
loader reads and decodes the recipe's images and videos, packs rows, the engine steps. Nothing
is mocked; the bench only wraps public pieces of the trainer to time them:

- **step**: ``StepResult.seconds`` (loader to optimizer update, device synchronised), per rank;
  the layout's step time is, per step, the slowest rank, averaged over the measured steps;
- **data wait**: host seconds inside ``trainer.loader.next_rows`` (loading is synchronous in the
  step, so this is time the step waits for data; later pipeline stages wait for stage 0 here);
- **pipeline**: on the device's clock (events on accelerators, ``perf_counter`` on the CPU), the
  span of the schedule (``trainer.par.pipeline.run``) and the compute inside it (every
  ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk`` of this rank's
  stages); measured bubble = 1 - compute / span, which counts idle waiting for neighbours
  (warm-up/cool-down, p2p transfers, unequal stages), averaged over ranks;
- **peak memory**: accelerators: ``torch.accelerator.max_memory_allocated`` over the measured
  steps; CPU: the process's peak resident set (``getrusage``), over its whole life.

Rank 0 gathers every rank's record and writes the layout summary (``summarize``) to --result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from keyetron.backend.device import is_accelerator, synchronize
from keyetron.data.packing import PADDING_SAMPLE_ID
from keyetron.flops import frame_patches


class DeviceClock:
    """Intervals on the device's own clock: timing events on accelerators (kernels run
    asynchronously, so host time would measure launches), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.events = device, is_accelerator(device)

    def mark(self):
        if not self.events:
            return time.perf_counter()
        event = torch.Event(device=self.device, enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.events else end - start


def reset_peak_memory(device: torch.device) -> None:
    if is_accelerator(device):
        torch.accelerator.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if is_accelerator(device):
        return int(torch.accelerator.max_memory_allocated(device)), "device memory allocated (max)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (CPU)"


def row_workload(row) -> dict[str, int]:
    """Real (non-padding) tokens of a packed row, and the sums the cost model needs."""
    ids = row.sample_ids or ("",) * len(row.document_lengths)
    docs = [n for n, sid in zip(row.document_lengths, ids) if sid != PADDING_SAMPLE_ID]
    patches = frame_patches(row.vision_grid_thw)
    return {"rows": 1, "padded_tokens": row.num_tokens, "tokens": sum(docs), "tokens_sq": sum(n * n for n in docs),
            "patches": sum(patches), "patches_sq": sum(p * p for p in patches)}


class Probe:
    """Wraps the trainer's loader and pipeline to time them; one record per measured step."""

    def __init__(self, trainer):
        topo = trainer.topo
        self.clock = DeviceClock(trainer.device)
        # One rank per data-parallel rank counts its rows (its CP/TP/PP ranks hold the same rows).
        self.reader = topo.pp_rank == 0 and topo.cp_rank == 0 and topo.tp_rank == 0
        self.steps: list[dict] = []
        self._open()
        loader_next = trainer.loader.next_rows

        def next_rows(n):
            t0 = time.perf_counter()
            rows = loader_next(n)
            self.current["data_s"] += time.perf_counter() - t0
            if self.reader:
                for row in rows:
                    for key, value in row_workload(row).items():
                        self.current[key] += value
            return rows

        trainer.loader.next_rows = next_rows
        pipeline = trainer.par.pipeline
        if pipeline is not None:
            pipeline.run = self._timed(pipeline.run, "pipe_run_s")
            for stage in pipeline.pipe_stages:
                for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                    if hasattr(stage, name):
                        setattr(stage, name, self._timed(getattr(stage, name), "pipe_busy_s"))

    def _open(self) -> None:
        self.current = dict.fromkeys(("data_s", "rows", "padded_tokens", "tokens", "tokens_sq", "patches",
                                      "patches_sq"), 0)
        self.spans: dict[str, list] = {"pipe_run_s": [], "pipe_busy_s": []}

    def _timed(self, fn, key: str):
        def timed(*args, **kwargs):
            start = self.clock.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans[key].append((start, self.clock.mark()))
        return timed

    def end_step(self, result, record: bool) -> None:
        """After ``train_step`` (which synchronised the device): close the step's record."""
        if record:
            spans = {k: sum(self.clock.seconds(a, b) for a, b in v) for k, v in self.spans.items()}
            flops = dataclasses.asdict(result.flops)
            self.steps.append({**self.current, **spans, "seconds": result.seconds, "flops": flops,
                               "loss": result.loss})
        self._open()


def analytic_bubble(pp: int, micro_batches: int, schedule: str, virtual: int) -> float | None:
    """Idle fraction of a pipeline with equal stages and free communication: (pp-1)/(m+pp-1) for
    GPipe and 1F1B, (pp-1)/(v*m+pp-1) for interleaved 1F1B with v stages per rank."""
    if pp == 1:
        return None
    v = virtual if schedule == "interleaved" else 1
    return (pp - 1) / (v * micro_batches + pp - 1)


def summarize(records: list[dict], *, layout: dict, micro_batches: int, schedule: str, virtual: int,
              peak_flops: float | None) -> dict:
    """The layout's figures from every rank's record (see the module docstring)."""
    world = len(records)
    n = len(records[0]["steps"])
    assert n and all(len(r["steps"]) == n for r in records), [len(r["steps"]) for r in records]
    step_s = [max(r["steps"][i]["seconds"] for r in records) for i in range(n)]
    data_s = [max(r["steps"][i]["data_s"] for r in records) for i in range(n)]
    readers = [r for r in records if r["reader"]]
    load = {k: sum(s[k] for r in readers for s in r["steps"])
            for k in ("rows", "padded_tokens", "tokens", "tokens_sq", "patches", "patches_sq")}
    flops = [records[0]["steps"][i]["flops"] for i in range(n)]  # already summed over data-parallel ranks
    total_flops = sum(sum(f.values()) for f in flops)
    seconds = sum(step_s)
    bubble = idle_s = None
    if layout["pp"] > 1:
        bubble = statistics.mean(
            1 - sum(s["pipe_busy_s"] for s in r["steps"]) / sum(s["pipe_run_s"] for s in r["steps"]) for r in records)
        idle_s = statistics.mean(s["pipe_run_s"] - s["pipe_busy_s"] for r in records for s in r["steps"])
    memory = [r["memory_bytes"] for r in records]
    return {
        **layout, "world": world, "micro_batches": micro_batches, "schedule": schedule, "steps": n,
        "step_s": seconds / n, "step_s_min": min(step_s), "step_s_max": max(step_s),
        "tokens_per_s_per_device": load["tokens"] / seconds / world,
        "tokens_per_step": load["tokens"] / n, "packing_efficiency": load["tokens"] / max(load["padded_tokens"], 1),
        "tflops_per_device": total_flops / seconds / world / 1e12, "tflop_per_step": total_flops / n / 1e12,
        "vit_tflop_per_step": sum(f["vit_linear"] + f["vit_attention"] for f in flops) / n / 1e12,
        "llm_tflop_per_step": sum(f["llm_linear"] + f["llm_attention"] for f in flops) / n / 1e12,
        "mfu": total_flops / (seconds * world * peak_flops) if peak_flops else None,
        "peak_flops": peak_flops,
        "memory_max_gib": max(memory) / 2**30, "memory_min_gib": min(memory) / 2**30,
        "memory_per_rank_gib": [m / 2**30 for m in memory], "memory_kind": records[0]["memory_kind"],
        "bubble_measured": bubble, "pipeline_idle_s": idle_s,
        "bubble_analytic": analytic_bubble(layout["pp"], micro_batches, schedule, virtual),
        "data_wait_s": statistics.mean(data_s), "data_wait_fraction": sum(data_s) / seconds,
        "loss": records[0]["steps"][-1]["loss"],
        # per packed row, for `keyetron plan --measured` (its cost model reads these sums)
        "workload_per_row": {k: load[k] / max(load["rows"], 1)
                             for k in ("tokens", "tokens_sq", "patches", "patches_sq")},
        "row_tokens": load["padded_tokens"] / max(load["rows"], 1),
    }


def run_worker(args: argparse.Namespace) -> dict | None:
    """This rank's part; returns the summary on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from keyetron.backend.device import default_device, device_name, distributed_backend, set_current_device
    from keyetron.parallel.topology import ParallelDims, Topology
    from keyetron.train.recipe import load_recipe
    from keyetron.train.trainer import Trainer

    recipe = load_recipe(args.recipe, args.set)
    device = default_device()
    topo = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        set_current_device(device)
        dist.init_process_group(distributed_backend(device))
        par = recipe.parallel
        topo = Topology.from_process_group(ParallelDims(par.pp, par.dp, par.cp, par.tp), device)
    trainer = Trainer(recipe, device, topo)
    probe = Probe(trainer)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize(device)
            reset_peak_memory(device)
        probe.end_step(trainer.train_step(), record=i >= args.warmup)
    memory, kind = peak_memory(device)
    t = trainer.topo
    record = {"rank": t.rank, "reader": probe.reader, "steps": probe.steps, "memory_bytes": memory,
              "memory_kind": kind}
    records = [record]
    if t.distributed:
        records = [None] * t.world_size
        dist.all_gather_object(records, record)
    if t.rank:
        return None
    par = recipe.parallel
    layout = {"layout": args.layout, "tp": t.dims.tp, "pp": t.dims.pp, "cp": t.dims.cp, "dp": t.dims.dp}
    summary = summarize(records, layout=layout, micro_batches=recipe.train.grad_accum, schedule=par.schedule,
                        virtual=par.virtual_stages, peak_flops=trainer.peak)
    summary.update(device=device_name(device), threads_per_process=torch.get_num_threads(),
                   model=trainer.cfg.name)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--layout", required=True, help="the layout's name, copied into the summary")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--result", required=True, help="rank 0 writes the summary JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    code = 0
    try:
        summary = run_worker(args)
        if summary is not None:
            Path(args.result).write_text(json.dumps(summary, indent=2))
    except BaseException:  # every rank reports its own failure, then all ranks end together
        traceback.print_exc()
        sys.stderr.flush()
        rank = os.environ.get("RANK", "0")
        (Path(args.result).parent / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        code = 1
    import torch.distributed as dist

    if not dist.is_initialized():
        return code
    try:  # exiting through the interpreter with a live DeviceMesh can abort (pytorch#190489)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
