"""SigLIP's attention-pooling (MAP) head, applied to every image of a packed ViT output.

transformers' ``SiglipMultiheadAttentionPoolingHead`` pools a (B, N, D) batch of
equal-size images: a learned probe attends over the patches (``nn.MultiheadAttention``),
then ``x + MLP(LayerNorm(x))``. Our ViT returns the patches of many native-resolution
images concatenated on one axis, so here the probe is one query per image and the
attention runs over that image's patches only (varlen attention, the ViT's kernels).
Parameter names are the checkpoint's (``vision_model.head.*``); the math is the same,
so a single image gives transformers' result. ``PaddleOCRVisionModel`` (Keye's released
ViT) carries no head, and Keye's checkpoint ships an unused one: stage 0 needs its own.
"""
from __future__ import annotations

import torch
from torch import nn

from keyetron.backend.attention import varlen_attention
from keyetron.model.config import VisionConfig
from keyetron.model.siglip_text import SiglipMLP


class PoolingAttention(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (packed in-projection), under its names."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.kernel = "auto"

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """queries (n_items, D), one per item; keys (N, D) packed; cu_seqlens (n_items + 1,) item bounds."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        n, d = queries.shape
        q = nn.functional.linear(queries, wq, bq).view(n, self.num_heads, -1)
        k = nn.functional.linear(keys, wk, bk).view(keys.shape[0], self.num_heads, -1)
        v = nn.functional.linear(keys, wv, bv).view(keys.shape[0], self.num_heads, -1)
        cu_q = torch.arange(n + 1, dtype=torch.int32, device=queries.device)
        o = varlen_attention(q, k, v, cu_q, cu_seqlens_k=cu_seqlens, causal=False, kernel=self.kernel)
        return self.out_proj(o.reshape(n, d))


class AttentionPoolingHead(nn.Module):
    """(N, D) packed patch features + (n, 3) grids -> (n, D): one embedding per image / video.

    Every item of ``grid_thw`` (an image, or a whole video with its t frames) is pooled
    over all of its patches.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg.hidden_size, cfg.num_heads)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        per_item = grid_thw.prod(dim=1).to(device=features.device, dtype=torch.int32)
        cu = torch.zeros(per_item.numel() + 1, dtype=torch.int32, device=features.device)
        cu[1:] = per_item.cumsum(0)
        assert int(cu[-1]) == features.shape[0], (grid_thw.tolist(), features.shape)
        probe = self.probe.reshape(1, -1).expand(per_item.numel(), -1)
        x = self.attention(probe, features, cu)
        return x + self.mlp(self.layernorm(x))
