"""Keye-VL-1.5: ViT -> projector -> scattered into the Qwen3 LLM's token embeddings.

The model is plain PyTorch and knows nothing about parallelism. ``forward`` is its only
forward, under every layout: it embeds the batch (visual features placed at the image and
video pad tokens), runs the decoder layers and returns what training objectives need
(``ModelOutput``): the final hidden states of the tokens that carry a target and the head
to apply to them. Parallelism is installed from outside (``keyetron.parallel.parallelize_keye``):
tensor parallelism shards the modules, context parallelism swaps the attention core, the ViT
is shared over a rank group through ``vision_encoder``, and a pipeline stage is this model
with the parts it does not hold set to None:

- without ``llm.embed_tokens`` (a later stage) it starts from the previous stage's ``hidden``;
- without ``llm.lm_head`` (an earlier stage) it returns the hidden states for the next one;
- without ``llm`` (contrastive ViT training) it returns the ViT's features.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from keyetron.backend.attention import KERNELS
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.model.config import KeyeConfig
from keyetron.model.llm import Qwen3LM
from keyetron.model.projector import Projector
from keyetron.model.vit import VisionTransformer


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class ModelOutput:
    """What an objective gets from the model for one batch (see ``keyetron.objectives``).

    ``hidden`` are the final-normed hidden states of the tokens that carry a target, in token
    order, ``targets`` their targets and ``documents`` the document (``cu_seqlens`` segment of
    the batch the model was given) each belongs to. ``head`` turns hidden states into logits
    and log-probabilities (vocabulary-parallel under tensor parallelism: every rank then holds
    the same ``hidden`` and gets the same log-probabilities).

    Sequence-level objectives sum per document with ``document_sums`` and count each
    document's loss where ``counted`` says: when a layout splits a document over ranks
    (context parallelism), the sums cover the whole document on every rank and each document
    is counted on exactly one rank, with gradients reaching every rank's tokens.
    """

    hidden: torch.Tensor | None = None  # (N, H)
    targets: torch.Tensor | None = None  # (N,) long
    documents: torch.Tensor | None = None  # (N,) long
    num_documents: int = 0
    head: nn.Module | None = None  # OutputHead or its vocabulary-parallel twin
    vision: torch.Tensor | None = None  # (patches, D) ViT features: a model without the LLM
    # Installed by layouts that split documents over ranks: a differentiable sum over those ranks.
    reduce_documents: Callable[[torch.Tensor], torch.Tensor] = field(default=_same, repr=False)
    counted: torch.Tensor | None = None  # (num_documents,) bool; None: this rank counts every document

    def token_logprobs(self) -> torch.Tensor:
        """log p(target) of every token with a target: (N,), at least fp32."""
        return self.head.token_logprobs(self.hidden, self.targets)

    def document_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` (N, ...) summed per document: (num_documents, ...), whole documents."""
        sums = values.new_zeros((self.num_documents, *values.shape[1:]))
        sums = sums.index_add(0, self.documents, values)
        return self.reduce_documents(sums)

    def counted_documents(self) -> torch.Tensor:
        """(num_documents,) bool: the documents whose sequence-level loss this rank counts."""
        if self.counted is None:
            return torch.ones(self.num_documents, dtype=torch.bool, device=self.documents.device)
        return self.counted


def encode_all_items(model: KeyeVLModel, batch: PackedBatch) -> torch.Tensor:
    """The default ``vision_encoder``: every visual item of the batch through the ViT and
    projector here; one feature per visual pad token, in token order."""
    if not batch.has_all_pixels:
        raise ValueError(f"batch {list(batch.sample_ids)[:4]} holds the pixels of only some of its visual items; "
                         "encoding them needs the rank group that holds the rest (keyetron.parallel.vision)")
    dtype = next(model.projector.parameters()).dtype
    return model.encode_vision(batch.pixel_values.to(dtype), batch.vision_grid_thw)


class KeyeVLModel(nn.Module):
    def __init__(self, cfg: KeyeConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg)
        self.llm = Qwen3LM(cfg.text)
        self.visual_token_ids = (cfg.image_token_id, cfg.video_token_id)
        # vision_encoder(model, batch) -> one LLM-width feature per visual pad token of the batch
        self.vision_encoder = encode_all_items

    # -- the parts --------------------------------------------------------------------------
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches -> one LLM-width embedding per merged 2x2 block, in item order."""
        return self.projector(self.vit(pixel_values, grid_thw), grid_thw)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(T, H) token embeddings with visual features placed at the image/video pad tokens."""
        hidden = self.llm.embed_tokens(batch.input_ids)
        is_visual = torch.isin(batch.input_ids, torch.tensor(self.visual_token_ids, device=batch.input_ids.device))
        n_pads = int(is_visual.sum())
        if not batch.has_vision:
            if n_pads:
                raise ValueError(f"batch has {n_pads} image/video pad tokens but no visual inputs")
            return hidden
        visual = self.vision_encoder(self, batch)
        if visual.shape[0] != n_pads:
            raise ValueError(
                f"batch has {n_pads} image/video pad tokens but its visual inputs give {visual.shape[0]} "
                f"embeddings (grids {batch.vision_grid_thw.tolist()}); samples {list(batch.sample_ids)}"
            )
        return hidden.index_put(is_visual.nonzero(as_tuple=True), visual.to(hidden.dtype))

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-normed hidden states of every token of the batch (the whole model in one process)."""
        return self.llm(self.embed(batch), batch)

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """(T, vocab) logits for every token (evaluation and parity checks)."""
        return self.llm.lm_head.logits(self.hidden_states(batch))

    # -- the forward --------------------------------------------------------------------------
    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> ModelOutput | torch.Tensor:
        """The whole model, or the part this module holds (see the module docstring).

        ``hidden``: the previous pipeline stage's activations, for a part without the embedding."""
        if self.llm is None:
            return ModelOutput(vision=self.vit(batch.pixel_values, batch.vision_grid_thw))
        if self.llm.embed_tokens is not None:
            hidden = self.embed(batch)
        elif hidden is None:
            raise ValueError("this model part starts after the embedding: give it the previous part's hidden states")
        hidden = self.llm(hidden, batch)
        if self.llm.lm_head is None:
            return hidden
        keep = (batch.targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=keep.device), lengths.to(keep.device))
        return ModelOutput(hidden=hidden[keep], targets=batch.targets[keep], documents=segment[keep],
                           num_documents=lengths.numel(), head=self.llm.lm_head)


def set_activation_checkpointing(model: nn.Module, vit: bool | list[int] = False, llm: bool | list[int] = False) -> None:
    """Recompute the chosen blocks in backward: True for all, or a list of block indices (the
    blocks a pipeline stage does not hold are ignored)."""
    parts = []
    if model.vit is not None:
        parts.append((dict(enumerate(model.vit.layers)), model.cfg.vision.num_layers, vit))
    if model.llm is not None:
        parts.append(({i: model.llm.layers[i] for i in model.llm.layers.indices()}, model.cfg.text.num_layers, llm))
    for layers, total, choice in parts:
        chosen = set(range(total)) if choice is True else set(choice or [])
        bad = chosen - set(range(total))
        if bad:
            raise ValueError(f"activation checkpointing: block indices {sorted(bad)} out of range 0..{total - 1}")
        for i, layer in layers.items():
            layer.activation_checkpointing = i in chosen


def set_attention_kernel(model: nn.Module, kernel: str, vit_kernel: str | None = None) -> None:
    """Choose the attention kernel of every LLM (and ViT) attention module; see keyetron.backend.attention."""
    for name in (kernel, vit_kernel or kernel):
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {list(KERNELS)}")
    for layer in model.llm.layers if model.llm is not None else ():
        layer.self_attn.kernel = kernel
    for layer in model.vit.layers if model.vit is not None else ():
        layer.self_attn.kernel = vit_kernel or kernel


def parameter_counts(model: KeyeVLModel) -> dict[str, int]:
    """Parameters per part (shared tensors counted once; a part this model does not hold counts 0)."""

    def count(module: nn.Module | None) -> int:
        if module is None:
            return 0
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
