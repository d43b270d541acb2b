"""2x2 patch merge then LayerNorm(4D) -> Linear -> GELU -> Linear (Keye-VL-1.5's ``mlp_AR``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.model.config import KeyeConfig


def merge_patches(features: torch.Tensor, grid_thw: torch.Tensor, m: int) -> torch.Tensor:
    """(N, D) raster-ordered patch features -> (N / m^2, m^2 * D).

    Merged token (i, j) of a frame concatenates patches (m*i + a, m*j + b) for a, b in
    raster order, and merged tokens are themselves in raster order, frame after frame.
    """
    d = features.shape[-1]
    out = []
    for chunk, (t, h, w) in zip(features.split(grid_thw.prod(dim=1).tolist()), grid_thw.tolist()):
        x = chunk.view(t, h // m, m, w // m, m, d).transpose(2, 3)
        out.append(x.reshape(-1, m * m * d))
    return torch.cat(out)


class Projector(nn.Module):
    def __init__(self, cfg: KeyeConfig):
        super().__init__()
        self.merge_size = cfg.projector.merge_size
        merged = cfg.vision.hidden_size * self.merge_size**2
        self.pre_norm = nn.LayerNorm(merged, eps=cfg.projector.norm_eps)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, cfg.text.hidden_size)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(merge_patches(features, grid_thw, self.merge_size))
        return self.linear_2(F.gelu(self.linear_1(x)))
