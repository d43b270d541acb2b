"""Rotary position embeddings: 2D for the ViT, sectioned 3D (t, h, w) for the LLM.

Both use the rotate-half convention: the angle vector of length head_dim/2 is duplicated
to head_dim, and ``x * cos + rotate_half(x) * sin`` rotates the pairs (i, i + head_dim/2).
Angles are computed in fp32 (fp64 when the model runs in fp64) and applied in that
precision, then cast back.
"""
from __future__ import annotations

import torch


def _angle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_frequencies(dim: int, theta: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2: the standard RoPE frequency ladder."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).to(dtype) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos, sin: (T, D), already in the angle precision."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.to(cos.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def vision_patch_coordinates(grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch in raster order, frame after frame, for packed grids (n, 3)."""
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h).repeat_interleave(w)
        c = torch.arange(w).repeat(h)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    return torch.cat(rows), torch.cat(cols)


def vision_rope(grid_thw: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_patches, head_dim) for the ViT's 2D RoPE.

    head_dim/4 frequencies (over a head_dim/2 ladder) rotate by the row index, the next
    head_dim/4 by the column index; the whole is duplicated for rotate-half.
    """
    adtype = _angle_dtype(dtype)
    rows, cols = vision_patch_coordinates(grid_thw)
    inv = inverse_frequencies(head_dim // 2, theta, adtype, device)
    fr = rows.to(device=device, dtype=adtype)[:, None] * inv
    fc = cols.to(device=device, dtype=adtype)[:, None] * inv
    angles = torch.cat([fr, fc], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def sectioned_rope(
    position_ids: torch.Tensor, head_dim: int, theta: float, section: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for 3D positions (3, T) (Qwen2-VL "sectioned" M-RoPE).

    Frequency pair f uses the temporal position for the first section[0] pairs, the height
    position for the next section[1] and the width position for the last section[2]. With
    equal axes (text) this is exactly 1D RoPE.
    """
    assert position_ids.dim() == 2 and position_ids.shape[0] == 3, position_ids.shape
    adtype = _angle_dtype(dtype)
    inv = inverse_frequencies(head_dim, theta, adtype, position_ids.device)  # (head_dim/2,)
    axis_of_pair = torch.repeat_interleave(torch.arange(3, device=position_ids.device), torch.tensor(section, device=position_ids.device))
    pos = position_ids.to(adtype)[axis_of_pair]  # (head_dim/2, T): each pair picks its axis
    angles = (pos * inv[:, None]).transpose(0, 1)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
