"""Sampling many responses per multimodal prompt with a KV cache, log-probs included.

``generate(model, prompts, params, samples=G)``:

1. **Prefill** — the prompts are packed into one batch and run through the model's own
   forward path (``model.embed``: every image and video through the ViT once per prompt;
   ``model.llm``: document-masked attention, sectioned 3D RoPE). A recording attention core
   (the ``Attention.core`` seam) writes each layer's keys and values into a static cache
   (``KVCache``: one ``(slots, max_len, kv_heads, head_dim)`` buffer per layer) and the prompt's
   rows are copied to its G sample slots: the G samples share one ViT pass and one prefill.
2. **Decode** — one token per still-active sequence per step: a decode core appends the new
   keys and values at each sequence's length and attends over its cached prefix. A new text
   token takes the position after its document's largest (``compute_position_ids``'s rule for
   text after a visual block), so the training forward over prompt + response sees exactly the
   positions generation used (``rollout_document``).
3. **Choose** — per sequence, greedy or temperature / top-k / top-p sampling from its own
   generator (``keyetron.rollout.sampling``), and the log-probability (and entropy) of the
   chosen token under the model's distribution (temperature 1): what a training forward
   computes for the same token, to 1e-6 in fp64 (tests/rollout/test_engine.py).

A sequence stops at one of its ``stop_ids`` (kept, with its log-prob) or after
``max_new_tokens``. Nothing survives a call: the cache and the vision features are built per
call from the weights as they are, so a rollout after an optimizer step never sees the
previous policy.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from keyetron.batch import IGNORE_INDEX, Document, PackedBatch
from keyetron.model.keye import KeyeVLModel
from keyetron.rollout.sampling import SamplingParams, choose, sequence_seed


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model (temperature 1)
    entropies: list[float] = field(default_factory=list)  # entropy of the model's next-token distribution
    stopped: bool = False  # ended with a stop id (else: max_new_tokens)


@dataclass
class RolloutStats:
    prompts: int
    sequences: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float


class KVCache:
    """Keys and values of every layer for ``slots`` sequences of up to ``max_len`` tokens."""

    def __init__(self, layers: Sequence[int], slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, max_len, kv_heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len

    def copy_slot(self, src: int, dst: torch.Tensor) -> None:
        """Give the slots ``dst`` the cached prefix of slot ``src``."""
        n = int(self.lengths[src])
        for cache in (*self.k.values(), *self.v.values()):
            cache[dst, :n] = cache[src, :n]
        self.lengths[dst] = n


def _prefill_core(cache: KVCache, layer: int, inner, slots: list[int]):
    """The training attention core, recording each document's keys and values into its slot."""

    def core(q, k, v, batch, kernel):
        bounds = batch.cu_seqlens.tolist()
        for slot, start, end in zip(slots, bounds[:-1], bounds[1:]):
            cache.k[layer][slot, :end - start] = k[start:end]
            cache.v[layer][slot, :end - start] = v[start:end]
        return inner(q, k, v, batch, kernel)

    return core


def _decode_core(cache: KVCache, layer: int):
    """One new token per sequence (``batch.slots``): append its key and value, attend over the prefix."""

    def core(q, k, v, batch, kernel):
        slots, at = batch.slots, batch.at
        cache.k[layer][slots, at] = k
        cache.v[layer][slots, at] = v
        span = int(at.max()) + 1
        keys = cache.k[layer][slots, :span].transpose(1, 2)  # (n, Hkv, L, D)
        values = cache.v[layer][slots, :span].transpose(1, 2)
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        visible = torch.arange(span, device=q.device)[None, :] <= at[:, None]  # (n, L)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=visible[:, None, None, :])
        return out.squeeze(2)  # (n, Hq, D)

    return core


@contextlib.contextmanager
def _attention_cores(model: KeyeVLModel, make):
    """Install ``make(layer_index, previous_core)`` on every decoder layer; restore on exit."""
    layers = {i: model.llm.layers[i] for i in model.llm.layers.indices()}
    saved = {i: layer.self_attn.core for i, layer in layers.items()}
    try:
        for i, layer in layers.items():
            layer.self_attn.core = make(i, saved[i])
        yield
    finally:
        for i, layer in layers.items():
            layer.self_attn.core = saved[i]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def generate(model: KeyeVLModel, prompts: Sequence[Document], params: SamplingParams, *,
             stop_ids: Sequence[int], samples: int = 1, seed: int = 0,
             prompt_keys: Sequence[str] | None = None, with_entropy: bool = False,
             device: torch.device | str | None = None,
             progress=None) -> tuple[list[list[Rollout]], RolloutStats]:
    """``samples`` responses to each prompt: ``result[p][j]`` is sample j of prompt p.

    ``prompt_keys`` (default: each document's ``sample_id``, else its index) name the prompts in
    the per-sequence seeds, so a response is the same whatever else is in the batch.
    ``progress(new_tokens)`` is called after every decode step."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not prompts:
        return [], RolloutStats(0, 0, 0, 0, 0.0, 0.0)
    if model.llm is None or model.llm.embed_tokens is None or model.llm.lm_head is None:
        raise ValueError("generation needs the whole model (embedding, decoder layers and head) in this process")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    keys = list(prompt_keys) if prompt_keys is not None else [d.sample_id or str(i) for i, d in enumerate(prompts)]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} prompt keys for {len(prompts)} prompts")
    llm = model.llm
    dtype = llm.embed_tokens.weight.dtype
    stat = _stat_dtype(dtype)
    n_prompts, n_seq = len(prompts), len(prompts) * samples
    lengths = [len(d) for d in prompts]
    attn = llm.layers[llm.layers.indices()[0]].self_attn
    kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim  # local heads (tensor parallel shards them)
    cache = KVCache(llm.layers.indices(), n_seq, max(lengths) + params.max_new_tokens, kv_heads, attn.head_dim,
                    dtype, device)
    stops = set(int(s) for s in stop_ids)

    # -- prefill: the training forward over the packed prompts, recording keys and values
    t0 = time.perf_counter()
    batch = PackedBatch.from_documents(list(prompts)).to(device)
    first_slots = [p * samples for p in range(n_prompts)]
    with _attention_cores(model, lambda i, inner: _prefill_core(cache, i, inner, first_slots)):
        hidden = llm(model.embed(batch), batch)
    ends = batch.cu_seqlens[1:].long() - 1
    logits = llm.lm_head.logits(hidden[ends]).to(stat)  # (n_prompts, V)
    cache.lengths[first_slots] = torch.tensor(lengths, device=device)
    for slot in first_slots if samples > 1 else ():
        cache.copy_slot(slot, torch.arange(slot + 1, slot + samples, device=device))
    next_pos = torch.stack([d.position_ids.max() + 1 for d in prompts]).to(device).repeat_interleave(samples)
    logits = logits.repeat_interleave(samples, dim=0)  # (n_seq, V)
    prefill_s = time.perf_counter() - t0

    # -- decode
    t0 = time.perf_counter()
    gens = []
    for p in range(n_prompts):
        for j in range(samples):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(sequence_seed(seed, keys[p], j))
            gens.append(gen)
    results = [[Rollout(p, j) for j in range(samples)] for p in range(n_prompts)]
    active = list(range(n_seq))
    new_tokens = 0
    for step_index in range(params.max_new_tokens):
        lse = torch.logsumexp(logits, dim=-1)  # log p(t) = z_t - lse: no (n, V) log-softmax needed
        if params.greedy:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = torch.tensor([choose(logits[row], params, gens[s]) for row, s in enumerate(active)],
                                  device=logits.device)
        chosen_logp = (logits.gather(1, chosen[:, None]).squeeze(1) - lse).tolist()
        entropy = None
        if with_entropy:
            logp = logits - lse[:, None]
            entropy = (-(logp.exp() * logp).sum(-1)).tolist()
        still, tokens = [], []
        for row, (s, token) in enumerate(zip(active, chosen.tolist())):
            r = results[s // samples][s % samples]
            r.token_ids.append(token)
            r.logprobs.append(chosen_logp[row])
            if with_entropy:
                r.entropies.append(entropy[row])
            if token in stops:
                r.stopped = True
            else:
                still.append(s)
                tokens.append(token)
        new_tokens += len(active)
        if progress is not None:
            progress(new_tokens)
        if not still or step_index + 1 == params.max_new_tokens:
            break
        slots = torch.tensor(still, dtype=torch.long, device=device)
        at = cache.lengths[slots]
        step = SimpleNamespace(position_ids=next_pos[slots].view(1, -1).expand(3, -1), cu_seqlens=None,
                               slots=slots, at=at)
        with _attention_cores(model, lambda i, inner: _decode_core(cache, i)):
            hidden = llm(llm.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=device)), step)
        cache.lengths[slots] += 1
        next_pos[slots] += 1
        logits = llm.lm_head.logits(hidden).to(stat)
        active = still
    decode_s = time.perf_counter() - t0
    stats = RolloutStats(n_prompts, n_seq, sum(lengths), new_tokens, prefill_s, decode_s)
    return results, stats


def rollout_document(prompt: Document, response: Sequence[int], sample_id: str | None = None) -> Document:
    """The training document of prompt + response: the prompt's tokens, pixels and 3D positions,
    then the response's tokens at the positions generation gave them, with targets on exactly
    the response tokens (what RL and rejection-sampling SFT train on)."""
    ids = torch.tensor(list(response), dtype=torch.long)
    n = ids.numel()
    start = prompt.position_ids.max() + 1
    positions = torch.cat([prompt.position_ids, (start + torch.arange(n)).view(1, -1).expand(3, -1)], dim=1)
    input_ids = torch.cat([prompt.input_ids, ids])
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    if n:
        targets[len(prompt) - 1:len(prompt) - 1 + n] = ids
    return Document(input_ids, targets, positions, prompt.pixel_values, prompt.vision_grid_thw,
                    sample_id if sample_id is not None else prompt.sample_id)


__all__ = ["KVCache", "Rollout", "RolloutStats", "generate", "rollout_document"]
