"""Peak memory of the LM loss's forward + backward, fused vs unfused (a benchmark, not a test).

The loss is ``sum(log p(target))`` of one packed row through the output head, forward and
backward, with the real vocabulary (151,936) in fp32 on CPU:

- unfused: ``-F.cross_entropy(F.linear(hidden, weight), targets)`` (what ``OutputHead`` did
  before ``linear_token_logprobs``): the (N, V) logits, their log-softmax and gradients;
- fused: ``linear_token_logprobs`` with its default chunk (441 rows at this vocabulary).

Each measurement runs in a fresh process that allocates the inputs (hidden, weight, targets),
runs a few-token warm-up, then runs the loss forward + backward and reports two figures, both
over and above the inputs, the gradients of hidden and weight included:

- peak live tensors: every tensor an aten op creates is counted from its creation until its
  storage is freed (a ``TorchDispatchMode``; the inputs and their views are not counted), so
  this is the peak an accelerator's allocator would have to hold (kernels' internal
  workspaces excepted);
- peak RSS: the process's peak resident memory (``ru_maxrss``) during the loss minus its peak
  before it (the inputs are made without temporaries and the warm-up runs on tiny tensors,
  so that peak is the inputs): an independent check on the real machine, since CPU tensors
  are invisible to tracemalloc. It adds the allocator's and the libraries' slack.

The unfused logits of a 32K row (20 GB in fp32, with their gradient more than this machine's
24 GB) do not fit, so the unfused loss is measured on shorter rows and a least-squares line
through those points is extrapolated to 32K; the fused loss is measured at 32K directly.

    nice .venv/bin/python bench/fused_loss_memory.py --out docs/benchmarks/fused_loss.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from keyetron.model.linear_cross_entropy import CHUNK_LOGITS, linear_token_logprobs
from keyetron.perf.live_memory import LiveTensors

VOCAB = 151_936


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def measure(variant: str, tokens: int, hidden_size: int, vocab: int, threads: int) -> dict:
    """In this (fresh) process: the peak memory the loss adds to its inputs, and its wall time."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).mul_(0.02).requires_grad_()  # no temporary copy
    targets = torch.randint(0, vocab, (tokens,), generator=gen)

    def loss(hidden, weight, targets) -> torch.Tensor:
        if variant == "fused":
            return linear_token_logprobs(hidden, weight, targets).sum()
        return -F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")

    # Load the kernels and the mode's own imports before the baseline, on inputs small enough
    # not to raise the peak RSS that the baseline reads.
    small = torch.randn(16, hidden_size, requires_grad=True)
    with LiveTensors(small):
        loss(small[:4], small, targets[:4] % 16).backward()
    baseline = peak_rss_mb()
    start = time.perf_counter()
    with LiveTensors(hidden, weight, targets) as live:
        loss(hidden, weight, targets).backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "tokens": tokens, "tensors_mb": live.peak / 2**20,
            "rss_mb": peak_rss_mb() - baseline, "seconds": seconds}


def run_child(variant: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"{variant:8s} {tokens:6d} tokens: tensors +{result['tensors_mb']:9.1f} MB, RSS +{result['rss_mb']:9.1f} MB, "
          f"{result['seconds']:7.1f} s", flush=True)
    return result


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a + b * x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def report(args, unfused: list[dict], fused: list[dict]) -> str:
    target = args.target_tokens
    measured_unfused = target in [r["tokens"] for r in unfused]
    logits_mb = lambda n: n * args.vocab * 4 / 2**20  # noqa: E731  fp32 logits of n tokens
    fits = {key: fit_line([(r["tokens"], r[key]) for r in unfused]) for key in ("tensors_mb", "rss_mb")}
    at_target = {key: a + b * target for key, (a, b) in fits.items()}
    fused_at_target = next(r for r in fused if r["tokens"] == target)
    lines = [
        "# Fused output projection + cross-entropy: peak memory",
        "",
        f"Loss forward + backward of one row through the output head: vocabulary {args.vocab:,}, hidden "
        f"{args.hidden} (Qwen3-0.6B's), fp32, CPU ({platform.machine()}, {args.threads} threads, torch "
        f"{torch.__version__}); the fused loss in chunks of {max(1, CHUNK_LOGITS // args.vocab)} rows (its "
        "default). Figures are over and above the inputs and include the gradients of hidden and weight "
        f"({(target * args.hidden + args.vocab * args.hidden) * 4 / 2**20:,.0f} MB at {target:,} tokens). "
        "How each is measured: the docstring of `bench/fused_loss_memory.py`.",
        "",
        "    " + " ".join(["nice", ".venv/bin/python", "bench/fused_loss_memory.py", *args.argv]),
        "",
        "| variant | tokens | fp32 logits of the row (MB) | peak live tensors (MB) | peak RSS (MB) | wall (s) | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in unfused + fused:
        lines.append(f"| {r['variant']} | {r['tokens']:,} | {logits_mb(r['tokens']):,.0f} | {r['tensors_mb']:,.0f} | "
                     f"{r['rss_mb']:,.0f} | {r['seconds']:.0f} | measured |")
    if not measured_unfused:
        lines.append(f"| unfused | {target:,} | {logits_mb(target):,.0f} | {at_target['tensors_mb']:,.0f} | "
                     f"{at_target['rss_mb']:,.0f} | | extrapolated (lines below) |")
    lines.append("")
    for key, what in (("tensors_mb", "peak live tensors"), ("rss_mb", "peak RSS")):
        a, b = fits[key]
        residual = max(abs(r[key] - a - b * r["tokens"]) for r in unfused)
        lines.append(f"Unfused {what}, least-squares line through the measured points: {a:,.0f} MB + "
                     f"{b * 1024:,.1f} MB per 1K tokens ({b / logits_mb(1):.2f} fp32 logits of the row alive at "
                     f"the peak); largest residual {residual:,.0f} MB.")
        lines.append("")
    how = "measured" if measured_unfused else "extrapolated"
    lines.append(
        f"**Fused at {target:,} tokens (measured) against unfused ({how}): peak live tensors "
        f"{fused_at_target['tensors_mb']:,.0f} / {at_target['tensors_mb']:,.0f} MB = "
        f"{100 * fused_at_target['tensors_mb'] / at_target['tensors_mb']:.1f}%; peak RSS "
        f"{fused_at_target['rss_mb']:,.0f} / {at_target['rss_mb']:,.0f} MB = "
        f"{100 * fused_at_target['rss_mb'] / at_target['rss_mb']:.1f}%** (target: at most 10%).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (1024: Qwen3-0.6B)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--unfused-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--fused-tokens", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--target-tokens", type=int, default=32768, help="the row length compared (must be a fused one)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--child", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.hidden, args.vocab, args.threads)))
        return
    if args.target_tokens not in args.fused_tokens:
        p.error(f"--target-tokens {args.target_tokens} must be one of --fused-tokens {args.fused_tokens}")
    args.argv = sys.argv[1:]
    unfused = [run_child("unfused", n, args) for n in args.unfused_tokens]
    fused = [run_child("fused", n, args) for n in args.fused_tokens]
    text = report(args, unfused, fused)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
