"""Start a training run in one process, or in each process of a torchrun / SLURM launch.

With ``WORLD_SIZE`` > 1 in the environment (torchrun and our SLURM launcher set it) every
process joins the default process group (NCCL on GPUs, gloo on CPU), builds the topology
from the recipe's ``parallel`` section (flags override it) and runs the same trainer. Each
process ends with ``barrier(); destroy_process_group(); os._exit(code)``: exiting through
the interpreter while a DeviceMesh is alive can abort after all work is done (pytorch#190489).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from keyetron.train.recipe import Recipe

log = logging.getLogger("keyetron.train")


def layout_overrides(tp: int | None, pp: int | None, cp: int | None, dp: int | None) -> list[str]:
    return [f"parallel.{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", dp)) if v is not None]


def _print_summary(summary: dict) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "skips"} | {"skipped": summary["skips"]["total"]},
                     indent=2, default=str))


def run(recipe: Recipe) -> int:
    """Train ``recipe``; returns the process exit code (multi-process runs never return)."""
    from keyetron.train.preempt import EXIT_PREEMPTED

    from keyetron.train.trainer import Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        summary = Trainer(recipe).fit()
        _print_summary(summary)
        return EXIT_PREEMPTED if "preempted" in summary else 0
    import torch.distributed as dist

    from keyetron.backend.device import default_device, distributed_backend, set_current_device
    from keyetron.parallel.topology import ParallelDims, Topology

    device = default_device()
    set_current_device(device)
    dist.init_process_group(distributed_backend(device))
    code = 0
    try:
        par = recipe.parallel
        topo = Topology.from_process_group(ParallelDims(par.pp, par.dp, par.cp, par.tp), device)
        summary = Trainer(recipe, device, topo).fit()
        code = EXIT_PREEMPTED if "preempted" in summary else 0
        if topo.rank == 0:
            _print_summary(summary)
            sys.stdout.flush()
    except BaseException:  # every rank reports its own failure, then all ranks end together
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
        os._exit(code)


__all__ = ["layout_overrides", "run"]
