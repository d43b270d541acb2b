"""Greedy decoding of packed prompts, for evaluation with exact-match answers.

No KV cache: evaluation answers are a few tokens, so each step re-runs the LLM over the
packed prompts (one varlen forward for all unfinished prompts), while the ViT runs once.
Each new text token takes the position after the document's current maximum, as
``compute_position_ids`` gives text after a visual block.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from keyetron.batch import Document, PackedBatch
from keyetron.model.keye import KeyeVLModel


class _Prompts(NamedTuple):
    """What the decoder layers read of a batch: 3D positions and document boundaries."""

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor


@torch.no_grad()
def greedy_generate(model: KeyeVLModel, prompts: Sequence[Document], max_new_tokens: int,
                    stop_ids: Sequence[int], device: torch.device | str = "cpu") -> list[list[int]]:
    """Generated ids of each prompt, ending with the stop id when one was produced."""
    if not prompts:
        return []
    batch = PackedBatch.from_documents(list(prompts)).to(device)
    embeds = list(model.embed(batch).split([len(d) for d in prompts]))
    positions = [d.position_ids.to(device) for d in prompts]
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        lengths = torch.tensor([embeds[i].shape[0] for i in active])
        cu = torch.zeros(len(active) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        layout = _Prompts(torch.cat([positions[i] for i in active], dim=1), cu.to(device))
        hidden = model.llm(torch.cat([embeds[i] for i in active]), layout)
        next_ids = model.llm.lm_head(hidden[cu[1:].long().to(device) - 1]).argmax(-1)
        new_embeds = model.llm.embed_tokens(next_ids)
        still = []
        for j, i in enumerate(active):
            token = int(next_ids[j])
            out[i].append(token)
            if token in stops:
                continue
            still.append(i)
            embeds[i] = torch.cat([embeds[i], new_embeds[j:j + 1]])
            nxt = positions[i].max() + 1
            positions[i] = torch.cat([positions[i], nxt.view(1, 1).expand(3, 1)], dim=1)
        active = still
    return out


__all__ = ["greedy_generate"]
