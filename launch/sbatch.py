"""The sbatch script of one training job: ``#SBATCH`` directives, environment, ``srun ... torchrun``.

One ``torchrun`` per node (``srun --ntasks-per-node=1``) starts the node's training
processes: one per GPU, or ``procs_per_node`` CPU processes on gloo when a job has no
GPUs. The processes meet through torchrun's c10d rendezvous on the first node of the
allocation. ``srun`` runs in the background so that the batch shell can take SLURM's
warning signal (``--signal=B:USR1@N``, or ``scancel --signal=USR1 --batch``) and forward
it to the training processes: they save a checkpoint at the next step boundary, rank 0
requeues the job and the requeued job resumes (``keyetron.train.preempt``).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# torchrun forwards these to its workers instead of dying of them (SIGUSR1's default action kills).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# CPUs asked per GPU when --cpus-per-task is not given. Without the directive SLURM gives the one task of a
# node (all its ranks) a single CPU; 8 per GPU fits the GPU nodes we know (DGX A100/H100: 16 and 14 cores
# per GPU, cloud 8-GPU nodes: 12 or more vCPUs per GPU) and leaves a rank its decoding and OpenMP threads.
CPUS_PER_GPU = 8


class Expand(str):
    """A word of the script that the job's shell expands ("$SLURM_NNODES"); every other word is quoted."""


class LaunchError(ValueError):
    """A job that cannot run as asked (layout, resources, paths); the message says what to change."""


@dataclass
class JobSpec:
    recipe: Path  # absolute: the job may start in another directory than the submitting shell
    workdir: Path  # the job's working directory (relative recipe paths are read from here)
    output_dir: Path  # the run's folder; SLURM's logs go to <output_dir>/logs
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # CPU jobs: training processes per node (default 1)
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 0  # the recipe's parallel.dp; 0: what the world leaves after tp x pp x cp
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, passed on to training
    job_name: str = "keyetron"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # SLURM's time format: minutes, HH:MM:SS, D-HH:MM:SS
    cpus_per_task: int | None = None  # CPUs of the one task per node (all its processes); 0: no directive
    warning_seconds: int = 300  # SIGUSR1 this long before the time limit: time to save a checkpoint
    socket_ifname: str | None = None  # network interface for NCCL / gloo bootstrap (e.g. ib0, eth0)
    sbatch_args: list[str] = field(default_factory=list)  # extra directives, e.g. --qos=high
    torchrun: str = "torchrun"

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def procs(self) -> int:
        """Training processes per node."""
        if self.on_gpu:
            return self.gpus_per_node
        return 1 if self.procs_per_node is None else self.procs_per_node

    @property
    def cpus(self) -> int | None:
        """CPUs of each node's task: as asked (0: none asked, the site's default); CPU jobs default to
        one per process, GPU jobs to CPUS_PER_GPU per GPU."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task or None
        return CPUS_PER_GPU * self.gpus_per_node if self.on_gpu else self.procs

    @property
    def cpus_defaulted(self) -> bool:
        """Whether the CPUs were chosen here, not asked for (the launcher says so)."""
        return self.cpus_per_task is None

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "logs"


def validate(spec: JobSpec) -> None:
    """Raise LaunchError when the job cannot start as described."""
    if spec.nodes < 1:
        raise LaunchError(f"--nodes must be at least 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be 0 (a CPU job) or more, got {spec.gpus_per_node}")
    if spec.on_gpu and spec.procs_per_node not in (None, spec.gpus_per_node):
        raise LaunchError(f"--procs-per-node {spec.procs_per_node} is for CPU jobs; a GPU job runs one process per "
                          f"GPU ({spec.gpus_per_node} per node); drop --procs-per-node or pass --gpus-per-node 0")
    if spec.procs < 1:
        raise LaunchError(f"--procs-per-node must be at least 1, got {spec.procs_per_node}")
    if min(spec.tp, spec.pp, spec.cp) < 1:
        raise LaunchError(f"tp, pp and cp must be at least 1, got tp {spec.tp}, pp {spec.pp}, cp {spec.cp}")
    model = spec.tp * spec.pp * spec.cp
    unit = "GPUs" if spec.on_gpu else "CPU processes"
    world = f"{spec.world_size} {unit} ({spec.nodes} node(s) x {spec.procs} per node)"
    if spec.world_size % model:
        raise LaunchError(f"tp x pp x cp = {spec.tp} x {spec.pp} x {spec.cp} = {model} does not divide the {world}; "
                          f"choose a layout whose product divides {spec.world_size}, or change --nodes / "
                          f"{'--gpus-per-node' if spec.on_gpu else '--procs-per-node'}")
    if spec.dp and spec.dp * model != spec.world_size:
        raise LaunchError(f"the recipe's parallel.dp {spec.dp} x tp x pp x cp {model} = {spec.dp * model} is not the "
                          f"{world}; set parallel.dp=0 (dp is then what the world leaves) or fit the job to it")
    if spec.warning_seconds < 1:
        raise LaunchError(f"--warning-seconds must be positive, got {spec.warning_seconds}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 0:
        raise LaunchError(f"--cpus-per-task must be at least 1 (or 0: no directive, the site's default), got "
                          f"{spec.cpus_per_task}")
    if spec.cpus is not None and spec.cpus < spec.procs:
        raise LaunchError(f"--cpus-per-task {spec.cpus} is fewer than the {spec.procs} training processes of a node; "
                          f"give at least one CPU per process (e.g. --cpus-per-task "
                          f"{spec.procs * (CPUS_PER_GPU if spec.on_gpu else 1)})")
    if not re.fullmatch(r"[\w.+-]+", spec.job_name):
        raise LaunchError(f"job name {spec.job_name!r} may hold letters, digits and . _ + - only (it names the "
                          f"log files); pass --job-name")
    if not spec.recipe.is_file():
        raise LaunchError(f"recipe {spec.recipe} does not exist")


def directives(spec: JobSpec) -> list[str]:
    logs = spec.log_dir
    lines = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.on_gpu:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus is not None:
        lines.append(f"--cpus-per-task={spec.cpus}")
    lines += [f"--{name}={value}" for name, value in (("time", spec.time), ("partition", spec.partition),
                                                      ("account", spec.account)) if value]
    lines += [f"--chdir={spec.workdir}", f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err",
              "--open-mode=append",  # a requeued job appends to the same two logs
              "--requeue", f"--signal=B:USR1@{spec.warning_seconds}", *spec.sbatch_args]
    return [f"#SBATCH {line}" for line in lines]


def environment(spec: JobSpec) -> list[str]:
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max((spec.cpus or spec.procs) // spec.procs, 1))}
    if spec.on_gpu:
        # A failed peer ends the collective with an error instead of a hang until the timeout.
        env |= {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
    else:
        env["KEYETRON_DEVICE"] = "cpu"  # gloo, even where the nodes have GPUs
    ifname = spec.socket_ifname or (None if spec.on_gpu or spec.nodes > 1 else "lo")  # one node: loopback
    if ifname:
        env |= {"GLOO_SOCKET_IFNAME": ifname} | ({"NCCL_SOCKET_IFNAME": ifname} if spec.on_gpu else {})
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def train_command(spec: JobSpec) -> list[str]:
    """``torchrun ... -m keyetron.train ...`` as arguments (shell variables left for the job to expand)."""
    cmd = [spec.torchrun, "--nnodes", Expand("$SLURM_NNODES"), "--nproc-per-node", str(spec.procs),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", Expand("$MASTER_ADDR:$MASTER_PORT"),
           "--rdzv-id", Expand("$SLURM_JOB_ID"),
           "--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(spec.warning_seconds),
           "-m", "keyetron.train", "--recipe", str(spec.recipe),
           "--tp", str(spec.tp), "--pp", str(spec.pp), "--cp", str(spec.cp)]
    for assignment in spec.overrides:
        cmd += ["--set", assignment]
    return cmd


def _shell_word(arg: str) -> str:
    return f'"{arg}"' if isinstance(arg, Expand) else shlex.quote(arg)


def _flag_lines(args: list[str]) -> list[str]:
    """One line per flag and its value, so that the script reads like its documentation."""
    lines: list[str] = []
    for arg in map(_shell_word, args):
        if lines and not arg.startswith("-") and lines[-1].startswith("-") and " " not in lines[-1]:
            lines[-1] += " " + arg
        else:
            lines.append(arg)
    return lines


def render_sbatch(spec: JobSpec) -> str:
    """The batch script of ``spec`` (validated first)."""
    validate(spec)
    srun = ["srun", f"--nodes={spec.nodes}", f"--ntasks={spec.nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1"]
    if spec.cpus is not None:  # srun of SLURM 22.05 does not inherit it from sbatch
        srun.append(Expand("--cpus-per-task=$SLURM_CPUS_PER_TASK"))
    command = " \\\n  ".join([" ".join(_shell_word(a) for a in srun), *_flag_lines(train_command(spec))])
    lines = [
        "#!/bin/bash",
        f"# keyetron training job: {spec.recipe.name} on {spec.nodes} node(s) x {spec.procs} "
        f"{'GPU(s)' if spec.on_gpu else 'CPU process(es)'}, tp {spec.tp} pp {spec.pp} cp {spec.cp}",
        *directives(spec),
        *([f"# --cpus-per-task={spec.cpus}: keyetron launch's default of {CPUS_PER_GPU} per GPU; pass "
           f"--cpus-per-task to change it"] if spec.on_gpu and spec.cpus_defaulted else []),
        "",
        "set -uo pipefail",
        *environment(spec),
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "# A requeued job gets a fresh port: the previous run's store may still hold the old one.",
        "export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID + ${SLURM_RESTART_COUNT:-0} * 997) % 20000 ))",
        'echo "keyetron: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# srun runs in the background so that this shell can forward SLURM's warning signal.",
        "TRAIN_PID=",
        "forward() {",
        '  echo "keyetron: SIG$1 received: forwarding it to the training processes (checkpoint, then requeue)"',
        '  [ -n "$TRAIN_PID" ] && kill -s "$1" "$TRAIN_PID" 2>/dev/null',
        "}",
        "trap 'forward USR1' USR1",
        f"{command} &",
        "TRAIN_PID=$!",
        "# wait returns early when a trapped signal arrives; keep waiting until srun has ended.",
        'while kill -0 "$TRAIN_PID" 2>/dev/null; do wait "$TRAIN_PID"; done',
        'wait "$TRAIN_PID"; status=$?',
        'echo "keyetron: training exited with status $status"',
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["CPUS_PER_GPU", "Expand", "JobSpec", "LaunchError", "TORCHRUN_SIGNALS", "directives", "environment",
           "render_sbatch", "train_command", "validate"]
