"""Megatron-style tensor parallelism of the Qwen3 LLM, applied from outside with DTensor.

Only the LLM is sharded; the ViT and projector stay data-parallel. Per decoder layer:
q/k/v/gate/up are column-parallel (each rank owns whole attention heads and a slice of
the MLP), o/down are row-parallel, so a layer costs one all-reduce (or, with sequence
parallelism, one all-gather + one reduce-scatter) per sub-block. ``embed_tokens`` and
``lm_head`` are split on the vocabulary dimension; ``vocab_parallel_loss`` computes the
summed cross-entropy from the vocabulary shards without materialising full-vocab logits.

Between modules the residual stream is a plain tensor in THD layout (no batch dim):

- sequence parallel on: this rank's contiguous 1/tp of the row's tokens, ``(T/tp, H)``;
  the norms run on that shard, attention and MLP all-gather the full ``(T, H)`` on entry
  and reduce-scatter on exit. RoPE and ``cu_seqlens`` describe the full row, because
  attention always runs on all tokens (with 1/tp of the heads).
- sequence parallel off: the full ``(T, H)`` on every rank.

``llm.decode`` returns a DTensor (``Shard(0)`` or ``Replicate``) so the loss, and tests,
know which tokens they hold (``.full_tensor()`` gives the whole row).

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
import torch.distributed as dist
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

from keyetron.data.batch import IGNORE_INDEX
from keyetron.model.config import TextConfig
from keyetron.model.keye import LossOutput
from keyetron.model.llm import Qwen3LM


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
        return out.redistribute(self.mesh, [self.output_layout]).to_local()  # (T/tp or T, H)


def apply_tensor_parallel(llm: Qwen3LM, tp_mesh, *, sequence_parallel: bool = True) -> None:
    """Shard ``llm`` in place over the 1-D ``tp_mesh`` (``topo.submesh("tp")``).

    Every rank must build the same model first (same seed or checkpoint); replicated and
    sharded parameters are taken from TP rank 0. Under sequence parallelism the row length
    must be a multiple of tp (the caller pads, with IGNORE_INDEX targets), and every rank
    passes its token shard of the hidden states but the full row's positions, cu_seqlens
    and targets. The loss must be computed with ``vocab_parallel_loss``.
    """
    cfg, tp = llm.cfg, tp_mesh.size()
    replicate_kv = kv_heads_replicated(cfg, tp)
    if cfg.vocab_size % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide vocab_size {cfg.vocab_size} "
                         "(the embedding and head are split on the vocabulary)")
    seq = Shard(0) if sequence_parallel else Replicate()

    llm.embed_tokens = VocabParallelEmbedding(llm.embed_tokens, tp_mesh, seq)
    parallelize_module(llm, tp_mesh, {
        "norm": ReplicatedParams(seq, use_local_output=False),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=True),
    })
    if cfg.tie_word_embeddings:  # both are split on the vocabulary dim (Shard(0)): share one DTensor again
        llm.lm_head.weight = llm.embed_tokens.weight

    layer_plan = {
        "input_layernorm": ReplicatedParams(seq),
        # x arrives as this rank's tokens (or all of them) and leaves as all tokens; RoPE and cu_seqlens pass through.
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
    for layer in llm.layers:
        parallelize_module(layer, tp_mesh, layer_plan)
        if replicate_kv:
            attn = layer.self_attn
            attn.k_proj = KVHeadProjection(attn.k_proj, tp_mesh, kv_head, cfg.head_dim)
            attn.v_proj = KVHeadProjection(attn.v_proj, tp_mesh, kv_head, cfg.head_dim)
        if sequence_parallel:
            layer.register_forward_pre_hook(_check_token_shard(tp))


def _check_token_shard(tp: int):
    def check(layer, args):
        x, cos = args[0], args[1]
        if x.shape[0] * tp != cos.shape[0]:
            raise ValueError(
                f"sequence parallel over {tp} ranks: this rank's hidden states have {x.shape[0]} tokens but "
                f"the row's positions have {cos.shape[0]}; pad the packed row to a multiple of {tp} tokens "
                "(IGNORE_INDEX targets) and pass each rank its 1/tp token shard with the full row's positions")
    return check


@torch.no_grad()
def reduce_tp_partial_grads(module: nn.Module) -> None:
    """Turn every ``Partial`` DTensor gradient into its parameter's placement (one all-reduce each).

    Call after the step's last backward when code reads local gradients (gradient
    reduction over dp, global norm, ZeRO); DTensor-aware readers do not need it, but
    AdamW would otherwise all-reduce the same gradient several times per step.
    """
    for p in module.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=p.placements)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits split on the vocabulary over ``group`` (Megatron's recipe).

    Three all-reduces of (N,) vectors (max, then target logit and sum of exponentials)
    replace gathering (N, V) logits. The loss is the same on every TP rank, so each rank's
    logit shard receives its gradient (softmax - one_hot) once, with no communication.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        local = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        n, v_local = local.shape
        top = local.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (local - top[:, None]).exp()
        t = targets - vocab_start
        mine = (t >= 0) & (t < v_local)
        t = t.clamp(0, v_local - 1)
        sums = torch.stack([exp.sum(dim=-1), local.gather(1, t[:, None]).squeeze(1) * mine])
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums
        loss = (sum_exp.log() + top - target_logit).sum()
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), t, mine)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, t, mine = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        softmax[rows, t] -= mine.to(softmax.dtype)
        return (softmax * grad).to(ctx.in_dtype), None, None, None


def vocab_parallel_loss(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor) -> LossOutput:
    """Summed cross-entropy of the loss tokens with the vocabulary-split head (``KeyeVLModel.loss`` under TP).

    ``hidden`` is ``llm.decode``'s output (a DTensor: the rank's token shard under sequence
    parallelism, else all tokens); ``targets`` are the full row's ``(T,)``. Every TP rank
    gathers the whole row's hidden states (one all-gather of (T, H), tiny next to the
    head), keeps the tokens with a target, and computes (N, V/tp) logits for all of them,
    so the returned loss is the full row's on every TP rank: count it once, not per TP rank.
    """
    mesh = lm_head.weight.device_mesh
    full = hidden.redistribute(mesh, [Replicate()]).to_local() if isinstance(hidden, DTensor) else hidden
    if full.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden states cover {full.shape[0]} tokens, targets {targets.shape[0]}: pass the "
                         "full row's targets")
    keep = targets != IGNORE_INDEX
    logits = lm_head(full[keep])  # (N, V/tp): this rank's vocabulary slice
    vocab_start = mesh.get_local_rank() * logits.shape[-1]
    loss_sum = _VocabParallelCrossEntropy.apply(logits, targets[keep], vocab_start, mesh.get_group())
    return LossOutput(loss_sum=loss_sum, num_tokens=keep.sum())


__all__ = ["KVHeadProjection", "ReplicatedParams", "VocabParallelEmbedding", "apply_tensor_parallel", "kv_heads_replicated",
           "reduce_tp_partial_grads", "vocab_parallel_loss"]
