"""Qwen3 decoder over packed documents, with sectioned 3D RoPE.

Parameter names follow the Hugging Face Qwen3 layout (``embed_tokens``, ``layers.N.*``,
``norm``, ``lm_head``). Attention modules infer their local head count from the weight
shapes, so tensor-parallel sharding applied from outside needs no change here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.backend.attention import varlen_attention
from keyetron.model.checkpointing import CheckpointableBlock
from keyetron.model.config import TextConfig
from keyetron.model.rope import apply_rotary, sectioned_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in at least fp32 (as Qwen3's reference), scale in the input dtype.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens) -> torch.Tensor:
        """``cu_seqlens``: document boundaries of the packed tokens, or an object with
        ``attend(q, k, v, kernel=...)`` (THD tensors in, THD out) when attention needs more
        than boundaries, as context parallelism does."""
        T = x.shape[0]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(T, -1, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(T, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        if isinstance(cu_seqlens, torch.Tensor):
            o = varlen_attention(q, k, v, cu_seqlens, causal=True, kernel=self.kernel)
        else:  # a packing plan that knows how to attend, e.g. context-parallel (keyetron.parallel)
            o = cu_seqlens.attend(q, k, v, kernel=self.kernel)
        return self.o_proj(o.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(CheckpointableBlock):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def block_forward(self, x, cos, sin, cu_seqlens):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3LM(nn.Module):
    """Embedding, decoder layers, final norm and the (untied) head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, theta: float | None = None):
        """cos, sin (T, head_dim) for 3D positions; ``theta`` overrides the config's base."""
        cfg = self.cfg
        return sectioned_rope(position_ids, cfg.head_dim, theta or cfg.rope_theta, cfg.mrope_section, dtype)

    def decode(self, hidden: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Embeddings (T, H) -> final-normed hidden states (T, H)."""
        cos, sin = self.rope(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, cu_seqlens)
        return self.norm(hidden)
