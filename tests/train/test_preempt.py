"""Preemption: SIGUSR1 / SIGTERM stop a run at the next step boundary with a checkpoint, on
every rank after the same step; under SLURM rank 0 requeues the job; the next run resumes
exactly where the stopped one ended."""
import json
import os
import signal
import stat

import pytest
import torch

from distributed import run_ranks
from keyetron.data.demo import make_demo
from keyetron.train.run import run
from keyetron.train.preempt import EXIT_PREEMPTED, Preemption
from keyetron.train.recipe import load_recipe
from keyetron.train.trainer import Trainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=2, train_size=24, eval_size=4)
    return out


@pytest.fixture(autouse=True)
def own_signal_handlers(monkeypatch):
    """Each test starts outside SLURM with the default handlers and gives them back."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def recipe_file(path, demo, out, steps=6):
    path.write_text(json.dumps({
        "name": "p", "output_dir": str(out), "model": {"config": "tiny"},
        "data": {"sources": [str(demo / "train.jsonl")], "eval": str(demo / "eval.jsonl"),
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 256, "buffer_docs": 8, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
        "train": {"steps": steps, "precision": "fp32"}, "log": {"every": 4, "tensorboard": False},
        "checkpoint": {"every": 0, "keep": 5, "resume": "auto"}, "eval": {"max_samples": 2, "max_new_tokens": 2}}))
    return path


def signal_at_step(monkeypatch, step, sig=signal.SIGUSR1):
    """Deliver ``sig`` to this process inside the given step (as SLURM would, mid-step)."""
    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            os.kill(os.getpid(), sig)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_signal_sets_the_flag_and_restore_gives_the_handlers_back():
    p = Preemption().install()
    assert not p.requested and not p.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested and p.should_stop() and p.agreed == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGUSR1)  # a later signal changes nothing
    assert p.received == signal.SIGTERM
    p.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def _stop_steps(rank, world):
    p = Preemption().install()
    try:
        for step in range(1, 20):
            if rank == 1 and step == 3:  # the signal reaches one rank only, mid-run
                os.kill(os.getpid(), signal.SIGUSR1)
            if p.should_stop():
                return step, p.agreed, p.requested
        return None
    finally:
        p.restore()


def test_all_ranks_stop_after_the_same_step_when_one_rank_got_the_signal():
    assert run_ranks(2, _stop_steps, timeout=60) == [(3, signal.SIGUSR1, False), (3, signal.SIGUSR1, True)]


def test_a_preempted_run_saves_stops_and_resumes_to_the_uninterrupted_result(demo, tmp_path, monkeypatch):
    straight = Trainer(load_recipe(recipe_file(tmp_path / "a.yaml", demo, tmp_path / "a"))).fit()
    signal_at_step(monkeypatch, 3)
    stopped = Trainer(load_recipe(recipe_file(tmp_path / "b.yaml", demo, tmp_path / "b"))).fit()
    assert stopped["preempted"] == {"signal": "SIGUSR1", "step": 3, "requeued": False}
    assert stopped["steps"] == 3 and "eval" not in stopped  # no evaluation in the warning window
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "state.json").is_file()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # outside SLURM the handlers are given back
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3

    monkeypatch.undo()
    resumed = Trainer(load_recipe(recipe_file(tmp_path / "b.yaml", demo, tmp_path / "b")))
    assert resumed.step == 3
    summary = resumed.fit()
    assert "preempted" not in summary and summary["steps"] == 6
    assert summary["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    a = torch.load(tmp_path / "a" / "checkpoints" / "step-000006" / "optim.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step-000006" / "optim.pt", weights_only=False)
    assert a["scheduler"] == b["scheduler"]


def test_under_slurm_rank_zero_requeues_the_job_and_the_exit_code_says_preempted(demo, tmp_path, monkeypatch,
                                                                                  capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    code = run(load_recipe(recipe_file(tmp_path / "r.yaml", demo, tmp_path / "o")))
    assert code == EXIT_PREEMPTED
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    printed = json.loads(capsys.readouterr().out)
    assert printed["preempted"] == {"signal": "SIGTERM", "step": 2, "requeued": True}
    # SLURM's SIGTERM that follows the requeue must not kill the process before it has exited cleanly.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
