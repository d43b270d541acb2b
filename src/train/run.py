"""Start a training run in one process, or in each process of a torchrun / SLURM launch.

Before anything is built, ``check_before_start`` refuses what would otherwise fail late:
the layout against the model config and the world size, a layout of several processes
started as one (exit status 2), and the files the recipe names (1, as the CLI maps them).
Under torchrun every rank finds the same error; local rank 0 prints it as one line and
every rank returns the same status.

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
import shlex
import sys
import time
import traceback
from pathlib import Path

from keyetron.config import ConfigError
from keyetron.train.recipe import Recipe

log = logging.getLogger("keyetron.train")


def layout_overrides(tp: int | None, pp: int | None, cp: int | None, dp: int | None) -> list[str]:
    return [f"parallel.{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", dp)) if v is not None]


def train_argv(recipe: str, tp: int | None = None, pp: int | None = None, cp: int | None = None,
               dp: int | None = None, overrides: list[str] = ()) -> list[str]:
    """The ``python -m keyetron.train`` arguments of a run (what a one-process start is told to rerun)."""
    argv = ["--recipe", str(recipe)]
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", dp)):
        if value is not None:
            argv += [f"--{name}", str(value)]
    for assignment in overrides:
        argv += ["--set", assignment]
    return argv


def user_error(err: BaseException) -> tuple[int, str] | None:
    """The exit status and one line (no traceback) of an error the user can fix; None for a bug."""
    from keyetron.checkpoint import CheckpointNotFound
    from keyetron.data.sources import SourceError
    from keyetron.data.tokenizer import TokenizerError
    from keyetron.parallel.balancer import CalibrationError

    if isinstance(err, ConfigError):
        return 2, f"config error: {err}"
    if isinstance(err, (SourceError, CheckpointNotFound, TokenizerError, CalibrationError)):
        return 1, str(err)
    return None


def _model_config(recipe: Recipe, base: Path):
    from keyetron.model import load_model_config

    name = recipe.model.config
    local = base / name
    return load_model_config(local if local.suffix in (".yaml", ".yml") or local.exists() else name)


def check_paths(recipe: Recipe, base: Path) -> None:
    """Every file or folder the run will read exists (relative paths are taken from ``base``, the
    directory the job starts in): SourceError for data, CheckpointNotFound for weights and checkpoints."""
    from keyetron.checkpoint import CheckpointNotFound, list_checkpoints, resolve_checkpoint
    from keyetron.data.sources import SourceError

    def where(value: str) -> str:
        return "" if Path(value).is_absolute() else f" (in {base}: relative paths are read from where the job starts)"

    for key, value in [(f"data.sources[{i}]", s) for i, s in enumerate(recipe.data.sources)] + (
            [("data.eval", recipe.data.eval)] if recipe.data.eval else []):
        if not (base / value).is_file():
            fix = "data.sources=[...]" if key.startswith("data.sources") else "data.eval=..."
            raise SourceError(f"{key} {value} does not exist{where(value)}; fix the path in the recipe or with "
                              f"--set {fix}")
    ck, c = recipe.checkpoint, recipe.contrastive
    resumes = False
    if ck.resume == "auto":
        resumes = bool(list_checkpoints(base / recipe.checkpoint_dir))
    elif ck.resume != "none":
        resumes = bool(resolve_checkpoint(str(base / ck.resume), base / recipe.checkpoint_dir))
    weights = [("model.init", recipe.model.init, "a Hugging Face folder, a keyetron step-N checkpoint or a "
                "`keyetron merge` output")]
    if recipe.train.objective == "siglip":
        weights.append(("contrastive.siglip_checkpoint", c.siglip_checkpoint, "a SiglipModel folder"))
    if not resumes:  # the earlier stage is read only when this run has no checkpoint of its own
        weights.append(("checkpoint.start_from", ck.start_from, "the earlier stage's step-N checkpoint folder"))
    for key, value, what in weights:
        if value and not (base / value).exists():
            raise CheckpointNotFound(f"{key} {value} does not exist{where(value)}; give {what}")


def _one_process_error(recipe: Recipe, argv: list[str] | None) -> ConfigError:
    """A layout of several processes started as one: the exact torchrun (and SLURM) command."""
    par = recipe.parallel
    n = par.processes
    keys = ", ".join(f"parallel.{d}={getattr(par, d)}" for d in ("tp", "pp", "cp", "dp") if getattr(par, d) > 1)
    argv = list(argv or ["--recipe", "RECIPE"])
    launch, args = [], iter(argv)  # keyetron launch takes the same flags but --dp, a recipe key there
    for arg in args:
        launch += ["--set", f"parallel.dp={next(args, '')}"] if arg == "--dp" else [arg]
    gpus = f"--nodes {n // 8} --gpus-per-node 8" if n > 8 and n % 8 == 0 else f"--gpus-per-node {n}"
    return ConfigError(f"the layout {keys} needs {n} processes and this is one (WORLD_SIZE unset or 1); run: "
                       f"torchrun --nproc-per-node {n} -m keyetron.train {shlex.join(argv)} (on SLURM: keyetron "
                       f"launch {shlex.join(launch)} {gpus})")


def check_layout(recipe: Recipe, world_size: int | None, base: Path | None = None,
                 argv: list[str] | None = None) -> None:
    """Raise ConfigError when the model config does not load (a path is taken from ``base``), the
    layout does not fit it or ``world_size`` processes (None: not checked), or a layout of several
    processes is started as one (``argv``: this run's ``python -m keyetron.train`` arguments, for
    the command to use instead)."""
    cfg = _model_config(recipe, Path.cwd() if base is None else base)
    recipe.parallel.check_model(cfg, recipe.train.grad_accum)
    if world_size == 1 and recipe.parallel.processes > 1:
        raise _one_process_error(recipe, argv)
    if world_size is not None:
        recipe.parallel.check_world(world_size)


def check_before_start(recipe: Recipe, world_size: int | None, base: Path | None = None,
                       argv: list[str] | None = None) -> None:
    """Raise for a run that cannot start: ``check_layout`` (ConfigError), then ``check_paths``
    (relative to ``base``, default: the working directory)."""
    base = Path.cwd() if base is None else base
    check_layout(recipe, world_size, base, argv)
    check_paths(recipe, base)


def _tell_torchrun(line: str) -> None:
    """Leave ``line`` where torchrun looks for a failed worker's error (its summary then shows it in
    place of "To enable traceback see ..."), even when it stopped local rank 0 before it printed."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}  # what ErrorHandler.record_exception writes
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


def _print_summary(summary: dict) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "skips"} | {"skipped": summary["skips"]["total"]},
                     indent=2, default=str))


def run(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Train ``recipe``; returns the process exit code (multi-process runs that started never return).
    ``argv``: the ``python -m keyetron.train`` arguments of this run (quoted back in errors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_before_start(recipe, world, argv=argv)
    except Exception as err:  # every rank finds the same: local rank 0 says it, one line per node
        found = user_error(err)
        if found is None:
            raise
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"keyetron: {found[1]}", file=sys.stderr)
        _tell_torchrun(f"keyetron: {found[1]}")
        return found[0]

    from keyetron.train.preempt import EXIT_PREEMPTED
    from keyetron.train.trainer import Trainer

    if world == 1:
        try:
            summary = Trainer(recipe).fit()
        except Exception as err:
            found = user_error(err)
            if found is None:
                raise
            print(f"keyetron: {found[1]}", file=sys.stderr)
            return found[0]
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
    except BaseException as err:  # every rank reports its own failure, then all ranks end together
        found = user_error(err)
        if found is None:
            traceback.print_exc()
            code = 1
        else:  # a user error may reach some ranks only (a bad record): the ranks that met it say so
            code, line = found
            print(f"keyetron: rank {dist.get_rank()}: {line}", file=sys.stderr)
            _tell_torchrun(f"keyetron: {line}")
        sys.stderr.flush()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
        os._exit(code)


__all__ = ["check_before_start", "check_layout", "check_paths", "layout_overrides", "run", "train_argv", "user_error"]
