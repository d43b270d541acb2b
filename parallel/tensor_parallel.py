"""Megatron-style tensor parallelism of the Qwen3 LLM, applied from outside with DTensor.

Only the LLM is sharded; the ViT and projector stay data-parallel. Per decoder layer:
q/k/v/gate/up are column-parallel (each rank owns whole attention heads and a slice of
the MLP), o/down are row-parallel, so a layer costs one all-reduce (or, with sequence
parallelism, one all-gather + one reduce-scatter) per sub-block. ``embed_tokens`` and
``lm_head`` are split on the vocabulary dimension.

Between modules the residual stream is a plain tensor in THD layout (no batch dim):

- sequence parallel on: this rank's contiguous 1/tp of the row's tokens, ``(T/tp, H)``;
  the norms run on that shard, attention and MLP all-gather the full ``(T, H)`` on entry
  and reduce-scatter on exit. RoPE and ``cu_seqlens`` describe the full row, because
  attention always runs on all tokens (with 1/tp of the heads). The embedding gives every
  rank the full row (the model places the visual features into it), the first decoder
  layer takes the rank's shard (Megatron's scatter for multimodal inputs), and the final
  norm's output is gathered again, so the model's output holds every token on every rank.
- sequence parallel off: the full ``(T, H)`` on every rank.

The output head is vocabulary-parallel (``VocabParallelHead``): ``token_logprobs`` fuses
each rank's slice of the projection with the softmax reduced over the slices
(``linear_token_logprobs``), so neither full-vocabulary nor whole-row logits exist.

KV heads: with ``num_kv_heads % tp == 0`` they are split like the query heads. With
``tp % num_kv_heads == 0`` (e.g. Qwen3-8B's 8 KV heads at TP16) each rank needs one KV head
that other ranks need too, see ``KVHeadProjection``.

Replicated weights (norms, q/k norms, replicated KV projections) that each rank applies
to only its tokens or heads get a ``Partial`` DTensor gradient: the true gradient is the
sum over the TP ranks. DTensor sums it whenever the value is read (``full_tensor``,
AdamW, ``clip_grad_norm_``); code that reads ``grad.to_local()`` must first call
``reduce_tp_partial_grads``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from keyetron.model.config import TextConfig
from keyetron.model.linear_cross_entropy import linear_token_logprobs
from keyetron.model.llm import Qwen3LM
from keyetron.parallel.mixed_precision import grad_of, set_grad


def kv_heads_replicated(cfg: TextConfig, tp: int) -> bool:
    """Whether TP degree ``tp`` splits the KV heads (False) or replicates them (True); raises if the heads do not fit."""
    if cfg.num_heads % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide num_heads {cfg.num_heads}")
    if cfg.num_kv_heads % tp == 0:
        return False
    if tp % cfg.num_kv_heads == 0:
        return True
    raise ValueError(f"tensor parallel degree {tp} and num_kv_heads {cfg.num_kv_heads}: one must divide the "
                     "other (split KV heads, or replicate each over tp/num_kv_heads ranks)")


class ReplicatedParams(ParallelStyle):
    """Parameters replicated on every TP rank (norm scales), applied to the rank's local input.

    ``input_layout`` says what the local input is: ``Shard(0)`` a token shard (sequence
    parallel), ``Shard(1)`` the rank's heads (q/k norms), ``Replicate()`` the whole thing.
    A weight applied to a shard gets a ``Partial`` gradient, summed over TP when read.
    (``SequenceParallel`` does this for ``Shard`` inputs; ``Replicate`` is needed so that
    every LLM parameter is a DTensor on the TP mesh with or without sequence parallelism.)
    """

    def __init__(self, input_layout, *, use_local_output: bool = True):
        super().__init__()
        self.input_layout, self.use_local_output = input_layout, use_local_output

    def _replicate(self, name, module, mesh):
        for p_name, p in list(module.named_parameters(recurse=False)):
            dp = distribute_tensor(p.detach(), mesh, [Replicate()], src_data_rank=self.src_data_rank)
            module.register_parameter(p_name, nn.Parameter(dp, requires_grad=p.requires_grad))

    def _input(self, module, inputs, mesh):
        x = inputs[0]
        assert not isinstance(x, DTensor), "ReplicatedParams expects the local tensor of this rank"
        return (DTensor.from_local(x, mesh, [self.input_layout], run_check=False), *inputs[1:])

    def _output(self, module, output, mesh):
        return output.to_local() if self.use_local_output else output

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        return distribute_module(module, mesh, self._replicate, self._input, self._output)


class KVHeadProjection(nn.Module):
    """k_proj / v_proj when TP ranks outnumber KV heads: project onto this rank's one KV head.

    The weight stays whole and ``Replicate`` (the checkpoint layout, same parameter name):
    the ranks sharing a KV head must hold the same values, and a replicated DTensor is the
    one layout that the optimizer, clipping and checkpointing treat correctly with no help.
    Each rank multiplies by only its head's rows (no wasted FLOPs). Its local weight
    gradient is non-zero only in those rows and only carries its own query heads'
    contribution, so it is declared ``Partial``: the sum over all TP ranks is exactly the
    sum over the ranks that share each head. The input gradient is ``Partial`` too, like a
    column-parallel layer's, and is reduced by the all-gather's backward (or the all-reduce
    at the attention entry without sequence parallelism).
    Cost: the full KV weights (and their optimizer state) on every TP rank.
    """

    def __init__(self, linear: nn.Linear, mesh, head: int, head_dim: int):
        super().__init__()
        assert linear.bias is None, "Qwen3 k/v projections have no bias"
        self.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Replicate()]),
                                   requires_grad=linear.weight.requires_grad)
        self.rows = slice(head * head_dim, (head + 1) * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):  # Replicate (T, H) from the attention entry
            x = x.to_local(grad_placements=[Partial()])
        w = self.weight.to_local(grad_placements=[Partial()])[self.rows]
        return F.linear(x, w)  # (T, head_dim)

    def extra_repr(self) -> str:
        return f"rows={self.rows.start}:{self.rows.stop} of {self.weight.shape[0]}"


class VocabParallelEmbedding(nn.Module):
    """embed_tokens split on the vocabulary (Megatron's): each rank looks up the ids in its
    rows and zeros the rest; the partial sums are reduce-scattered (sequence parallel) or
    all-reduced. torch's ``RowwiseParallel`` on ``nn.Embedding`` computes the same forward,
    but its backward (DTensor's embedding-backward rule, torch 2.13) builds the full
    (V, H) gradient on every rank; here a rank's gradient is its own (V/tp, H) shard.
    """

    def __init__(self, embedding: nn.Embedding, mesh, output_layout):
        super().__init__()
        assert embedding.padding_idx is None and embedding.max_norm is None, "plain embedding expected"
        self.weight = nn.Parameter(distribute_tensor(embedding.weight.detach(), mesh, [Shard(0)]),
                                   requires_grad=embedding.weight.requires_grad)
        self.mesh, self.output_layout = mesh, output_layout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight.to_local()  # (V/tp, H)
        ids = input_ids - self.mesh.get_local_rank() * w.shape[0]
        outside = (ids < 0) | (ids >= w.shape[0])
        partial = F.embedding(ids.masked_fill(outside, 0), w).masked_fill(outside.unsqueeze(-1), 0)
        out = DTensor.from_local(partial, self.mesh, [Partial()], run_check=False)
        return out.redistribute(self.mesh, [self.output_layout]).to_local()  # (T, H) or (T/tp, H)


def apply_tensor_parallel(llm: Qwen3LM, tp_mesh, *, sequence_parallel: bool = True) -> None:
    """Shard ``llm`` in place over the 1-D ``tp_mesh`` (``topo.submesh("tp")``); the parts a
    pipeline stage does not hold (None) are skipped.

    Every rank must build the same model first (same seed or checkpoint); replicated and
    sharded parameters are taken from TP rank 0. Every rank passes the full row (token ids,
    positions, cu_seqlens); under sequence parallelism its length must be a multiple of tp
    (the caller pads, with IGNORE_INDEX targets). ``llm.lm_head`` becomes a
    ``VocabParallelHead``.
    """
    cfg, tp = llm.cfg, tp_mesh.size()
    replicate_kv = kv_heads_replicated(cfg, tp)
    if cfg.vocab_size % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide vocab_size {cfg.vocab_size} "
                         "(the embedding and head are split on the vocabulary)")
    seq = Shard(0) if sequence_parallel else Replicate()

    if llm.embed_tokens is not None:
        llm.embed_tokens = VocabParallelEmbedding(llm.embed_tokens, tp_mesh, Replicate())
    if llm.norm is not None:
        parallelize_module(llm.norm, tp_mesh, ReplicatedParams(seq))
        if sequence_parallel:
            llm.norm.register_forward_hook(_gather_tokens(tp_mesh))
    if llm.lm_head is not None:
        tied = cfg.tie_word_embeddings and llm.embed_tokens is not None
        llm.lm_head = VocabParallelHead(llm.lm_head, tp_mesh, llm.embed_tokens.weight if tied else None)

    layer_plan = {
        "input_layernorm": ReplicatedParams(seq),
        # x arrives as this rank's tokens (or all of them) and leaves as all tokens; RoPE and the batch pass through.
        "self_attn": PrepareModuleInput(input_layouts=(seq, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "self_attn.q_proj": ColwiseParallel(),
        # Per-head norms over the rank's heads. A replicated KV head counts as the rank's shard of
        # the (T, tp, head_dim) "KV head per rank" tensor: its gradient is again summed over TP.
        "self_attn.q_norm": ReplicatedParams(Shard(1)),
        "self_attn.k_norm": ReplicatedParams(Shard(1)),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
        "post_attention_layernorm": ReplicatedParams(seq),
        "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=seq),
    }
    if not replicate_kv:
        layer_plan["self_attn.k_proj"] = ColwiseParallel()
        layer_plan["self_attn.v_proj"] = ColwiseParallel()
    # Query heads [r*H/tp, (r+1)*H/tp) read KV head r // (tp/num_kv_heads) when KV is replicated.
    kv_head = tp_mesh.get_local_rank() // max(tp // cfg.num_kv_heads, 1)
    for index in llm.layers.indices():
        layer = llm.layers[index]
        parallelize_module(layer, tp_mesh, layer_plan)
        if replicate_kv:
            attn = layer.self_attn
            attn.k_proj = KVHeadProjection(attn.k_proj, tp_mesh, kv_head, cfg.head_dim)
            attn.v_proj = KVHeadProjection(attn.v_proj, tp_mesh, kv_head, cfg.head_dim)
        if sequence_parallel:
            # The first layer takes the full embeddings and keeps this rank's shard; later layers check it.
            layer.register_forward_pre_hook(_scatter_tokens(tp_mesh) if index == 0 else _check_token_shard(tp))


def _shard_error(tp: int, got: int, row: int) -> ValueError:
    return ValueError(
        f"sequence parallel over {tp} ranks: this rank's hidden states have {got} tokens but the row's "
        f"positions have {row}; pad the packed row to a multiple of {tp} tokens (IGNORE_INDEX targets) "
        "and pass every rank the full row")


def _check_token_shard(tp: int):
    def check(layer, args):
        x, cos = args[0], args[1]
        if x.shape[0] * tp != cos.shape[0]:
            raise _shard_error(tp, x.shape[0], cos.shape[0])
    return check


def _scatter_tokens(mesh):
    """Pre-hook of the first decoder layer: the full (T, H) embeddings -> this rank's (T/tp, H)
    shard; backward all-gathers the shards' gradients."""
    tp = mesh.size()

    def scatter(layer, args):
        x, cos = args[0], args[1]
        if x.shape[0] % tp or x.shape[0] != cos.shape[0]:
            raise _shard_error(tp, -(-x.shape[0] // tp), cos.shape[0])
        shard = DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)]).to_local()
        return (shard, *args[1:])
    return scatter


def _gather_tokens(mesh):
    """Forward hook of the final norm: this rank's (T/tp, H) shard -> the full (T, H) on every rank."""
    def gather(norm, args, out):
        return DTensor.from_local(out, mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    return gather


class VocabParallelHead(nn.Module):
    """The output head split on the vocabulary over the TP mesh (``OutputHead``'s interface).

    Its input is the same on every TP rank (the model's output holds every token there);
    ``logits`` are this rank's vocabulary slice ``(N, V/tp)``, and the input gradient is
    summed over the ranks (each slice contributes its part). Tied to the embedding, it
    shares the embedding's vocabulary-split weight.
    """

    def __init__(self, head: nn.Linear, mesh, tied_weight: torch.Tensor | None = None):
        super().__init__()
        assert head.bias is None, "the Qwen3 head has no bias"
        if tied_weight is not None:
            self.weight = tied_weight
        else:
            self.weight = nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]),
                                       requires_grad=head.weight.requires_grad)
        self.mesh = mesh

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) -> this rank's logits (N, V/tp); with ``targets`` (N,), log p(targets) over
        the whole vocabulary (N,) instead, without the logits (``linear_token_logprobs``).
        Both go through ``forward`` so that module hooks (FSDP2 gathers the weight in one) run."""
        # Identity forward; backward sums the partial input gradients of the vocabulary slices once.
        x = DTensor.from_local(hidden, self.mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        w = self.weight.to_local()  # (V/tp, H)
        if targets is None:
            return F.linear(x, w)
        return linear_token_logprobs(x, w, targets, group=self.mesh.get_group(),
                                     vocab_start=self.mesh.get_local_rank() * w.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V/tp): this rank's vocabulary slice."""
        return self(hidden)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) over the whole vocabulary, (N,) in at least fp32, the same on every TP rank."""
        return self(hidden, targets)


@torch.no_grad()
def reduce_tp_partial_grads(module: nn.Module) -> None:
    """Turn every ``Partial`` DTensor gradient into its parameter's placement (one all-reduce each).

    Call after the step's last backward when code reads local gradients (gradient
    reduction over dp, global norm, ZeRO); DTensor-aware readers do not need it, but
    AdamW would otherwise all-reduce the same gradient several times per step.
    """
    for p in module.parameters():
        g = grad_of(p)
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            set_grad(p, g.redistribute(placements=p.placements))


__all__ = ["KVHeadProjection", "ReplicatedParams", "VocabParallelEmbedding", "VocabParallelHead",
           "apply_tensor_parallel", "kv_heads_replicated", "reduce_tp_partial_grads"]
