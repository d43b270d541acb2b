"""A data-parallel run (2 processes, as torchrun starts them) killed with SIGKILL mid-training and resumed from its last
checkpoint logs the same losses, and hands out the same sample ids in the same order, as a run
that was never interrupted (fp32 on CPU).

The tiny model takes milliseconds a step, so the kill lands some steps after the first
checkpoint; the resumed run goes 4 steps past whichever checkpoint was the last, and the
uninterrupted reference as far."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from keyetron.data.demo import make_demo
from keyetron.checkpoint import resolve_checkpoint

TIMEOUT_S = 240


def recipe_file(path, demo, out):
    path.write_text(json.dumps({
        "name": "k", "output_dir": str(out), "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")],
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 256, "buffer_docs": 8, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
        "train": {"steps": 1000, "grad_accum": 2, "precision": "fp32"}, "log": {"every": 1, "tensorboard": False, "sample_ids": True},
        "checkpoint": {"every": 2, "keep": 10, "resume": "auto"}, "parallel": {"dp": 2}}))
    return str(path)


class Ranks:
    """Two ``python -m keyetron.train`` processes joined as torchrun would join them (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT). Launched directly, not through torchrun: torchrun starts its
    workers in sessions of their own, so killing the launcher would leave them running."""

    def __init__(self, recipe: str, *overrides: str, world: int = 2):
        cmd = [sys.executable, "-m", "keyetron.train", "--recipe", recipe, *(a for o in overrides for a in ("--set", o))]
        port = free_port()
        self.procs = []
        for rank in range(world):
            env = os.environ | {"KEYETRON_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "RANK": str(rank),
                                "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, start_new_session=True))
        # One reader per process takes its output line by line as it is written; the test waits on
        # what they read (a log line, the end of a process's output) instead of polling.
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self.ended = [False] * len(self.procs)
        self.news = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(rank,), daemon=True) for rank in range(world)]
        for reader in self.readers:
            reader.start()

    def _read(self, rank: int) -> None:
        for line in self.procs[rank].stdout:
            with self.news:
                self.lines[rank].append(line)
                self.news.notify_all()
        with self.news:
            self.ended[rank] = True
            self.news.notify_all()

    def wait_for_line(self, text: str, timeout: float) -> None:
        """Until rank 0 logs a line holding ``text`` (rank 0 logs at INFO, the others warnings only); fails
        if a process ends its output first, or after ``timeout`` seconds."""
        with self.news:
            seen = self.news.wait_for(lambda: any(self.ended) or any(text in line for line in self.lines[0]),
                                      timeout)
            found = any(text in line for line in self.lines[0])
        assert found, (f"rank 0 logged no {text!r} in {timeout} s" if not seen else
                       f"a process ended before rank 0 logged {text!r}") + f":\n{self.output()}"

    def output(self) -> str:
        with self.news:
            return "\n".join("".join(lines)[-3000:] for lines in self.lines)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)
        for reader in self.readers:
            reader.join(timeout=30)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p, reader in zip(self.procs, self.readers):
            p.wait(timeout=max(deadline - time.monotonic(), 1))
            reader.join(timeout=max(deadline - time.monotonic(), 1))  # the rest of its output
        for p, lines in zip(self.procs, self.lines):
            assert p.returncode == 0, "".join(lines)[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ids_by_step(out) -> dict[tuple[int, int], list[str]]:
    """The last logged sample ids of each (step, data-parallel rank)."""
    ids = {}
    for path in sorted(out.glob("sample_ids.dp*.jsonl")):
        for entry in map(json.loads, path.read_text().splitlines()):
            ids[entry["step"], entry["dp"]] = entry["ids"]
    return ids


def losses_by_step(out) -> dict[int, float]:
    """The last logged loss of each step (a killed run may have logged steps its resume redoes)."""
    with open(out / "metrics.jsonl") as f:
        return {m["step"]: m["train/loss"] for m in map(json.loads, f) if "train/loss" in m}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=3, train_size=40, eval_size=6)
    return out


def run_to_the_end(recipe: str, steps: int) -> None:
    ranks = Ranks(recipe, f"train.steps={steps}")
    try:
        ranks.wait(TIMEOUT_S)
    finally:
        ranks.kill()


def test_a_killed_data_parallel_run_resumes_to_the_uninterrupted_losses(demo, tmp_path):
    recipe = recipe_file(tmp_path / "b.json", demo, tmp_path / "b")
    victim = Ranks(recipe)  # 1000 steps; the constant schedule does not depend on the length
    checkpoint = tmp_path / "b" / "checkpoints" / "step-000002"
    try:
        # rank 0 logs it once the checkpoint is whole: all shards saved, then state.json written last
        victim.wait_for_line(f"saved checkpoint {checkpoint}", TIMEOUT_S)
        assert (checkpoint / "state.json").is_file()  # the checkpoint is whole
    finally:
        victim.kill()
    assert all(p.returncode == -signal.SIGKILL for p in victim.procs)
    last = json.loads((resolve_checkpoint("auto", tmp_path / "b" / "checkpoints") / "state.json").read_text())["step"]
    steps = last + 4
    run_to_the_end(recipe, steps)  # checkpoint.resume is auto: from step `last`
    run_to_the_end(recipe_file(tmp_path / "a.json", demo, tmp_path / "a"), steps)
    expected, got = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert sorted(expected) == list(range(1, steps + 1)) and set(got) >= set(expected)
    resumed = range(last + 1, steps + 1)
    assert [got[s] for s in resumed] == pytest.approx([expected[s] for s in resumed], rel=1e-6)
    assert [got[s] for s in range(1, last + 1)] == pytest.approx([expected[s] for s in range(1, last + 1)], rel=1e-6)
    # the same sample ids in the same order, step by step and rank by rank
    assert ids_by_step(tmp_path / "b") == ids_by_step(tmp_path / "a") and len(ids_by_step(tmp_path / "a")) == 2 * steps
