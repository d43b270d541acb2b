"""``keyetron bench balance``: the load balancer against naive token filling on a synthetic mix.

The mix (``synthetic_mix``) is a global batch of samples drawn from three kinds, their
counts chosen so that the expected shares of LLM tokens are 24% video, 50% image, 26%
text (the reference mix of shared/reference/performance.md). Lengths are heavy-tailed and
scale with the row length ``S`` (long-context runs train on long documents), with
``s = S / 8192``; every sample is clipped to fit one row:

- **text**: one document of ``lognormal(median 1,200 s, sigma 1.0)`` tokens, truncated to
  32..S (redrawn, so there is no pile-up of documents at the row length).
- **image** (interleaved image-text): ``1 + Poisson(0.5 s)`` images; each image has
  ``lognormal(median 400, sigma 0.8)`` LLM tokens clipped to 16..4,096 (resolution does
  not grow with the context), i.e. 4x as many ViT patches (2x2 merge); plus
  ``lognormal(median 120, sigma 1.0)`` text tokens per image.
- **video**: a frame size of ``lognormal(median 160, sigma 0.5)`` tokens clipped to
  32..1,024 (4x as many patches per frame) and ``8 s * (1 + Pareto(1.2))`` frames (a
  power-law tail of long videos), capped at 75,000 visual tokens (the paper profile's
  budget) and at the row; plus ``lognormal(median 100, sigma 0.8)`` text tokens.

Samples are shuffled (the sampler's order), which is the order naive filling uses.
"""
from __future__ import annotations

import statistics

import numpy as np

from keyetron.data.dataset import SampleCost
from keyetron.parallel.balancer import CostModel, assign, imbalance_report, naive_assign

TOKEN_SHARES = {"video": 0.24, "image": 0.50, "text": 0.26}
VIDEO_TOKEN_BUDGET = 75_000
MERGE = 4  # patches per LLM token (2x2 merge)


def _lognormal(rng, median, sigma, size):
    return median * np.exp(sigma * rng.standard_normal(size))


def _truncated(rng, median, sigma, n, low, high):
    """Lognormal draws redrawn until they fall in [low, high] (no pile-up at the cap)."""
    x = _lognormal(rng, median, sigma, n)
    bad = (x < low) | (x > high)
    while bad.any():
        x[bad] = _lognormal(rng, median, sigma, int(bad.sum()))
        bad = (x < low) | (x > high)
    return x.astype(int)


def _text(rng, n, row):
    return [(int(t), ()) for t in _truncated(rng, 1200 * row / 8192, 1.0, n, 32, row)]


def _image(rng, n, row):
    out = []
    for m in 1 + rng.poisson(0.5 * row / 8192, n):
        img = np.clip(_lognormal(rng, 400, 0.8, m), 16, 4096).astype(int)
        text = _lognormal(rng, 120, 1.0, m).astype(int) + 1
        keep = np.cumsum(img + text) <= row  # drop the images that would overflow the row
        keep[0] = True
        img, text = img[keep], text[keep]
        img[0] = min(img[0], row - text[0])
        out.append((int(img.sum() + text.sum()), tuple(int(t) * MERGE for t in img)))
    return out


def _video(rng, n, row):
    out = []
    frame = np.clip(_lognormal(rng, 160, 0.5, n), 32, 1024).astype(int)
    frames = (8 * row / 8192 * (1 + rng.pareto(1.2, n))).astype(int) + 1
    text = np.clip(_lognormal(rng, 100, 0.8, n), 8, row // 4).astype(int)
    for f, k, t in zip(frame, frames, text):
        f = min(int(f), row - int(t))
        k = max(1, min(int(k), VIDEO_TOKEN_BUDGET // f, (row - int(t)) // f))
        out.append((k * f + int(t), (f * MERGE,) * k))
    return out


_KINDS = {"video": _video, "image": _image, "text": _text}


def synthetic_mix(n_samples: int, row_tokens: int, seed: int = 0) -> list[SampleCost]:
    """``n_samples`` shuffled samples of the documented mix (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    pilot = {k: np.mean([n for n, _ in draw(rng, 2000, row_tokens)]) for k, draw in _KINDS.items()}
    weight = {k: TOKEN_SHARES[k] / pilot[k] for k in _KINDS}
    total = sum(weight.values())
    counts = {k: int(round(n_samples * w / total)) for k, w in weight.items()}
    counts["image"] += n_samples - sum(counts.values())
    samples = [SampleCost(f"{kind}-{i}", n, patches)
               for kind, draw in _KINDS.items() for i, (n, patches) in enumerate(draw(rng, counts[kind], row_tokens))]
    return [samples[i] for i in rng.permutation(len(samples))]


def mix_summary(samples: list[SampleCost]) -> dict:
    tokens = {k: sum(s.llm_tokens for s in samples if s.sample_id.startswith(k)) for k in _KINDS}
    total = sum(tokens.values())
    return {"samples": {k: sum(s.sample_id.startswith(k) for s in samples) for k in _KINDS},
            "token_share": {k: round(v / total, 3) for k, v in tokens.items()}, "tokens": total}


class BenchUsageError(ValueError):
    """Arguments the bench cannot run with; the message names the flags and what to change."""


def check_arguments(ranks: int, row_tokens: int, samples: int, rows_per_rank: int | None) -> None:
    # text documents of the mix have 32 tokens or more: shorter rows would hold none (and the draw never ends)
    for flag, value, least in (("--ranks", ranks, 1), ("--row-tokens", row_tokens, 64), ("--samples", samples, 1),
                               ("--rows-per-rank", rows_per_rank, 1)):
        if value is not None and value < least:
            raise BenchUsageError(f"{flag} must be at least {least}, got {value}")


def check_capacity(mix: list[SampleCost], ranks: int, row_tokens: int, samples: int, rows_per_rank: int | None) -> None:
    """The mix fits ``rows_per_rank`` rows on every rank (the balancer's first refusal, in the flags' words)."""
    tokens = sum(s.llm_tokens for s in mix)
    if rows_per_rank is not None and tokens > ranks * rows_per_rank * row_tokens:
        least = -(-tokens // (ranks * row_tokens))
        raise BenchUsageError(f"--samples {samples} hold {tokens} tokens, more than --ranks {ranks} x --rows-per-rank "
                              f"{rows_per_rank} x --row-tokens {row_tokens} = {ranks * rows_per_rank * row_tokens}; "
                              f"raise --rows-per-rank to {least} or more, or lower --samples")


def run_bench(ranks: int, row_tokens: int, samples: int = 1024, seed: int = 0, rows_per_rank: int | None = None,
              model: CostModel | None = None, repeats: int = 5) -> dict:
    """Naive and balanced reports on the synthetic mix; scheduler_ms is the median of ``repeats`` runs.
    Arguments it cannot run with raise BenchUsageError before any assignment is timed."""
    check_arguments(ranks, row_tokens, samples, rows_per_rank)
    mix = synthetic_mix(samples, row_tokens, seed)
    check_capacity(mix, ranks, row_tokens, samples, rows_per_rank)
    model = model or CostModel.from_flops("keye-8b")
    out = {"ranks": ranks, "row_tokens": row_tokens, "seed": seed, "mix": mix_summary(mix),
           "cost_model": {"a": model.a, "b": model.b, "c": model.c, "d": model.d, "units": model.units}}
    for name, fn, kwargs in (("naive", naive_assign, {}), ("balanced", assign, {"rows_per_rank": rows_per_rank})):
        try:
            runs = [fn(mix, ranks, row_tokens, model=model, **kwargs) for _ in range(repeats)]
        except ValueError as err:
            if name != "balanced" or rows_per_rank is None:
                raise
            tokens = sum(s.llm_tokens for s in mix)
            raise BenchUsageError(f"--rows-per-rank {rows_per_rank} is too few for --samples {samples} ({tokens} "
                                  f"tokens) on --ranks {ranks}: the rows of --row-tokens {row_tokens} have room for "
                                  "the tokens but the samples do not pack into them; raise --rows-per-rank or lower "
                                  "--samples") from err
        report = imbalance_report(runs[-1])
        report["scheduler_ms"] = round(statistics.median(r.scheduler_ms for r in runs), 3)
        out[name] = report
    return out


def format_report(report: dict) -> str:
    lines = [f"{report['ranks']} ranks, rows of {report['row_tokens']} tokens, {report['mix']['tokens']} tokens "
             f"in {sum(report['mix']['samples'].values())} samples, token shares {report['mix']['token_share']}"]
    for name in ("naive", "balanced"):
        r = report[name]
        phases = "  ".join(f"{p} {r[p]['max_over_mean']:.3f}/{r[p]['ratio_to_lower_bound']:.3f}"
                           for p in ("vit", "llm", "combined"))
        lines.append(f"  {name:<9} max/mean / max/lower-bound: {phases}  rows/rank {r['rows_per_rank']}  "
                     f"{r['scheduler_ms']:.2f} ms")
    return "\n".join(lines)
