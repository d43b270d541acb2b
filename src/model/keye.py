"""Keye-VL-1.5: ViT -> projector -> scattered into the Qwen3 LLM's token embeddings.

The model is plain PyTorch and knows nothing about parallelism. Its forward is three
steps that pipeline stages can call separately: ``embed`` (token embeddings with the
visual features scattered into the pad positions), ``llm.decode`` and ``loss``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.backend.attention import KERNELS
from keyetron.data.batch import IGNORE_INDEX, PackedBatch
from keyetron.model.config import KeyeConfig
from keyetron.model.llm import Qwen3LM
from keyetron.model.projector import Projector
from keyetron.model.vit import VisionTransformer


@dataclass
class LossOutput:
    """Summed token cross-entropy and the number of tokens in the sum.

    Returning the sum (not the mean) lets any parallel layout divide by the global count
    of loss tokens of the step, so every layout computes the same number.
    """

    loss_sum: torch.Tensor  # scalar
    num_tokens: torch.Tensor  # scalar long


class KeyeVLModel(nn.Module):
    def __init__(self, cfg: KeyeConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg)
        self.llm = Qwen3LM(cfg.text)
        self.visual_token_ids = (cfg.image_token_id, cfg.video_token_id)

    # -- the three steps ---------------------------------------------------------------
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches -> one LLM-width embedding per merged 2x2 block, in token order."""
        return self.projector(self.vit(pixel_values, grid_thw), grid_thw)

    def embed(self, batch: PackedBatch, visual: torch.Tensor | None = None) -> torch.Tensor:
        """(T, H) token embeddings with visual features placed at the image/video pad tokens.

        ``visual``: features already encoded (e.g. shared out among data-parallel ViT
        replicas by keyetron.parallel.vision); by default the ViT runs here."""
        hidden = self.llm.embed_tokens(batch.input_ids)
        is_visual = torch.isin(batch.input_ids, torch.tensor(self.visual_token_ids, device=batch.input_ids.device))
        n_pads = int(is_visual.sum())
        if not batch.has_vision:
            if n_pads:
                raise ValueError(f"batch has {n_pads} image/video pad tokens but no pixel values")
            return hidden
        if visual is None:
            visual = self.encode_vision(batch.pixel_values.to(hidden.dtype), batch.vision_grid_thw)
        if visual.shape[0] != n_pads:
            raise ValueError(
                f"batch has {n_pads} image/video pad tokens but its visual inputs give {visual.shape[0]} "
                f"embeddings (grids {batch.vision_grid_thw.tolist()}); samples {list(batch.sample_ids)}"
            )
        positions = is_visual.nonzero(as_tuple=True)
        return hidden.index_put(positions, visual.to(hidden.dtype))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        """Summed cross-entropy over tokens with a target; the head runs only on those tokens."""
        keep = targets != IGNORE_INDEX
        logits = self.llm.lm_head(hidden[keep])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax over 152K classes needs fp32
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return LossOutput(loss_sum=loss_sum, num_tokens=keep.sum())

    # -- whole model ------------------------------------------------------------------
    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        return self.llm.decode(self.embed(batch), batch.position_ids, batch.cu_seqlens)

    def forward(self, batch: PackedBatch) -> LossOutput:
        return self.loss(self.hidden_states(batch), batch.targets)

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """(T, vocab) logits for every token (evaluation and parity checks)."""
        return self.llm.lm_head(self.hidden_states(batch))


def set_activation_checkpointing(model: nn.Module, vit: bool | list[int] = False, llm: bool | list[int] = False) -> None:
    """Recompute the chosen blocks in backward: True for all, or a list of block indices."""
    for layers, choice in ((model.vit.layers, vit), (model.llm.layers, llm)):
        chosen = set(range(len(layers))) if choice is True else set(choice or [])
        bad = chosen - set(range(len(layers)))
        if bad:
            raise ValueError(f"activation checkpointing: block indices {sorted(bad)} out of range 0..{len(layers) - 1}")
        for i, layer in enumerate(layers):
            layer.activation_checkpointing = i in chosen


def set_attention_kernel(model: nn.Module, kernel: str, vit_kernel: str | None = None) -> None:
    """Choose the attention kernel of every LLM (and ViT) attention module; see keyetron.backend.attention."""
    for name in (kernel, vit_kernel or kernel):
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {list(KERNELS)}")
    for layer in model.llm.layers:
        layer.self_attn.kernel = kernel
    for layer in model.vit.layers:
        layer.self_attn.kernel = vit_kernel or kernel


def parameter_counts(model: KeyeVLModel) -> dict[str, int]:
    """Parameters per part (shared tensors counted once)."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

    counts = {"vit": count(model.vit), "projector": count(model.projector), "llm": count(model.llm)}
    counts["total"] = count(model)
    return counts


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, seed: int | None = None) -> None:
    """Truncation-free normal(0, std) for matrices and embeddings, zeros for biases, ones for norm scales."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)  # LayerNorm / RMSNorm scales
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))


def build_model(cfg: KeyeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> KeyeVLModel:
    """Build and initialise a model; on the meta device nothing is allocated (for counting or later loading)."""
    with torch.device(device):
        model = KeyeVLModel(cfg)
    if torch.device(device).type != "meta":
        init_weights(model, seed=seed)
    return model.to(dtype)
