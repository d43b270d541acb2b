"""Stop a run cleanly when the scheduler says it must end: checkpoint, requeue, exit.

SLURM sends SIGUSR1 some time before a job's time limit (``sbatch --signal``; the batch
script of ``keyetron launch`` forwards it to every training process) and SIGTERM when it
preempts or cancels a job. Either one asks the run to stop at the next step boundary. The
signal may reach the ranks during different steps, so at every boundary the ranks agree
through one all-reduce (MAX) on a gloo group of their own: all of them stop after the
same step and write the usual checkpoint together. Then global rank 0 puts the SLURM job
back in the queue (``scontrol requeue``), and the requeued job, running the same command,
resumes from that checkpoint (``checkpoint.resume: auto``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("keyetron.train")

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped early with a checkpoint; running again continues


def under_slurm() -> bool:
    """A SLURM job that may requeue itself (``KEYETRON_REQUEUE=0`` turns requeueing off)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("KEYETRON_REQUEUE", "1") != "0"


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job; True if SLURM took it. SLURM then ends the running job (SIGTERM)."""
    job = os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
        return False
    return True


class Preemption:
    """The stop request of one run: signal handlers, a flag, and the ranks' agreement on it."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = tuple(signals)
        self.received = 0  # the first signal this process received (0: none)
        self.agreed = 0  # the signal all ranks stop on, once they have agreed to stop
        self._previous: dict[int, object] = {}
        self._group = None  # the ranks' side channel for agreeing (gloo: CPU, never behind GPU work)

    @property
    def requested(self) -> bool:
        """This process received a stop signal (the other ranks may not have yet)."""
        return bool(self.received)

    @property
    def stopped(self) -> bool:
        """All ranks agreed to stop after the current step."""
        return bool(self.agreed)

    def install(self) -> Preemption:
        """Catch the signals; in a multi-process run every rank must call it (it makes a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A group of its own: the training's collectives (some asynchronous, on the default group)
            # never queue behind or beside this one.
            self._group = dist.new_group(backend="gloo")
        if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
            log.warning("not on the main thread: SIGUSR1 / SIGTERM will not stop the run cleanly")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        # Only a flag: the handler runs between any two bytecodes, perhaps inside a collective's caller.
        if not self.received:
            self.received = signum

    def should_stop(self) -> bool:
        """At a step boundary, on every rank: True on all of them once any rank received a signal."""
        flag = self.received
        if self._group is not None:
            t = torch.tensor([flag], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = int(t.item())
        self.agreed = flag
        return self.stopped

    def finish(self, step: int, is_main: bool) -> dict:
        """After the run's last checkpoint. A stopped run requeues its SLURM job (rank 0 only) and
        returns ``{"preempted": {...}}`` for the summary; a finished run gets its handlers back and ``{}``."""
        if not self.stopped:
            self.restore()
            return {}
        slurm = under_slurm()
        if not slurm:
            self.restore()
        # Under SLURM the handlers stay: the requeue is followed by SIGTERM to every process of the job,
        # which must not end them before they have closed the process group.
        requeued = is_main and slurm and requeue_slurm_job()
        name = signal.Signals(self.agreed).name
        if is_main:
            log.warning("preempted by %s: stopped after step %d with its checkpoint saved; %s", name, step,
                        f"SLURM job {os.environ['SLURM_JOB_ID']} requeued, it resumes from that checkpoint"
                        if requeued else "run again to resume from it")
        return {"preempted": {"signal": name, "step": step, "requeued": requeued}}


__all__ = ["EXIT_PREEMPTED", "Preemption", "requeue_slurm_job", "under_slurm"]
