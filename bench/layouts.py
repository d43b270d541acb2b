"""CPU step time per parallel layout, as a ratio to one process (a benchmark, not a test).

Every layout runs the real entry point (``torchrun -m keyetron.train``) on the demo data
(real decoded images and videos, packed rows) with the same recipe, for ``--steps`` optimizer
steps; the step time is the median of the steps after the first two (warm-up), read from the
run's metrics.jsonl. Every process is single-threaded (OMP_NUM_THREADS=1), so one process is
the baseline of one core's work; layouts with more processes than cores share them.

    .venv/bin/python bench/layouts.py --out docs/benchmarks/cpu-layouts.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_STEP = 4  # packed rows per step and data-parallel rank (pipeline micro-batches)
ROW_TOKENS = 1024
LAYOUTS = [  # (name, nproc, flags)
    ("single", 1, []),
    ("DP2", 2, []),
    ("TP2", 2, ["--tp", "2"]),
    ("CP2", 2, ["--cp", "2"]),
    ("PP2", 2, ["--pp", "2"]),
    ("TP2xCP2", 4, ["--tp", "2", "--cp", "2"]),
    ("PP2xTP2", 4, ["--pp", "2", "--tp", "2"]),
    ("DP2xCP2", 4, ["--cp", "2"]),
]


def run_layout(name: str, nproc: int, flags: list[str], recipe: Path, work: Path, steps: int, model: str) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "keyetron.train", "--recipe", str(recipe), *flags,
           "--set", f"output_dir={out}", "--set", f"train.steps={steps}", "--set", f"model.config={model}",
           "--set", "log.every=1", "--set", "log.tensorboard=false", "--set", "data.eval=null",
           "--set", "checkpoint.resume=none", "--set", f"checkpoint.every={steps * 10}",
           "--set", "schedule.name=constant", "--set", "schedule.warmup_steps=0",
           "--set", f"train.grad_accum={ROWS_PER_STEP}", "--set", f"data.loader.row_tokens={ROW_TOKENS}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", KEYETRON_DEVICE="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    with open(out / "metrics.jsonl") as f:
        points = [m for m in map(json.loads, f) if "perf/step_s" in m]
    times = [p["perf/step_s"] for p in points[2:]]
    return {"name": name, "nproc": nproc, "step_s": statistics.median(times), "loss": points[-1]["train/loss"],
            "tokens_per_s": statistics.median(p["perf/tokens_per_s"] for p in points[2:]), "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="recipes/demo-small.yaml")
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--demo", default="data/demo", help="the demo dataset (made if missing)")
    parser.add_argument("--only", nargs="*", help="layout names to run")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()
    if not (Path(args.demo) / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "keyetron.cli", "data", "make-demo", args.demo], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        text = Path(args.recipe).read_text().replace("data/demo/", f"{args.demo.rstrip('/')}/")
        recipe.write_text(text)
        results = [run_layout(n, p, f, recipe, Path(tmp), args.steps, args.model)
                   for n, p, f in LAYOUTS if not args.only or n in args.only]
    base = next(r["step_s"] for r in results if r["name"] == "single") if any(
        r["name"] == "single" for r in results) else None
    lines = ["| layout | processes | step time (s) | ratio to one process | tokens/s (all processes) | loss after the run |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['step_s'] / base:.2f}" if base else "-"
        lines.append(f"| {r['name']} | {r['nproc']} | {r['step_s']:.3f} | {ratio} | {r['tokens_per_s']:.0f} | "
                     f"{r['loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (f"# CPU step time per layout\n\nMachine: {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
                  f"torch {__import__('torch').__version__}, model `{args.model}`, recipe `{args.recipe}`, "
                  f"{args.steps} steps of {ROWS_PER_STEP} rows x {ROW_TOKENS} tokens per data-parallel rank, "
                  f"median of steps 3-{args.steps}.\n\n"
                  f"Reproduce: `.venv/bin/python bench/layouts.py --model {args.model} --steps {args.steps} "
                  f"--out {args.out}`\n\n")
        Path(args.out).write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
