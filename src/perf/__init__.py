"""Performance: what the ``keyetron bench`` and ``keyetron plan`` commands run.

Throughput per parallel layout with MFU (``layouts`` + ``layout_worker``), the balancer's
imbalance on synthetic batches (``balance``), the cost model's calibration by timing
(``calibrate``) and the memory / step-time planner (``plan``). Results are recorded in
``docs/benchmarks/``; runnable scripts beside the package live in the top-level ``bench/``.
"""
