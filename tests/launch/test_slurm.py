"""``keyetron launch`` against a real one-node SLURM cluster (``launch/slurm/up.sh``): a
2-process CPU job trains to the end; a job told to stop (``scancel --signal=USR1 --batch``,
what ``--signal=B:USR1@N`` does before a time limit) saves a checkpoint, requeues itself and
the requeued job resumes from that checkpoint and finishes.

Skipped where SLURM cannot be installed (not root, no apt-get). The cluster is left running
if it was running before; otherwise it is stopped at the end."""
import json
import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from keyetron.cli import main
from keyetron.data.demo import make_demo

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("KEYETRON_SLURM_ROOT", Path.home() / ".cache" / "keyetron-slurm"))
TIMEOUT_S = 180


def cluster_is_up() -> bool:
    pid = ROOT / "slurmctld.pid"
    try:
        os.kill(int(pid.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def slurm():
    was_up = cluster_is_up()
    up = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "up.sh")], capture_output=True, text=True,
                        timeout=600)
    if up.returncode == 3:
        pytest.skip(f"SLURM cannot be installed here: {up.stderr.strip()}")
    assert up.returncode == 0, f"launch/slurm/up.sh failed:\n{up.stdout}\n{up.stderr}"
    conf = up.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
    if not was_up:
        subprocess.run(["bash", str(REPO / "launch" / "slurm" / "down.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=4, train_size=24, eval_size=4)
    return out


def recipe_file(path: Path, demo: Path, out: Path, steps: int) -> Path:
    path.write_text(json.dumps({
        "name": "slurm-tiny", "output_dir": str(out), "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")],
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 256, "buffer_docs": 8, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
        "train": {"steps": steps, "precision": "fp32"}, "log": {"every": 1, "tensorboard": False},
        "checkpoint": {"every": 0, "keep": 2, "resume": "auto"}}))
    return path


def launch(recipe: Path, capsys) -> str:
    code = main(["launch", "--recipe", str(recipe), "--gpus-per-node", "0", "--procs-per-node", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip()


def job_field(job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    found = re.search(rf"\b{name}=(\S+)", shown)
    return found.group(1) if found else ""


class TrainLog:
    """The run's ``train.log``, made a FIFO before the job is submitted: rank 0 of each start of the job (the
    first one, the requeued one) writes its log lines into it, and the test reads them as they are written.
    A start's rank 0 exiting closes it (end of file). Waiting blocks on it (select) and polls nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.text = ""  # what rank 0 logged, all starts together
        self.ends = 0  # the starts whose rank 0 has exited
        self.fd = self._open()

    def _open(self) -> int:
        # Non-blocking: opening waits for no writer, and a writer's open finds a reader at once.
        return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def read_until(self, ready, deadline: float) -> bool:
        """Read as rank 0 writes until ``ready()``; False at ``deadline`` (time.monotonic())."""
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return False
            chunk = os.read(self.fd, 1 << 16)
            if chunk:
                self.text += chunk.decode(errors="replace")
            else:  # rank 0 of this start has exited; the next start's rank 0 will open it anew
                os.close(self.fd)
                self.fd = self._open()
                self.ends += 1
        return True

    def close(self) -> None:
        os.close(self.fd)


def wait_for_allocation_end(job: str, timeout: float = TIMEOUT_S) -> str:
    """Block until SLURM takes the job's allocation back: a step sharing it (``--overlap``) reads a pipe that
    nobody writes to, so it runs until SLURM ends it with the job (it cannot start once the job is ending).
    Returns what srun said."""
    never_written, held = os.pipe()
    try:
        return subprocess.run(["srun", f"--jobid={job}", "--overlap", "--ntasks=1", "--quiet", "cat"],
                              stdin=never_written, capture_output=True, text=True, timeout=timeout).stderr
    except subprocess.TimeoutExpired:
        raise AssertionError(f"job {job}: still allocated {timeout} s after its training ended") from None
    finally:
        os.close(never_written)
        os.close(held)


class Job:
    def __init__(self, job: str, out: Path, train_log: TrainLog):
        self.id = job
        self.out_log = out / "logs" / f"slurm-tiny-{job}.out"
        self.err_log = out / "logs" / f"slurm-tiny-{job}.err"
        self.train_log = train_log

    def logs(self) -> str:
        return "\n".join(p.read_text()[-6000:] for p in (self.out_log, self.err_log) if p.is_file())

    def wait_for_log(self, text: str, timeout: float = TIMEOUT_S) -> None:
        """Until rank 0 logs ``text``; fails if rank 0 exits first, or after ``timeout`` s."""
        ends = self.train_log.ends
        self.train_log.read_until(lambda: text in self.train_log.text or self.train_log.ends > ends,
                                  time.monotonic() + timeout)
        why = "rank 0 exited before it" if self.train_log.ends > ends else f"not in {timeout} s"
        assert text in self.train_log.text, \
            f"job {self.id} ({job_field(self.id, 'JobState')}): no {text!r}, {why}:\n{self.logs()}"

    def wait_done(self, starts: int = 1, timeout: float = TIMEOUT_S) -> None:
        """Until the job has ended after ``starts`` starts (1 + its requeues): rank 0 of the last start
        exits, then the batch script does and SLURM takes the allocation back."""
        if not self.train_log.read_until(lambda: self.train_log.ends >= starts, time.monotonic() + timeout):
            state = job_field(self.id, "JobState")
            raise AssertionError(f"job {self.id}: start {starts - 1} did not end in {timeout} s ({state}):\n"
                                 f"{self.logs()}")
        srun = wait_for_allocation_end(self.id, timeout)
        state, code = job_field(self.id, "JobState"), job_field(self.id, "ExitCode")
        assert state in ("COMPLETING", "COMPLETED") and code == "0:0", \
            f"job {self.id} {state} (exit code {code}); srun --overlap: {srun}\n{self.logs()}"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=60)
        self.train_log.close()


def test_a_two_process_cpu_job_trains_to_the_end(slurm, demo, tmp_path, capsys):
    out = tmp_path / "run"
    train_log = TrainLog(out / "train.log")  # before the job can start
    job = Job(launch(recipe_file(tmp_path / "r.yaml", demo, out, steps=4), capsys), out, train_log)
    try:
        job.wait_done()
    finally:
        job.cancel()
    err = job.err_log.read_text()
    assert "layout DP2" in err and all(f"step {s}/4 loss" in err for s in range(1, 5)), job.logs()
    assert "training exited with status 0" in job.out_log.read_text()
    assert (out / "checkpoints" / "step-000004" / "state.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert job_field(job.id, "Restarts") == "0"


def test_a_warned_job_checkpoints_requeues_itself_and_resumes_to_the_end(slurm, demo, tmp_path, capsys):
    out = tmp_path / "run"
    steps = 40  # long enough that the signal lands mid-run; the resumed run trains the rest
    train_log = TrainLog(out / "train.log")  # before the job can start
    job = Job(launch(recipe_file(tmp_path / "r.yaml", demo, out, steps=steps), capsys), out, train_log)
    try:
        job.wait_for_log(f"step 2/{steps} loss")
        warn = subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], capture_output=True, text=True,
                              timeout=60)
        assert warn.returncode == 0, warn.stderr
        job.wait_done(starts=2)  # the warned start, then the requeued one
    finally:
        job.cancel()
    err, log = job.err_log.read_text(), job.out_log.read_text()
    stopped = re.search(r"preempted by SIGUSR1: stopped after step (\d+) with its checkpoint saved; "
                        rf"SLURM job {job.id} requeued", err)
    assert stopped, job.logs()
    k = int(stopped.group(1))
    assert 2 <= k < steps
    assert f"resumed from {out / 'checkpoints' / f'step-{k:06d}'} at step {k}" in err, job.logs()
    assert f"keyetron: job {job.id} start 0" in log and f"keyetron: job {job.id} start 1" in log
    assert "SIGUSR1 received: forwarding it" in log and "training exited with status 0" in log
    assert job_field(job.id, "Restarts") == "1"
    assert '"requeued": true' in log
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [f"step-{k:06d}", f"step-{steps:06d}"]
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # each step once: stopped after k, resumed at k + 1
