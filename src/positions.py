"""3D (t, h, w) position ids for the LLM ("rope index").

Rules (Keye-VL-1.5, Qwen2-VL style sectioned RoPE):
- a text token gets (p, p, p), p increasing by one;
- an image, and each video frame separately, with merged grid (gh, gw): the token at
  (i, j) gets (s, s + i, s + j) where s = previous max position + 1;
- text after a visual block starts at the block's max + 1.
Absolute time reaches the model only through timestamp text, so the t axis is constant
inside a frame.
"""
from __future__ import annotations

import torch


def llm_grids(vision_grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int]]:
    """Merged (gh, gw) of every visual block in order: an image is one block, each frame of a video one block."""
    blocks = []
    for t, h, w in vision_grid_thw.tolist():
        if h % merge_size or w % merge_size:
            raise ValueError(f"vision grid {(t, h, w)} is not divisible by the merge size {merge_size}")
        blocks.extend([(h // merge_size, w // merge_size)] * t)
    return blocks


def compute_position_ids(
    input_ids: torch.Tensor,
    blocks: list[tuple[int, int]],
    visual_token_ids: tuple[int, ...],
    start: int = 0,
) -> torch.Tensor:
    """Position ids (3, T) for one document whose visual pad tokens are filled block by block.

    ``blocks`` lists the merged (gh, gw) of each visual block in order of appearance; the
    pad tokens (any id in ``visual_token_ids``) are consumed gh*gw at a time.
    """
    ids = input_ids.tolist()
    is_visual = [tok in visual_token_ids for tok in ids]
    n_visual = sum(is_visual)
    expected = sum(gh * gw for gh, gw in blocks)
    if n_visual != expected:
        raise ValueError(
            f"document has {n_visual} visual pad tokens but its grids need {expected} "
            f"({len(blocks)} blocks); the token stream and the visual inputs disagree"
        )
    out = torch.empty(3, len(ids), dtype=torch.long)
    nxt = start  # the next free position (previous max + 1)
    t = 0
    block = 0
    while t < len(ids):
        if not is_visual[t]:
            run = t
            while run < len(ids) and not is_visual[run]:
                run += 1
            out[:, t:run] = torch.arange(nxt, nxt + run - t)
            nxt += run - t
            t = run
            continue
        gh, gw = blocks[block]
        n = gh * gw
        if not all(is_visual[t:t + n]):
            raise ValueError(f"visual block {block} ({gh}x{gw}) at token {t} is interrupted by text")
        out[0, t:t + n] = nxt
        out[1, t:t + n] = nxt + torch.arange(gh).repeat_interleave(gw)
        out[2, t:t + n] = nxt + torch.arange(gw).repeat(gh)
        nxt += max(gh, gw)
        t += n
        block += 1
    return out
