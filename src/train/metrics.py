"""Where a run reports: a progress line, ``train.log``, ``metrics.jsonl`` and TensorBoard.

Every metric goes to all sinks with one call. ``metrics.jsonl`` (one JSON object per
logged step) is what tests and docs read; TensorBoard gets the same scalars under
``train/``, ``perf/`` and ``eval/``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from keyetron.data.packing import PADDING_SAMPLE_ID

log = logging.getLogger("keyetron.train")


def setup_logging(output_dir: Path, write_file: bool = True) -> None:
    """Log to stderr and (``write_file``: rank 0) to ``<output_dir>/train.log``, appending across resumes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("keyetron")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    target = str(output_dir / "train.log")
    for h in list(root.handlers):
        if getattr(h, "_keyetron", False):
            root.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(sys.stderr)] + ([logging.FileHandler(target)] if write_file else [])
    if not write_file:  # other ranks: warnings only, so a multi-process log stays readable
        handlers[0].setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._keyetron = True
        root.addHandler(handler)
    root.propagate = False


class MetricSink:
    def __init__(self, output_dir: Path, tensorboard: bool = True, write: bool = True):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = write
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A one-line progress bar on a terminal; periodic log lines otherwise (CI, SLURM logs)."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr):
        self.total, self.start, self.stream = total, start, stream
        self.t0 = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.tty:
            return
        done = step / self.total
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text} eta {eta:5.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def log_sample_ids(out: Path, topo, step: int, rows: list) -> None:
    """Data provenance (``log.sample_ids``): the samples of ``step``, one file per data-parallel
    rank, written by its first stage-0 rank."""
    if topo.pp_rank or topo.cp_rank or topo.tp_rank:
        return
    ids = [s for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sample_ids.dp{topo.dp_rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "dp": topo.dp_rank, "of": topo.dims.dp, "ids": ids}) + "\n")


__all__ = ["MetricSink", "Progress", "log_sample_ids", "setup_logging"]
