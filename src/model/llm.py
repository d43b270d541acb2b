"""Qwen3 decoder over packed documents, with sectioned 3D RoPE.

Parameter names follow the Hugging Face Qwen3 layout (``embed_tokens``, ``layers.N.*``,
``norm``, ``lm_head``). Attention modules infer their local head count from the weight
shapes, so tensor-parallel sharding applied from outside needs no change here.

Two seams let ``keyetron.parallel`` change how the same code runs without the model
knowing: ``Attention.core`` decides how queries find their keys (by default, within their
document of the batch's ``cu_seqlens``; context parallelism installs one that gathers
keys from the ranks sharing a row), and ``Qwen3LM.layers`` is a dictionary keyed by layer
index, so a pipeline stage simply holds fewer layers under the same names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.backend.attention import varlen_attention
from keyetron.model.checkpointing import CheckpointableBlock
from keyetron.model.config import TextConfig
from keyetron.model.linear_cross_entropy import linear_token_logprobs
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


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, kernel: str) -> torch.Tensor:
    """Causal attention of every token to the earlier tokens of its own document (``batch.cu_seqlens``)."""
    return varlen_attention(q, k, v, batch.cu_seqlens, causal=True, kernel=kernel)


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
        # core(q, k, v, batch, kernel) -> (T, Hq, D): THD tensors in and out, RoPE applied
        self.core = document_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch) -> torch.Tensor:
        T = x.shape[0]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(T, -1, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(T, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        o = self.core(q, k, v, batch, self.kernel)
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

    def block_forward(self, x, cos, sin, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLayers(nn.ModuleDict):
    """Decoder layers by index (names ``layers.<i>.*`` as in a ``ModuleList``), iterated in
    index order. A pipeline stage holds a contiguous range of them; deleting the others
    keeps every remaining parameter's name."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__({str(i): layer for i, layer in sorted(layers.items())})

    def __getitem__(self, index: int | str) -> nn.Module:
        return self._modules[str(index)]

    def __delitem__(self, index: int | str) -> None:
        del self._modules[str(index)]

    def __iter__(self):
        return iter(self._modules.values())

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class OutputHead(nn.Linear):
    """The output layer: logits, and the log-probabilities objectives need from them.

    ``token_logprobs`` fuses the projection with the log-softmax
    (``keyetron.model.linear_cross_entropy``): no more than one chunk's logits exist at a
    time, and the softmax runs in fp32. Tensor parallelism replaces this module with a
    vocabulary-parallel one of the same interface (``keyetron.parallel.tensor_parallel``)."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) -> (N, vocab) logits; with ``targets`` (N,), log p(targets) (N,) instead.

        Both go through ``forward`` so that module hooks (FSDP2 gathers the weight in one) run."""
        if targets is None:
            return super().forward(hidden)
        assert self.bias is None, "the fused log-probabilities take a head without bias"
        return linear_token_logprobs(hidden, self.weight, targets)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, vocab)."""
        return self(hidden)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[i] | hidden[i]) for every row: (N, H), (N,) -> (N,) in at least fp32."""
        return self(hidden, targets)


class Qwen3LM(nn.Module):
    """Embedding, decoder layers, final norm and the (untied) head.

    ``forward`` runs the decoder layers this module holds and, when it holds it, the final
    norm; the embedding and the head are applied by the caller (``KeyeVLModel``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = DecoderLayers({i: DecoderLayer(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = OutputHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, theta: float | None = None):
        """cos, sin (T, head_dim) for 3D positions; ``theta`` overrides the config's base."""
        cfg = self.cfg
        return sectioned_rope(position_ids, cfg.head_dim, theta or cfg.rope_theta, cfg.mrope_section, dtype)

    def forward(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """(T, H) embeddings (or a previous stage's activations) -> (T, H) hidden states,
        final-normed when this module holds the norm. ``batch`` gives the 3D positions and
        whatever the attention core needs (the document boundaries)."""
        cos, sin = self.rope(batch.position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, batch)
        return self.norm(hidden) if self.norm is not None else hidden
