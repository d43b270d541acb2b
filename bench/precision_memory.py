"""Bytes the engine holds per rank for parameters, gradients and optimizer state, fp32 vs bf16
(``ParallelEngine.held_bytes`` after one step of ``small``; see docs/benchmarks/precision.md).

    .venv/bin/python bench/precision_memory.py
"""
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "tests" / "perf"), str(root / "tests")]

from distributed import run_ranks  # noqa: E402
from keyetron.parallel.topology import ParallelDims  # noqa: E402
import test_plan_memory as t  # noqa: E402

print("| layout | precision | weights MiB | grads MiB | optimizer MiB | total MiB |")
print("|---|---|---|---|---|---|")
for dims, name in ((ParallelDims(dp=2), "DP2 ZeRO-1"), (ParallelDims(tp=2), "TP2 ZeRO-1 (small, 4 q / 2 kv heads)")):
    for precision in ("fp32", "bf16"):
        held = run_ranks(2, t._engine_bytes, dims, precision)[0]
        mib = {k: v / 2**20 for k, v in held.items()}
        print(f"| {name} | {precision} | {mib['weights']:.1f} | {mib['grads']:.1f} | {mib['optimizer']:.1f} | "
              f"{sum(mib.values()):.1f} |")
