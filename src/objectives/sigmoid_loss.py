"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), on one process and across data-parallel ranks.

For n image-text pairs with L2-normalised embeddings, ``logits = exp(t) * img @ txt.T + b``
and every (image, text) cell is an independent binary problem: +1 on the diagonal
(matching pairs), -1 elsewhere. The loss is ``-sum(logsigmoid(label * logits)) / n``,
exactly transformers' ``SiglipModel(return_loss=True)``.

Across ranks every rank keeps its own images and all-gathers the texts (negatives
from every rank), so each cell of the union batch is computed on exactly one rank.
The gather's backward sums every rank's gradient into the owner's texts
(reduce-scatter), so after the usual data-parallel SUM of parameter gradients the step
is the union-batch gradient exactly. Ranks may hold different numbers of pairs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from keyetron.backend.collectives import all_gather_tensor, reduce_scatter_tensor


def sigmoid_loss_sum(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, positive_offset: int = 0) -> torch.Tensor:
    """Summed -logsigmoid over the (n_img, n_txt) grid; image i matches text ``positive_offset + i``.

    Embeddings are normalised here; ``logit_scale`` is the log temperature (``exp`` is applied).
    """
    img = F.normalize(img_emb, dim=-1)
    txt = F.normalize(txt_emb, dim=-1)
    logits = img @ txt.T * logit_scale.exp() + logit_bias
    n_img = img.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(n_img, device=logits.device)
    labels[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum()


def siglip_sigmoid_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor) -> torch.Tensor:
    """The mean loss over n pairs (row i of ``img_emb`` matches row i of ``txt_emb``)."""
    assert img_emb.shape[0] == txt_emb.shape[0], (img_emb.shape, txt_emb.shape)
    return sigmoid_loss_sum(img_emb, txt_emb, logit_scale, logit_bias) / img_emb.shape[0]


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts per rank; backward sums every rank's gradient to the owner."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        ctx.counts, ctx.group, ctx.rank = counts, group, dist.get_rank(group)
        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        out = local.new_empty((width * len(counts), *local.shape[1:]))
        all_gather_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * width: r * width + c] for r, c in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        counts, width = ctx.counts, max(ctx.counts)
        padded = grad.new_zeros((width * len(counts), *grad.shape[1:]))
        start = 0
        for r, c in enumerate(counts):
            padded[r * width: r * width + c] = grad[start:start + c]
            start += c
        mine = grad.new_empty((width, *grad.shape[1:]))
        reduce_scatter_tensor(mine, padded, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine[: counts[ctx.rank]], None, None


def gather_rows(local: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order (differentiable), and where this rank's rows start."""
    world = dist.get_world_size(group)
    counts_t = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    all_counts = [torch.zeros_like(counts_t) for _ in range(world)]
    dist.all_gather(all_counts, counts_t, group=group)
    counts = [int(c) for c in all_counts]
    offset = sum(counts[: dist.get_rank(group)])
    return _GatherRows.apply(local, counts, group), offset


def distributed_sigmoid_loss_sum(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                                 logit_bias: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's images against every rank's texts: the rank's share of the union-batch loss sum.

    Divide by the number of pairs of all ranks together (not this rank's) before backward,
    then SUM the parameter gradients over ``group``: the result is the single-process
    gradient of ``siglip_sigmoid_loss`` over the union batch. With no process group (or
    one rank) this is ``sigmoid_loss_sum`` over the local pairs.
    """
    assert img_emb.shape[0] == txt_emb.shape[0], (img_emb.shape, txt_emb.shape)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sigmoid_loss_sum(img_emb, txt_emb, logit_scale, logit_bias)
    all_txt, offset = gather_rows(txt_emb, group)
    return sigmoid_loss_sum(img_emb, all_txt, logit_scale, logit_bias, positive_offset=offset)
