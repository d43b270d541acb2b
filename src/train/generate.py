"""``keyetron generate``: sampled responses to a JSONL file of prompts, with their log-probs (the
job; the engine is ``keyetron.rollout``).

Prompts are records of the sample format (``keyetron.data.samples``); a conversation may end
with the user's turn, and a final assistant turn is taken for a reference answer and left out.
Each output line: ``{"id", "sample", "response", "token_ids", "logprobs", "stopped",
"prompt_tokens"}``; a prompt that cannot be used (bad record, missing media) is skipped,
logged with its id and counted in the summary printed at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("keyetron.rollout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a keyetron step-N checkpoint, a `keyetron merge` output "
                   "or a Hugging Face folder")
    p.add_argument("--prompts", required=True, help="JSONL of prompts in the sample format")
    p.add_argument("--out", required=True, help="JSONL file for the responses")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="with the prompt id and sample index, fixes each response")
    p.add_argument("--batch-size", type=int, default=16, help="prompts prefilled and decoded together")
    p.add_argument("--config", default=None, help="model config when the checkpoint names none")
    p.add_argument("--image-max-tokens", type=int, default=None, help="cap on LLM tokens per image")
    p.add_argument("--video-total-tokens", type=int, default=None, help="Slow-Fast token budget per video")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_const", const="think",
                       help="ask every prompt to think (default: each record's own `think`, else no_think)")
    think.add_argument("--no-think", dest="think", action="store_const", const="no_think")


def load_model(checkpoint: str, config: str | None = None):
    """The model a checkpoint holds, in its architecture (``config`` when the checkpoint names none)."""
    from keyetron.config import ConfigError
    from keyetron.model import build_model, load_model_config
    from keyetron.train.merge import Checkpoint, init_from_checkpoint

    if not Path(checkpoint).exists():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist: give a keyetron step-N checkpoint, a "
                          "`keyetron merge` output or a Hugging Face folder")
    cfg = Checkpoint(checkpoint).model_config()
    if cfg is None:
        if config is None:
            raise ConfigError(f"--checkpoint {checkpoint} names no architecture (no config.json, model.yaml or "
                              "recipe.yaml); give --config")
        cfg = load_model_config(config)
    model = build_model(cfg)
    init_from_checkpoint(model, checkpoint, key="--checkpoint")
    return model.eval()


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0, self.last = total, 0, time.perf_counter(), 0.0

    def __call__(self, batch_tokens: int) -> None:
        now = time.perf_counter()
        if now - self.last > 0.5 and sys.stderr.isatty():
            rate = (self.done + batch_tokens) / max(now - self.t0, 1e-9)
            print(f"\rgenerate: {self.done + batch_tokens} tokens, {rate:.1f} tokens/s", end="", file=sys.stderr)
            self.last = now

    def finish_batch(self, tokens: int) -> None:
        self.done += tokens


def run(args: argparse.Namespace) -> int:
    from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset
    from keyetron.data.sources import open_source
    from keyetron.data.tokenizer import KeyeTokenizer
    from keyetron.rollout.engine import generate
    from keyetron.rollout.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    model = load_model(args.checkpoint, args.config)
    tok = KeyeTokenizer(model.cfg.tokenizer)
    media = {k: v for k, v in (("image_max_tokens", args.image_max_tokens),
                               ("video_total_tokens", args.video_total_tokens)) if v is not None}
    builder = DocumentBuilder(model.cfg, tok, MediaConfig(**media))
    dataset = SampleDataset(open_source(args.prompts), builder, prompts=True)
    items = [(i, d) for i in range(len(dataset)) if (d := dataset.prompt(i, args.think)) is not None]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress(len(items) * args.samples * args.max_new_tokens)
    totals = dict(prompts=0, responses=0, new_tokens=0, prefill_s=0.0, decode_s=0.0)
    t0 = time.perf_counter()
    with out.open("w") as f:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            docs = [d for _, d in chunk]
            results, stats = generate(model, docs, params, stop_ids=[tok.eos_id], samples=args.samples,
                                      seed=args.seed, progress=progress)
            progress.finish_batch(stats.new_tokens)
            for doc, per_prompt in zip(docs, results):
                for r in per_prompt:
                    text = tok.decode([t for t in r.token_ids if t != tok.eos_id])
                    f.write(json.dumps({"id": doc.sample_id, "sample": r.sample_index, "response": text,
                                        "token_ids": r.token_ids, "logprobs": r.logprobs, "stopped": r.stopped,
                                        "prompt_tokens": len(doc)}) + "\n")
            totals["prompts"] += stats.prompts
            totals["responses"] += stats.sequences
            totals["new_tokens"] += stats.new_tokens
            totals["prefill_s"] += stats.prefill_s
            totals["decode_s"] += stats.decode_s
    if sys.stderr.isatty():
        print(file=sys.stderr)
    elapsed = time.perf_counter() - t0
    summary = {**totals, "seconds": round(elapsed, 3), "tokens_per_s": round(totals["new_tokens"] / max(elapsed, 1e-9), 2),
               "skipped": dataset.skips.total, "skips": dict(dataset.skips.counts), "out": str(out)}
    if dataset.skips.total:
        print(dataset.skips.summary(), file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["add_arguments", "load_model", "run"]
