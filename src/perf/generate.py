"""``keyetron bench generate``: the rollout engine against the cache-less greedy loop.

Both decode the same prompts greedily for the same number of new tokens (no stop id, so every
sequence runs to the end) with the same randomly initialised model: tokens/s and peak tensor
memory. A short fp64 run checks that both give the same tokens (in fp32 the two attention paths
round differently, and the random model's near-tied logits let greedy decoding part). Prompts:
synthetic token sequences, every other one with an image (real token layout, random pixels).
"""
from __future__ import annotations

import time

import torch

from keyetron.batch import Document
from keyetron.model import build_model, load_model_config
from keyetron.model.generate import greedy_generate
from keyetron.perf.live_memory import LiveTensors
from keyetron.positions import compute_position_ids, llm_grids
from keyetron.rollout import SamplingParams, generate


def synthetic_prompts(cfg, n: int, text_tokens: int, seed: int = 0) -> list[Document]:
    gen = torch.Generator().manual_seed(seed)
    m, p = cfg.projector.merge_size, cfg.vision.patch_size
    docs = []
    for i in range(n):
        ids = torch.randint(0, 1000, (text_tokens,), generator=gen).tolist()
        grid = None
        if i % 2:
            h, w = 8, 8  # 64 patches, 16 LLM tokens
            ids = ids[:4] + [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // m**2) + \
                [cfg.vision_end_token_id] + ids[4:]
            grid = torch.tensor([[1, h, w]])
        input_ids = torch.tensor(ids)
        blocks = llm_grids(grid, m) if grid is not None else []
        pos = compute_position_ids(input_ids, blocks, (cfg.image_token_id, cfg.video_token_id))
        pixels = torch.randn(64, cfg.vision.num_channels, p, p, generator=gen) if grid is not None else None
        docs.append(Document(input_ids, torch.full_like(input_ids, -100), pos, pixels, grid, f"prompt-{i}"))
    return docs


def _measure(fn, memory: bool):
    """(result, seconds, peak bytes of the tensors it created): timed without instrumentation, then
    run again under ``LiveTensors`` for the memory when asked."""
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = None
    if memory:
        with LiveTensors() as live:
            fn()
        peak = live.peak
    return out, seconds, peak


def _fp64_check(config: str, seed: int, prompts: int = 8, new_tokens: int = 32) -> bool:
    """In fp64 the engine's greedy tokens equal the cache-less loop's (a short run)."""
    cfg = load_model_config(config)
    model = build_model(cfg, dtype=torch.float64, seed=seed).eval()
    docs = synthetic_prompts(cfg, prompts, 16, seed)
    for d in docs:
        d.pixel_values = d.pixel_values.double() if d.pixel_values is not None else None
    results, _ = generate(model, docs, SamplingParams(temperature=0, max_new_tokens=new_tokens), stop_ids=[])
    return [r[0].token_ids for r in results] == greedy_generate(model, docs, new_tokens, stop_ids=[])


def run_bench(config: str = "small", prompts: int = 64, new_tokens: int = 256, prompt_tokens: int = 48,
              batch_size: int = 64, reference: bool = True, memory: bool = True, seed: int = 0) -> dict:
    cfg = load_model_config(config)
    model = build_model(cfg, seed=seed).eval()
    docs = synthetic_prompts(cfg, prompts, prompt_tokens, seed)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)

    def engine():
        out = []
        for s in range(0, len(docs), batch_size):
            results, _ = generate(model, docs[s:s + batch_size], params, stop_ids=[])
            out += [r[0].token_ids for r in results]
        return out

    def cacheless():
        out = []
        for s in range(0, len(docs), batch_size):
            out += greedy_generate(model, docs[s:s + batch_size], new_tokens, stop_ids=[])
        return out

    tokens, seconds, peak = _measure(engine, memory)
    total = sum(len(t) for t in tokens)
    report = {"config": config, "prompts": prompts, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
              "batch_size": batch_size, "threads": torch.get_num_threads(),
              "engine": {"seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 2),
                         "peak_tensor_bytes": peak}}
    if reference:
        ref_tokens, ref_seconds, ref_peak = _measure(cacheless, memory)
        report["cacheless_greedy"] = {"seconds": round(ref_seconds, 3), "tokens_per_s": round(total / ref_seconds, 2),
                                      "peak_tensor_bytes": ref_peak}
        report["speedup"] = round(ref_seconds / seconds, 2)
        # fp32: the cached and the recomputed attention round differently, so where the random
        # model's top two logits nearly tie greedy decoding can part; count how far they agree.
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, ref_tokens)]
        report["fp32_identical_sequences"] = sum(a == len(t) for a, t in zip(agree, tokens))
        report["fp32_mean_agreeing_prefix"] = round(sum(agree) / len(agree), 1)
    report["fp64_same_tokens"] = _fp64_check(config, seed)
    return report


__all__ = ["run_bench", "synthetic_prompts"]
