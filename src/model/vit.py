"""SigLIP ViT at native resolution (Keye-VL-1.5's vision encoder).

Input is a pack of 14x14 patches ``(N, 3, 14, 14)`` from many images and video frames
plus their grids ``(n_items, 3) = (t, h, w)`` in patches. Every frame is its own
attention sequence; positions come from a learned ``side x side`` table bilinearly
resized to each grid, plus 2D RoPE on q and k in every layer. Parameter names follow
the Hugging Face layout (``embeddings``, ``layers`` ~ ``encoder.layers``, ``post_layernorm``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.backend.attention import varlen_attention
from keyetron.model.checkpointing import CheckpointableBlock
from keyetron.model.config import VisionConfig
from keyetron.model.rope import apply_rotary, vision_rope


@functools.lru_cache(maxsize=512)
def _bilinear_axis_weights(out_size: int, in_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix M with M @ x == F.interpolate(x, bilinear, align_corners=False) on one axis.

    Bilinear resizing is separable, so a resized table is ``Wh @ table @ Ww^T``; caching
    the small per-size matrices avoids recomputing taps for every image of a given size.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.to(torch.float64)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.position_table_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, cfg.hidden_size)

    def resized_positions(self, h: int, w: int) -> torch.Tensor:
        """The learned table resized to an (h, w) grid, flattened in raster order: (h*w, D)."""
        table = self.position_embedding.weight.view(self.side, self.side, -1)
        wh = _bilinear_axis_weights(h, self.side).to(table)
        ww = _bilinear_axis_weights(w, self.side).to(table)
        return torch.einsum("hi,ijd,wj->hwd", wh, table, ww).reshape(h * w, -1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        # A stride-p conv over one p x p patch is a matmul over the flattened patch.
        x = F.linear(pixel_values.to(weight.dtype).flatten(1), weight.flatten(1), self.patch_embedding.bias)
        per_size: dict[tuple[int, int], torch.Tensor] = {}
        positions = []
        for t, h, w in grid_thw.tolist():
            if (h, w) not in per_size:
                per_size[(h, w)] = self.resized_positions(h, w)
            positions.append(per_size[(h, w)].repeat(t, 1) if t > 1 else per_size[(h, w)])
        return x + torch.cat(positions).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(T, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(T, -1, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        o = varlen_attention(q, k, v, cu_seqlens, causal=False, kernel=self.kernel)
        return self.out_proj(o.reshape(T, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(CheckpointableBlock):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def block_forward(self, x, cu_seqlens, cos, sin):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.layer_norm2(x))


def frame_cu_seqlens(grid_thw: torch.Tensor, device) -> torch.Tensor:
    """Boundaries of every image and every video frame: each is its own attention sequence."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    cu = torch.zeros(per_frame.numel() + 1, dtype=torch.int32)
    cu[1:] = per_frame.cumsum(0)
    return cu.to(device)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, C, p, p) patches and (n, 3) grids -> (N, D) features in the same order."""
        x = self.embeddings(pixel_values, grid_thw)
        cos, sin = vision_rope(grid_thw.cpu(), self.cfg.head_dim, self.cfg.rope_theta, x.dtype, x.device)
        cu = frame_cu_seqlens(grid_thw.cpu(), x.device)
        for layer in self.layers:
            x = layer(x, cu, cos, sin)
        return self.post_layernorm(x)
