"""The ViT as pure data parallelism beside a tensor/context-parallel LLM.

The ranks of one stage-0 TP x CP group share a micro-batch (a packed row). Rather than
each of them encoding every image of the row, the images and video frames are divided
among the group by cost (greedy, largest first, to the least-loaded rank; the cost of an
item of p patches is ``p + p^2 / ATTENTION_PATCHES``, linear layers plus attention), each
rank encodes its share, and the features are all-gathered so every rank can embed the
whole row. Nothing is encoded twice.

Backward: each rank's gradient for the gathered features covers only what its part of the
LLM used (its context-parallel slice of tokens), so the gradients are summed over the
ranks that used different tokens and each rank keeps the slice of the items it encoded.
Tensor-parallel ranks of one context slice embed the same tokens and hold identical full
gradients for them (sequence parallelism splits the tokens only after the embedding), so
they are not summed again: the sum runs over ``grad_group``, the context-parallel group.

``SharedVisionEncoder`` is what ``parallelize_keye`` installs as the model's
``vision_encoder``: it encodes a ``LocalRow``'s items this way and returns the features of
the visual tokens in the rank's slice.

Under topology-aware loading (``keyetron.parallel.loading``) the rank that decoded a
document's media already holds its pixels and nobody else does, so the row says who
encodes what (``owners``) instead of this module choosing by cost.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from keyetron.model.keye import KeyeVLModel
from keyetron.backend.collectives import all_gather_tensor
from keyetron.parallel.local_rows import LocalRow

ATTENTION_PATCHES = 4096  # p at which attention costs as much as the linear layers (order of magnitude)


def assign_items(patches: list[int], n_ranks: int) -> list[list[int]]:
    """Item indices per rank, balancing ``p + p^2/ATTENTION_PATCHES`` (LPT greedy)."""
    loads = [0.0] * n_ranks
    owned: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        owned[r].append(i)
        loads[r] += patches[i] + patches[i] ** 2 / ATTENTION_PATCHES
    return [sorted(o) for o in owned]


class _GatherFeatures(torch.autograd.Function):
    """All-gather variable-sized feature blocks; backward sums over ``grad_group`` and keeps the own block."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int, group, grad_group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.grad_group = sizes, rank, grad_group
        width = max(sizes)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[:local.shape[0]] = local
        out = local.new_empty((len(sizes) * width, *local.shape[1:]))
        all_gather_tensor(out, padded.contiguous(), group=group)
        blocks = [out[r * width:r * width + n] for r, n in enumerate(sizes)]
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if ctx.grad_group is not None:
            dist.all_reduce(grad, group=ctx.grad_group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None, None


def _feature_dtype(model: KeyeVLModel, device: torch.device) -> torch.dtype:
    """The dtype the projector's output has here (an empty block must match the others)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.projector.parameters()).dtype


def encode_vision_shared(model: KeyeVLModel, pixel_values: torch.Tensor | None, grid_thw: torch.Tensor, group,
                         grad_group, owners: torch.Tensor | None = None) -> torch.Tensor:
    """Merged visual features of every item (in item order), each item encoded on one rank of ``group``.

    ``owners`` (items,): the group rank holding each item's pixels; ``pixel_values`` then
    holds only this rank's items, in item order. Without it every rank holds all pixels and
    the items are shared out by cost (``assign_items``).
    """
    if group is None or dist.get_world_size(group) == 1:
        return model.encode_vision(pixel_values, grid_thw)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    patches = grid_thw.prod(dim=1).tolist()
    if owners is None:
        owned = assign_items(patches, world)
    else:
        owned = [[] for _ in range(world)]
        for i, r in enumerate(owners.tolist()):
            owned[r].append(i)
    starts = [0]
    for p in patches:
        starts.append(starts[-1] + p)
    merge = model.cfg.projector.merge_size ** 2
    order = [i for r in range(world) for i in owned[r]]  # items in gathered (rank-major) order
    sizes = [sum(patches[i] for i in owned[r]) // merge for r in range(world)]
    mine = owned[rank]
    if mine:
        if owners is None:
            local_pixels = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in mine])
        else:
            local_pixels = pixel_values
            assert local_pixels is not None and local_pixels.shape[0] == sum(patches[i] for i in mine), (
                "this rank owns items without holding their pixels")
        local = model.encode_vision(local_pixels, grid_thw[mine])
    else:  # fewer items than ranks: still join the collective, with an empty block
        # requires_grad: the backward must run here too, or the others wait in its all-reduce.
        local = torch.zeros((0, model.cfg.text.hidden_size), dtype=_feature_dtype(model, grid_thw.device),
                            device=grid_thw.device, requires_grad=torch.is_grad_enabled())
    gathered = _GatherFeatures.apply(local, sizes, rank, group, grad_group)
    # back to item order
    token_starts, offset = {}, 0
    for i in order:
        token_starts[i] = offset
        offset += patches[i] // merge
    return torch.cat([gathered[token_starts[i]:token_starts[i] + patches[i] // merge] for i in range(len(patches))])


class SharedVisionEncoder:
    """The model's ``vision_encoder`` when a rank group shares rows: each item encoded once in
    ``group`` (by its owner, or shared out by cost), features gathered, and the features of the
    visual tokens of this rank's slice returned in token order."""

    def __init__(self, group, grad_group):
        self.group, self.grad_group = group, grad_group

    def __call__(self, model: KeyeVLModel, batch: LocalRow) -> torch.Tensor:
        if not isinstance(batch, LocalRow):
            raise TypeError(f"a model whose ViT is shared over ranks takes each rank's slice of a row (LocalRow, "
                            f"from keyetron.parallel.local_rows.RowSlicer), got {type(batch).__name__}")
        pixels = batch.pixel_values
        if pixels is not None:
            pixels = pixels.to(next(model.projector.parameters()).dtype)
        features = encode_vision_shared(model, pixels, batch.vision_grid_thw, self.group, self.grad_group,
                                        owners=batch.vision_owner)
        return features if batch.visual_features is None else features[batch.visual_features.to(features.device)]


__all__ = ["SharedVisionEncoder", "assign_items", "encode_vision_shared"]
