"""log p(target) straight from hidden states and the output weight, never holding the logits whole.

The (N, V) logits of a long row are the largest tensor of a training step (32K tokens x
151,936 classes is 20 GB in fp32, again for their gradient). ``linear_token_logprobs``
fuses the output projection with the log-softmax: the forward walks the tokens in chunks,
keeps only each row's log-sum-exp and target logit (N,), and the backward recomputes each
chunk's logits to form its gradient. Beyond the gradients themselves, the peak is a few
tensors of one chunk's logits (``CHUNK_LOGITS`` elements), at the cost of one more
``hidden @ weight.T`` in the backward. Rows that fit in one chunk (a short row, or the answer
tokens of a packed SFT row) keep that chunk's softmax from the forward instead: no recompute.

With ``group`` the weight is this rank's slice of a vocabulary split over ``group``
(Megatron's vocabulary-parallel cross-entropy): each rank reduces its slice to a local
log-sum-exp and target logit per row, and two all-reduces of (N,) vectors (the max, then the
sum of exponentials with the target logit) give the log-probability over the whole
vocabulary, the same on every rank. The backward needs no communication; the gradient of
``hidden`` it returns is this rank's part, and the caller sums it over the group once.

Precision: logits are a matmul in the inputs' dtype, the softmax statistics and the result
are in at least fp32, and the weight gradient is accumulated over the chunks in at least
fp32 and cast to the weight's dtype once at the end.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Logit elements per chunk: 2**26 is 256 MB in fp32, 441 tokens at a 151,936-token vocabulary.
CHUNK_LOGITS = 2**26


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _LinearTokenLogProb(torch.autograd.Function):
    """Saves the inputs and (N,) statistics; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, group, vocab_start):
        n, v_local = hidden.shape[0], weight.shape[0]
        stat = _stat_dtype(hidden.dtype)
        local = targets - vocab_start
        mine = (local >= 0) & (local < v_local)  # the targets in this rank's vocabulary slice
        local = local.clamp(0, v_local - 1)
        lse = torch.empty(n, dtype=stat, device=hidden.device)
        target_logit = torch.empty(n, dtype=stat, device=hidden.device)
        # Rows that fit in one chunk keep that chunk's exponentials for the backward, which then
        # skips recomputing the logits (a quarter of the head's FLOPs); the peak is unchanged.
        keep = n <= chunk_tokens and any(ctx.needs_input_grad[:2])
        kept = None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            z = (hidden[rows] @ weight.T).to(stat)  # (c, V_local)
            target_logit[rows] = z.gather(1, local[rows, None]).squeeze(1)
            top = z.max(dim=1).values
            lse[rows] = top + z.sub_(top[:, None]).exp_().sum(dim=1).log()
            if keep:
                kept = (z, top)  # exp(z - top)
            del z  # before the next chunk's logits exist
        target_logit.masked_fill_(~mine, 0)
        if group is not None:
            top = lse.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([(lse - top).exp(), target_logit])
            dist.all_reduce(sums, group=group)
            lse, target_logit = top + sums[0].log(), sums[1]
        # softmax over the whole vocabulary = exp(z - top) * exp(top - lse)
        ctx.probs = kept[0].mul_((kept[1] - lse).exp()[:, None]) if kept is not None else None
        ctx.save_for_backward(hidden, weight, local, mine, lse)
        ctx.chunk_tokens = chunk_tokens
        # The backward's matmuls run under the forward's autocast state (what torch.amp.custom_bwd does).
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad):
        device, autocast, autocast_dtype = ctx.autocast
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            return _LinearTokenLogProb._backward(ctx, grad, autocast_dtype if autocast else None)

    @staticmethod
    def _backward(ctx, grad, autocast_dtype):
        hidden, weight, local, mine, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # fp32 (fp64 for fp64 weights) across chunks: a bf16 sum would drop small contributions.
        grad_weight = None
        grad = grad.to(lse.dtype)
        probs, ctx.probs = ctx.probs, None  # the forward's softmax of a single chunk, used once
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            h = hidden[rows]
            g = grad[rows]
            # The chunk's softmax, turned in place into d(z_t - lse)/dz = onehot(t) - softmax(z)
            # times the upstream gradient of each row.
            if probs is not None:
                dz, probs = probs, None
            else:
                dz = (h @ weight.T).to(lse.dtype).sub_(lse[rows, None]).exp_()
            dz.mul_(-g[:, None])
            dz.scatter_add_(1, local[rows, None], (g * mine[rows])[:, None])
            dz = dz.to(autocast_dtype or hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = dz @ weight
            if need_weight:
                if grad_weight is None:
                    grad_weight = (dz.T @ h).to(lse.dtype)
                elif grad_weight.dtype == dz.dtype == h.dtype:
                    grad_weight.addmm_(dz.T, h)  # in place: no (V, H) temporary
                else:  # a low-precision product, summed in fp32
                    grad_weight += dz.T @ h
            del dz  # before the next chunk's logits exist
        if need_weight:
            if grad_weight is None:  # no rows
                grad_weight = torch.zeros_like(weight)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_tokens: int | None = None, group: dist.ProcessGroup | None = None,
                          vocab_start: int = 0) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[i, targets[i]] for every row, without the (N, V) logits.

    ``hidden`` (N, H), ``weight`` (V_local, H), ``targets`` (N,) vocabulary ids (callers drop
    ignored tokens first) -> (N,) in the inputs' dtype, at least fp32. ``chunk_tokens``: rows
    per chunk, by default as many as make ``CHUNK_LOGITS`` logits. With ``group``, ``weight``
    holds vocabulary ids ``[vocab_start, vocab_start + V_local)`` of a vocabulary split over
    ``group``, every rank passes the same ``hidden`` and ``targets`` and gets the same result,
    and the gradient of ``hidden`` is this rank's part, to be summed over the group.
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], (hidden.shape, weight.shape)
    assert targets.shape == hidden.shape[:1], (targets.shape, hidden.shape)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS // max(weight.shape[0], 1))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of rows, got {chunk_tokens}")
    return _LinearTokenLogProb.apply(hidden, weight, targets, chunk_tokens, group, vocab_start)


__all__ = ["CHUNK_LOGITS", "linear_token_logprobs"]
