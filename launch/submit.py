"""``keyetron launch``: render a training job's sbatch script and submit it (or print it).

    keyetron launch --recipe recipes/demo-small.yaml --nodes 2 --gpus-per-node 8 --tp 2 --time 4:00:00
    keyetron launch --recipe R --gpus-per-node 0 --procs-per-node 2 --dry-run   # a CPU job, printed only

Before anything is written or submitted the job is checked as its processes would check it
(``keyetron.train.run.check_layout`` and ``check_paths``): the recipe loads with the ``--set``
overrides and the layout flags, the model config loads, the layout fits the model (heads,
vocabulary, layers, micro-batches) and the job's processes, and every file the recipe names
exists (relative paths from the submit directory, the job's ``--chdir``). So a typo, a missing
file or an impossible layout fails here in one line and not after the job waited in the queue.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from keyetron.launch.sbatch import CPUS_PER_GPU, JobSpec, LaunchError, render_sbatch, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``keyetron launch``."""
    parser.add_argument("--recipe", required=True, help="a recipe YAML, e.g. recipes/demo-small.yaml")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs per node, one training process each; 0: a CPU job on gloo (see --procs-per-node)")
    parser.add_argument("--procs-per-node", type=int, default=None,
                        help="CPU jobs only: training processes per node (default 1)")
    for dim in ("tp", "pp", "cp"):
        parser.add_argument(f"--{dim}", type=int, default=None,
                            help=f"{dim} size (default: the recipe's parallel.{dim}); dp is what the world leaves")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in the job, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 4:00:00 (default: the partition's)")
    parser.add_argument("--job-name", default=None, help="default: the recipe's name")
    parser.add_argument("--output-dir", default=None,
                        help="the run's folder (sets output_dir; SLURM logs go to its logs/); default: the recipe's")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help=f"CPUs per node for the node's training processes (default: {CPUS_PER_GPU} per GPU; "
                             "one per CPU process; 0: no directive, the site's default)")
    parser.add_argument("--warning-seconds", type=int, default=300,
                        help="SIGUSR1 this long before the time limit: checkpoint, requeue (default 300)")
    parser.add_argument("--socket-ifname", default=None,
                        help="network interface for NCCL / gloo (e.g. ib0); default: NCCL's choice, loopback "
                             "for one-node CPU jobs")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")


def torchrun_path() -> str:
    """The torchrun of this interpreter's environment, so the job runs the same installation."""
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else "torchrun"


def spec_from_args(args: argparse.Namespace, workdir: Path | None = None) -> JobSpec:
    """Load the recipe as the job will (overrides and layout flags applied), describe the job and
    check that it can start (LaunchError: what to change)."""
    from keyetron.checkpoint import CheckpointNotFound
    from keyetron.config import ConfigError
    from keyetron.data.sources import SourceError
    from keyetron.train.run import check_layout, check_paths, layout_overrides
    from keyetron.train.recipe import load_recipe

    workdir = (workdir or Path.cwd()).resolve()
    recipe_path = (workdir / args.recipe).resolve()
    if not recipe_path.is_file():
        raise LaunchError(f"recipe {recipe_path} does not exist; recipes live in recipes/ "
                          f"(e.g. recipes/demo-small.yaml)")
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={(workdir / args.output_dir).resolve()}")
    try:
        recipe = load_recipe(recipe_path, overrides + layout_overrides(args.tp, args.pp, args.cp, None))
    except (ConfigError, ValueError) as err:
        raise LaunchError(str(err) if isinstance(err, ConfigError) else f"{recipe_path}: {err}") from err
    par = recipe.parallel
    spec = JobSpec(recipe=recipe_path, workdir=workdir, output_dir=(workdir / recipe.output_dir).resolve(),
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                   tp=par.tp, pp=par.pp, cp=par.cp, dp=par.dp, overrides=overrides,
                   job_name=args.job_name or recipe.name, partition=args.partition, account=args.account,
                   time=args.time, cpus_per_task=args.cpus_per_task, warning_seconds=args.warning_seconds,
                   socket_ifname=args.socket_ifname, sbatch_args=list(args.sbatch), torchrun=torchrun_path())
    try:
        check_layout(recipe, None, workdir)  # the model config and the layout against the model
        validate(spec)  # the resources and the world (N x G or N x P processes), in the launch flags' words
        check_paths(recipe, workdir)
    except (ConfigError, SourceError, CheckpointNotFound) as err:
        raise LaunchError(str(err)) from err
    return spec


def submit(spec: JobSpec, script: str) -> str:
    """Write the script beside the job's logs and submit it; returns the job id."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    path = spec.log_dir / f"{spec.job_name}.sbatch"
    path.write_text(script)
    try:
        done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                              env=os.environ, timeout=120)
    except FileNotFoundError as err:
        raise LaunchError("sbatch not found: run on a SLURM login node (or start the local cluster with "
                          "launch/slurm/up.sh), or use --dry-run to see the script") from err
    if done.returncode != 0:
        raise LaunchError(f"sbatch {path} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"


def main(args: argparse.Namespace) -> int:
    """``keyetron launch``: 0 submitted (the job id on stdout) or printed; 2 the job cannot run as asked."""
    try:
        spec = spec_from_args(args)
        script = render_sbatch(spec)
        if spec.on_gpu and spec.cpus_defaulted:
            print(f"keyetron launch: --cpus-per-task {spec.cpus} ({CPUS_PER_GPU} per GPU, the default); pass "
                  "--cpus-per-task to change it", file=sys.stderr)
        if args.dry_run:
            print(script, end="")
            return 0
        job = submit(spec, script)
    except LaunchError as err:
        print(f"keyetron launch: {err}", file=sys.stderr)
        return 2
    print(job)
    print(f"keyetron launch: submitted job {job}; logs: {spec.log_dir}/{spec.job_name}-{job}.out|.err",
          file=sys.stderr)
    return 0


__all__ = ["add_arguments", "main", "spec_from_args", "submit", "torchrun_path"]
