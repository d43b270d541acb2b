"""Time of the fused output projection + cross-entropy (forward + backward) for a demo row's loss tokens.

    python bench/fused_loss_time.py [--tokens 350] [--repeats 8]

Compares the one-chunk path (the forward's softmax kept for the backward) with the same rows in
two chunks (each chunk's logits recomputed in the backward), `small`'s width and the real
vocabulary, fp32, on this machine's threads. Prints the medians in milliseconds.
"""
from __future__ import annotations

import argparse
import time

import torch

from keyetron.model.linear_cross_entropy import linear_token_logprobs


def median_ms(hidden, weight, targets, chunk_tokens, repeats):
    times = []
    for _ in range(repeats + 2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        t0 = time.perf_counter()
        linear_token_logprobs(h, w, targets, chunk_tokens=chunk_tokens).sum().backward()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[2:])[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=350, help="loss tokens (a 2,048-token demo row has ~350)")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen) * 0.5
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * 0.02
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    one = median_ms(hidden, weight, targets, args.tokens, args.repeats)
    two = median_ms(hidden, weight, targets, (args.tokens + 1) // 2, args.repeats)
    print(f"{args.tokens} loss tokens x {args.vocab} vocabulary, {torch.get_num_threads()} threads: "
          f"one chunk (softmax kept) {one:.0f} ms, two chunks (logits recomputed) {two:.0f} ms")


if __name__ == "__main__":
    main()
