"""SigLIP's sigmoid contrastive loss of the ViT against a SigLIP text tower (stage 0).

The objective owns what SigLIP adds around the ViT: the attention-pooling head, the text
tower and the learned logit scale and bias. The model (without its LLM: a ViT-only
``KeyeVLModel``) gives it the ViT's patch features of a ``ContrastiveBatch``
(``keyetron.data.pairs``: packed native-resolution images, fixed-length captions); the head
pools them per image, the tower embeds the captions, and the loss is the SUM over this
rank's images against every data-parallel rank's captions (``negatives_group``): divided by
the step's global pair count and with gradients summed over the ranks, the step equals one
process over the union batch. The towers run under the recipe's precision; the loss over
all cells runs in (at least) fp32.

``SiglipModel`` is the ViT and an objective's parts under transformers' ``SiglipModel``
names (``vit``, ``pool_head``, ``text_tower``, ``logit_scale``, ``logit_bias``), for loading
and saving SigLIP checkpoints (``keyetron.model.siglip_text``), retrieval evaluation and
parity tests::

    siglip = build_contrastive_objective(model_cfg.vision, load_text_config("keye-8b"), vit=model.vit)
    load_siglip_checkpoint(siglip, "siglip-so400m/", vision=False)  # text tower, logits, head if present
    objective = siglip.objective                                      # what the trainer steps
"""
from __future__ import annotations

import math

import torch
from torch import nn

from keyetron.config import ConfigError
from keyetron.model.config import VisionConfig
from keyetron.model.keye import init_weights
from keyetron.model.pooling_head import AttentionPoolingHead
from keyetron.model.siglip_text import SiglipTextConfig, SiglipTextTower, init_siglip_weights
from keyetron.model.vit import VisionTransformer
from keyetron.objectives.base import Objective, ObjectiveLoss
from keyetron.objectives.sigmoid_loss import distributed_sigmoid_loss_sum, sigmoid_loss_sum

# SigLIP's initial log temperature and bias (paper: t' = log 10, b = -10).
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0
PARTS = ("vit", "pool_head", "text_tower", "logit")  # what ``contrastive.lr_scale`` scales


class ContrastiveObjective(Objective):
    """Attention-pooling head + SigLIP text tower + learned logit scale and bias (module docstring)."""

    name = "contrastive"  # its parameters go to contrastive.safetensors beside a checkpoint's model
    unit = "pairs"
    metric_names = ()
    collective = True  # every data-parallel rank's captions are gathered: every rank needs a batch

    def __init__(self, pool_head: AttentionPoolingHead, text_tower: SiglipTextTower,
                 logit_scale: float | torch.Tensor = LOGIT_SCALE_INIT,
                 logit_bias: float | torch.Tensor = LOGIT_BIAS_INIT, negatives_group=None):
        super().__init__()
        self.pool_head = pool_head
        self.text_tower = text_tower
        dtype = next(pool_head.parameters()).dtype  # shape (1,), as in SiglipModel checkpoints
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=dtype).detach().clone().reshape(1))
        self.logit_bias = nn.Parameter(torch.as_tensor(logit_bias, dtype=dtype).detach().clone().reshape(1))
        self.negatives_group = negatives_group

    @staticmethod
    def part_of(name: str) -> str:
        """The ``contrastive.lr_scale`` part of a trained parameter (the ViT's or the objective's)."""
        return "logit" if name.startswith("logit_") else name.split(".")[0]

    def freeze_text_tower(self, frozen: bool = True) -> None:
        """Lock the text tower (its embeddings are then computed without autograd)."""
        self.text_tower.requires_grad_(not frozen)

    def embed_images(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The ViT's (patches, D) features + grids (n, 3) -> (n, D) image embeddings (not normalised)."""
        return self.pool_head(features, grid_thw)

    def embed_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) caption embeddings (not normalised)."""
        if not any(p.requires_grad for p in self.text_tower.parameters()):
            with torch.no_grad():
                return self.text_tower(input_ids)
        return self.text_tower(input_ids)

    def count(self, batch) -> int:
        return batch.num_pairs

    def forward(self, output, batch) -> ObjectiveLoss:
        img = self.embed_images(output.vision, batch.vision_grid_thw)
        txt = self.embed_texts(batch.input_ids)
        with torch.autocast(img.device.type, enabled=False):  # the loss over all cells in (at least) fp32
            dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
            img, txt = img.to(dtype), txt.to(dtype)
            if self.negatives_group is None:
                loss_sum = sigmoid_loss_sum(img, txt, self.logit_scale, self.logit_bias)
            else:
                loss_sum = distributed_sigmoid_loss_sum(img, txt, self.logit_scale, self.logit_bias,
                                                        self.negatives_group)
        return ObjectiveLoss(loss_sum, batch.num_pairs)


class SiglipModel(nn.Module):
    """A ViT with a contrastive objective's parts, under transformers' ``SiglipModel`` names (the
    parameters are the objective's and the ViT's own, not copies)."""

    def __init__(self, vit: VisionTransformer, objective: ContrastiveObjective):
        super().__init__()
        self.vit = vit
        self.pool_head = objective.pool_head
        self.text_tower = objective.text_tower
        self.logit_scale = objective.logit_scale
        self.logit_bias = objective.logit_bias
        self._objective = [objective]  # not a child: its parameters are registered above by name

    @property
    def objective(self) -> ContrastiveObjective:
        return self._objective[0]

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(patches, C, p, p) + (n, 3) -> (n, D) image embeddings (not normalised)."""
        return self.objective.embed_images(self.vit(pixel_values, grid_thw), grid_thw)

    def embed_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.objective.embed_texts(input_ids)

    def loss(self, batch) -> ObjectiveLoss:
        """Summed sigmoid loss of this rank's images against all captions, and this rank's pair count."""
        from keyetron.model.keye import ModelOutput

        return self.objective(ModelOutput(vision=self.vit(batch.pixel_values, batch.vision_grid_thw)), batch)


def build_contrastive_objective(vision: VisionConfig, text: SiglipTextConfig, *, vit: VisionTransformer | None = None,
                                freeze_text: bool = False, seed: int | None = 0, device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32) -> SiglipModel:
    """A freshly initialised head and text tower around ``vit`` (default: a fresh ViT, initialised as
    ``build_model`` does); everything ends on ``device`` in ``dtype``, a given ViT included."""
    if text.projection_size != vision.hidden_size:
        raise ConfigError(f"text tower {text.name!r} projects to {text.projection_size} but the ViT width is "
                          f"{vision.hidden_size}; set projection_size: {vision.hidden_size} in the text config")
    head, tower = AttentionPoolingHead(vision), SiglipTextTower(text)
    init_siglip_weights(head, seed)
    init_siglip_weights(tower, None if seed is None else seed + 1)
    if vit is None:  # the ViT as build_model initialises it
        vit = VisionTransformer(vision)
        init_weights(vit, seed=None if seed is None else seed + 2)
    objective = ContrastiveObjective(head, tower).to(device=device, dtype=dtype)
    objective.freeze_text_tower(freeze_text)
    return SiglipModel(vit.to(device=device, dtype=dtype), objective)


__all__ = ["LOGIT_BIAS_INIT", "LOGIT_SCALE_INIT", "PARTS", "ContrastiveObjective", "SiglipModel",
           "build_contrastive_objective"]
