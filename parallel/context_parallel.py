"""Context parallelism for packed rows (THD): zigzag-split long documents, all-gather K and V.

Llama 3's recipe, fitted to packed rows of many documents:

- Only a document too long for one rank (longer than ``split_threshold``, by default
  row_length // cp) is split: into 2*cp equal-ish chunks, rank i taking chunks i and
  2*cp-1-i. Causal work grows along a document, so pairing an early chunk with a late one
  gives every rank the same work. Short documents stay whole on one rank (splitting them
  would only add communication) and are placed largest first on the least-loaded rank.
- Attention all-gathers K and V (cheap with GQA: Qwen3-8B has 8 KV heads) and each rank
  attends its local queries to the keys they need, all segments in one varlen call.
  The gather's backward reduce-scatters dK and dV to the ranks that own those tokens.
  Everything else in the model is per token and needs no change, RoPE included: cos/sin
  come from each token's own position ids, which sharding keeps.
- Every rank is padded to the same ``local_len``: all-gathers need equal sizes, pipeline
  micro-batches need static shapes. Padding tokens form their own last segment that
  attends only to padding, and their targets are IGNORE_INDEX, so they reach neither a
  real token nor the loss.

The plan is pure bookkeeping, computed identically on every rank from ``cu_seqlens``;
``ContextParallelAttention`` does the communication for one row and rank, and
``apply_context_parallel`` installs ``context_parallel_attention`` as the attention core of
the LLM's attention modules: it attends through the ``attention`` of the batch it is given
(the rank's ``LocalRow``, built by ``keyetron.parallel.local_rows.RowSlicer``).

Vision: visual features land on pad tokens anywhere in the row. The row's items are
encoded once over the ranks that share it (``keyetron.parallel.vision``) and each rank
takes the features of the visual tokens in its slice; the selection is differentiable,
so each CP rank back-propagates the features its tokens used and the sum over CP ranks
is the full gradient.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from keyetron.backend.attention import varlen_attention
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.backend.collectives import all_gather_tensor as _all_gather
from keyetron.backend.collectives import reduce_scatter_tensor as _reduce_scatter

# Cost of one token's matmuls in units of one causal (query, key) pair, Qwen3-8B:
# 2 * 193M matmul params per layer / (4 * 32 heads * 128 dims) = ~24K. Short documents are
# therefore balanced by tokens, 100K-token ones by attention. Pass
# 2 * layer_params / (4 * num_heads * head_dim) for another model.
DEFAULT_LINEAR_WEIGHT = 24_000.0


class Segment(NamedTuple):
    """Local queries [query_start, query_end) attend causally to the global tokens
    [key_start, key_end): their document from its first token to the end of this chunk
    (bottom-right aligned, so the chunk's last query sees every key)."""

    query_start: int
    query_end: int
    key_start: int
    key_end: int


@dataclass(frozen=True)
class RankShard:
    """What one CP rank holds: global token indices in ascending order, and its segments."""

    token_index: torch.Tensor  # (n,) long
    segments: tuple[Segment, ...]  # real tokens only, in local order; padding is separate
    cost: float  # causal (query, key) pairs + linear_weight * tokens

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.numel())


def _causal_pairs(start: int, end: int) -> int:
    """(query, key) pairs of queries [start, end) of a document attending to their prefix."""
    return (end * (end + 1) - start * (start + 1)) // 2


def _chunk_edges(length: int, chunks: int) -> list[int]:
    sizes = [length // chunks + (1 if c < length % chunks else 0) for c in range(chunks)]
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    return edges


@dataclass(frozen=True)
class ContextParallelPlan:
    """Which tokens each CP rank holds and what each of its query segments attends to."""

    cp: int
    num_tokens: int  # of the full row
    local_len: int  # every rank's padded length
    shards: tuple[RankShard, ...]
    split_documents: tuple[int, ...]  # indices (into cu_seqlens) of the zigzag-split documents

    def padding(self, cp_rank: int) -> int:
        return self.local_len - self.shards[cp_rank].num_tokens

    @functools.cached_property
    def gathered_position(self) -> torch.Tensor:
        """(T,) where each global token sits in the rank-major concatenation of padded shards."""
        where = torch.empty(self.num_tokens, dtype=torch.long)
        for r, shard in enumerate(self.shards):
            where[shard.token_index] = r * self.local_len + torch.arange(shard.num_tokens)
        return where

    # -- moving tensors between the full row and the shards ----------------------------------
    def shard_tokens(self, x: torch.Tensor, cp_rank: int, dim: int = 0, pad_value=0) -> torch.Tensor:
        """This rank's tokens of ``x`` (token axis ``dim``), padded to ``local_len`` with ``pad_value``.
        Differentiable: use it on the full row's embeddings (visual features included)."""
        assert x.shape[dim] == self.num_tokens, (x.shape, dim, self.num_tokens)
        local = x.index_select(dim, self.shards[cp_rank].token_index.to(x.device))
        pad = self.padding(cp_rank)
        if pad:
            shape = list(local.shape)
            shape[dim] = pad
            local = torch.cat([local, local.new_full(shape, pad_value)], dim=dim)
        return local

    def shard_batch(self, batch: PackedBatch, cp_rank: int, pad_token_id: int = 0) -> PackedBatch:
        """This rank's text inputs: ids, positions, targets (IGNORE_INDEX on padding).

        ``cu_seqlens`` of the result marks the local query segments (padding last); it is
        NOT valid for plain attention when cp > 1: chunks of a split document need their
        prefix, so attention must go through ``ContextParallelAttention``. Visual inputs are
        dropped (``keyetron.parallel.local_rows.RowSlicer`` adds them).
        """
        bounds = [0] + [s.query_end for s in self.shards[cp_rank].segments]
        if self.padding(cp_rank):
            bounds.append(self.local_len)
        return PackedBatch(
            input_ids=self.shard_tokens(batch.input_ids, cp_rank, pad_value=pad_token_id),
            position_ids=self.shard_tokens(batch.position_ids, cp_rank, dim=1, pad_value=0),
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=batch.cu_seqlens.device),
            targets=self.shard_tokens(batch.targets, cp_rank, pad_value=IGNORE_INDEX),
            sample_ids=batch.sample_ids,
        )

    def unshard(self, parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Inverse of ``shard_tokens``: every rank's padded part (rank order) -> the full row."""
        assert len(parts) == self.cp, (len(parts), self.cp)
        gathered = torch.cat(parts, dim=dim)
        return gathered.index_select(dim, self.gathered_position.to(gathered.device))


def plan_context_parallel(
    cu_seqlens: torch.Tensor,
    cp: int,
    split_threshold: int | None = None,
    *,
    linear_weight: float = DEFAULT_LINEAR_WEIGHT,
    local_len: int | None = None,
    pad_multiple: int = 1,
) -> ContextParallelPlan:
    """Assign the documents of one packed row to ``cp`` ranks.

    ``split_threshold``: documents longer than this are zigzag-split (default row_length // cp).
    ``linear_weight``: a token's per-token work in causal-pair units (see DEFAULT_LINEAR_WEIGHT).
    ``local_len``: a fixed padded length for every rank (static shapes across micro-batches);
    short documents only go to ranks with room, and a row that cannot fit is an error.
    ``pad_multiple``: round ``local_len`` up to a multiple (e.g. tp, for sequence parallel).
    """
    if cp < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {cp}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    assert bounds and bounds[0] == 0 and all(a <= b for a, b in zip(bounds, bounds[1:])), bounds
    total = bounds[-1]
    threshold = max(total // cp, 1) if split_threshold is None else split_threshold
    if threshold < 1:
        raise ValueError(f"split_threshold must be >= 1, got {threshold}")

    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(cp)]  # (start, end, doc start), global
    load, tokens = [0.0] * cp, [0] * cp

    def place(rank: int, doc_start: int, a: int, b: int) -> None:  # offsets a..b within the document
        pieces[rank].append((doc_start + a, doc_start + b, doc_start))
        load[rank] += _causal_pairs(a, b) + linear_weight * (b - a)
        tokens[rank] += b - a

    split, whole = [], []

    def zigzag(d: int) -> None:
        start, end = bounds[d], bounds[d + 1]
        split.append(d)
        edges = _chunk_edges(end - start, 2 * cp)
        for r in range(cp):
            for c in (r, 2 * cp - 1 - r):
                if edges[c + 1] > edges[c]:
                    place(r, start, edges[c], edges[c + 1])

    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end - start > threshold and cp > 1:
            zigzag(d)
        elif end > start:
            whole.append(d)

    # Largest first to the least-loaded rank with room (LPT: within 4/3 of the best balance).
    def cost(d: int) -> float:
        n = bounds[d + 1] - bounds[d]
        return _causal_pairs(0, n) + linear_weight * n

    for d in sorted(whole, key=lambda d: (-cost(d), d)):
        n = bounds[d + 1] - bounds[d]
        room = [r for r in range(cp) if local_len is None or tokens[r] + n <= local_len]
        if not room and cp > 1 and n >= 2 * cp:  # a fixed local_len left no rank room: spread it instead
            zigzag(d)
            continue
        if not room:
            raise ValueError(f"context parallel: document {d} ({n} tokens) fits on no rank with local_len="
                             f"{local_len} (ranks hold {tokens}); raise local_len or lower split_threshold")
        place(min(room, key=lambda r: (load[r], r)), bounds[d], 0, n)

    needed = max(tokens)
    if local_len is None:
        local_len = needed
    elif needed > local_len:
        raise ValueError(f"context parallel: split documents need {needed} tokens on one rank, local_len is "
                         f"{local_len}; raise local_len (row of {total} tokens over cp={cp})")
    local_len = -(-max(local_len, 1) // pad_multiple) * pad_multiple

    shards = []
    for r in range(cp):
        segments, index, offset = [], [], 0
        for start, end, doc_start in sorted(pieces[r]):
            segments.append(Segment(offset, offset + end - start, doc_start, end))
            index.append(torch.arange(start, end))
            offset += end - start
        token_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        shards.append(RankShard(token_index, tuple(segments), load[r]))
    return ContextParallelPlan(cp, total, local_len, tuple(shards), tuple(sorted(split)))


class _AllGatherTokens(torch.autograd.Function):
    """All-gather along the token axis (rank-major); backward reduce-scatters (sums) the
    gradient so each rank receives the total gradient of the tokens it owns."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of equal-length shards: (n, ...) -> (world * n, ...)."""
    return _AllGatherTokens.apply(x, group)


class ContextParallelAttention:
    """Causal attention of this rank's queries over the whole row; one per row and rank.

    The rank's ``LocalRow`` carries it as ``attention``; the installed attention core calls
    ``attend`` in every layer. With ``group=None`` (cp=1) it is plain varlen attention over
    the plan's documents.
    """

    def __init__(self, plan: ContextParallelPlan, cp_rank: int, group=None):
        if group is None:
            assert plan.cp == 1, f"a plan for cp={plan.cp} needs its process group"
        else:
            assert dist.get_world_size(group) == plan.cp and dist.get_rank(group) == cp_rank, (
                plan.cp, cp_rank, dist.get_world_size(group), dist.get_rank(group))
        self.plan, self.cp_rank, self.group = plan, cp_rank, group
        shard, where, n = plan.shards[cp_rank], plan.gathered_position, plan.local_len
        q_bounds, k_bounds, keys = [0], [0], []
        for s in shard.segments:
            assert s.query_start == q_bounds[-1], (s, q_bounds)
            q_bounds.append(s.query_end)
            keys.append(where[s.key_start:s.key_end])
            k_bounds.append(k_bounds[-1] + s.key_end - s.key_start)
        if plan.padding(cp_rank):  # padding attends to this rank's own padding slots only
            keys.append(torch.arange(cp_rank * n + shard.num_tokens, (cp_rank + 1) * n))
            q_bounds.append(n)
            k_bounds.append(k_bounds[-1] + plan.padding(cp_rank))
        self.cu_seqlens_q = torch.tensor(q_bounds, dtype=torch.int32)
        self.cu_seqlens_k = torch.tensor(k_bounds, dtype=torch.int32)
        self.key_index = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)

    def _on(self, device: torch.device) -> None:
        if self.key_index.device != device:  # once per micro-batch, not per layer
            self.cu_seqlens_q, self.cu_seqlens_k, self.key_index = (
                t.to(device) for t in (self.cu_seqlens_q, self.cu_seqlens_k, self.key_index))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """q (local_len, Hq, D), k, v (local_len, Hkv, D), RoPE applied -> (local_len, Hq, D)."""
        assert q.shape[0] == k.shape[0] == self.plan.local_len, (q.shape, k.shape, self.plan.local_len)
        self._on(q.device)
        kv = torch.cat([k, v], dim=1)  # one collective for both
        if self.group is not None:
            kv = all_gather_tokens(kv, self.group)  # (cp * local_len, 2 * Hkv, D), rank-major
        k_all, v_all = kv.split(k.shape[1], dim=1)
        k_sel = k_all.index_select(0, self.key_index)  # each segment's document prefix, packed
        v_sel = v_all.index_select(0, self.key_index)
        return varlen_attention(q, k_sel, v_sel, self.cu_seqlens_q, causal=True,
                                cu_seqlens_k=self.cu_seqlens_k, kernel=kernel)

    def __repr__(self) -> str:
        return (f"ContextParallelAttention(rank {self.cp_rank}/{self.plan.cp}, local_len {self.plan.local_len}, "
                f"{len(self.cu_seqlens_q) - 1} segments, {self.key_index.numel()} keys)")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, kernel: str) -> torch.Tensor:
    """The attention core context parallelism installs (``Attention.core``): attend through the
    batch's ``ContextParallelAttention`` (a ``LocalRow``'s ``attention``)."""
    attention = getattr(batch, "attention", None)
    if attention is None:
        raise ValueError("context-parallel attention needs the rank's slice of a row (keyetron.parallel.local_rows."
                         "RowSlicer), which says where each query's keys are; got a batch without it")
    return attention.attend(q, k, v, kernel=kernel)


def apply_context_parallel(llm) -> None:
    """Make every attention module of ``llm`` attend over the whole row from its context-parallel slice."""
    for layer in llm.layers:
        layer.self_attn.core = context_parallel_attention


def gather_tokens(plan: ContextParallelPlan, x_local: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Every rank's shard of ``x`` back in full-row order, on every rank (evaluation, tests)."""
    if group is None:
        return plan.unshard([x_local], dim=dim)
    moved = x_local.movedim(dim, 0)
    gathered = all_gather_tokens(moved, group)
    return plan.unshard(list(gathered.chunk(plan.cp)), dim=0).movedim(0, dim)


__all__ = [
    "DEFAULT_LINEAR_WEIGHT",
    "ContextParallelAttention",
    "ContextParallelPlan",
    "RankShard",
    "Segment",
    "all_gather_tokens",
    "apply_context_parallel",
    "context_parallel_attention",
    "gather_tokens",
    "plan_context_parallel",
]
