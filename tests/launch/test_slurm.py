"""``keyetron launch`` against a real one-node SLURM cluster (``launch/slurm/up.sh``): a
2-process CPU job trains to the end; a job told to stop (``scancel --signal=USR1 --batch``,
what ``--signal=B:USR1@N`` does before a time limit) saves a checkpoint, requeues itself and
the requeued job resumes from that checkpoint and finishes.

Skipped where SLURM cannot be installed (not root, no apt-get). The cluster is left running
if it was running before; otherwise it is stopped at the end."""
import json
import os
import re
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


class Job:
    def __init__(self, job: str, out: Path):
        self.id = job
        self.out_log = out / "logs" / f"slurm-tiny-{job}.out"
        self.err_log = out / "logs" / f"slurm-tiny-{job}.err"

    def logs(self) -> str:
        return "\n".join(p.read_text()[-6000:] for p in (self.out_log, self.err_log) if p.is_file())

    def wait_until(self, ready, what: str, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            state = job_field(self.id, "JobState")
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), \
                f"job {self.id} {state} while waiting for {what}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"job {self.id}: no {what} in {timeout} s ({state}):\n{self.logs()}"
            time.sleep(0.2)

    def wait_done(self) -> None:
        self.wait_until(lambda: job_field(self.id, "JobState") == "COMPLETED", "completion")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=60)


def test_a_two_process_cpu_job_trains_to_the_end(slurm, demo, tmp_path, capsys):
    out = tmp_path / "run"
    job = Job(launch(recipe_file(tmp_path / "r.yaml", demo, out, steps=4), capsys), out)
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
    job = Job(launch(recipe_file(tmp_path / "r.yaml", demo, out, steps=steps), capsys), out)
    try:
        job.wait_until(lambda: job.err_log.is_file() and f"step 2/{steps} loss" in job.err_log.read_text(),
                       "step 2")
        warn = subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], capture_output=True, text=True,
                              timeout=60)
        assert warn.returncode == 0, warn.stderr
        job.wait_done()
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
