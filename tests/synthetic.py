"""Synthetic documents for model tests: random pixels, real token layout (no tokenizer needed)."""
from __future__ import annotations

import torch

from keyetron.batch import Document
from keyetron.model.config import KeyeConfig
from keyetron.positions import compute_position_ids, llm_grids

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


def accumulate_gradients(model, rows, device="cpu", autocast_dtype=None, objective=None) -> float:
    """The single-process definition of a step's gradient: backward over ``rows`` one at a time,
    each row's summed loss divided by the step's count of the objective's units (default: the
    language-model objective, whose units are loss tokens); returns the summed loss."""
    from keyetron.backend.device import autocast
    from keyetron.objectives import LanguageModelObjective

    objective = objective or LanguageModelObjective()
    count = max(sum(objective.count(r) for r in rows), 1)
    total = 0.0
    for row in rows:
        with autocast(device, autocast_dtype):
            row = row.to(device)
            loss = objective(model(row), row)
        (loss.loss_sum / count).backward()
        total += float(loss.loss_sum.detach())
    return total


def lm_loss(model, batch):
    """The language-model objective on the model's output for ``batch``: summed loss and token count."""
    from keyetron.objectives import LanguageModelObjective

    return LanguageModelObjective()(model(batch), batch)
