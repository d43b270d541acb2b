"""Synthetic documents for model tests: random pixels, real token layout (no tokenizer needed)."""
from __future__ import annotations

import torch

from keyetron.data.batch import Document
from keyetron.model.config import KeyeConfig
from keyetron.model.positions import compute_position_ids, llm_grids

FRAME, FAST_START, FAST_END = 151669, 151670, 151671  # appended Keye tokens (test-only ids)


def make_document(cfg: KeyeConfig, gen: torch.Generator, text: int = 6, images: tuple = (), video: tuple = (),
                  dtype=torch.float64, sample_id: str = "doc") -> Document:
    """Text, then each image (grid (h, w) in patches), then a video (frames of (h, w)), then text.

    Video frames each become their own block with `<|frame|>` and a fake timestamp token before
    them; a frame whose grid is smaller is wrapped in fast markers, as Slow-Fast does.
    """
    m = cfg.projector.merge_size
    p = cfg.vision.patch_size
    ids: list[int] = torch.randint(0, 1000, (text,), generator=gen).tolist()
    grids = []
    for h, w in images:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // m**2) + [cfg.vision_end_token_id]
        grids.append((1, h, w))
    if video:
        ids.append(cfg.vision_start_token_id)
        slow = max(h * w for h, w in video)
        for j, (h, w) in enumerate(video):
            fast = h * w < slow
            ids += [FRAME, 500 + j] + ([FAST_START] if fast else [])
            ids += [cfg.video_token_id] * (h * w // m**2) + ([FAST_END] if fast else [])
            grids.append((1, h, w))
        ids.append(cfg.vision_end_token_id)
    ids += torch.randint(0, 1000, (text,), generator=gen).tolist()
    input_ids = torch.tensor(ids)
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    blocks = llm_grids(grid, m) if grids else []
    pos = compute_position_ids(input_ids, blocks, (cfg.image_token_id, cfg.video_token_id))
    visual = torch.isin(input_ids, torch.tensor([cfg.image_token_id, cfg.video_token_id]))
    targets = Document.shift_targets(input_ids, ~visual)
    pixels = None
    if grids:
        n = int(grid.prod(dim=1).sum())
        pixels = torch.randn(n, cfg.vision.num_channels, p, p, generator=gen, dtype=torch.float64).to(dtype)
    return Document(input_ids, targets, pos, pixels, grid, sample_id)
