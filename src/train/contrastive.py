"""Stage 0: continue training the ViT with SigLIP's sigmoid loss against a SigLIP text tower.

Images stay at native resolution and are packed (many grids on one patch axis, as the
ViT always takes them); captions are fixed-length token rows, as SigLIP text towers
are trained. Usage::

    from keyetron.model import load_model_config
    from keyetron.model.siglip_text import load_text_config, load_siglip_checkpoint

    model_cfg = load_model_config("keye-8b")
    text_cfg = load_text_config("keye-8b")            # so400m text tower; "tiny"/"small" for tests
    objective = build_contrastive_objective(model_cfg.vision, text_cfg, vit=model.vit)  # or vit=None: a fresh ViT
    load_siglip_checkpoint(objective, "siglip-so400m/", vision=False)  # text tower, logits, head if present
    objective.negatives_group = topo.group("dp")     # every DP rank's captions serve as negatives

    tokenizer = CaptionTokenizer.for_tower(text_cfg, path="siglip-so400m/")  # path=None: Qwen3 ids (tiny/small)
    builder = ContrastiveBatchBuilder(tokenizer, MediaConfig(image_max_tokens=1024))
    pairs = [image_caption(s) for s in samples]       # Sample -> ImageCaption | None (not one image);
                                                      # or read_image_captions("train.jsonl")
    batch = builder.build([p for p in pairs if p])    # ContrastiveBatch
    out = objective.loss(batch.to(device))            # LossOutput(loss_sum, num_tokens = number of pairs)
    (out.loss_sum / global_pairs).backward()          # global_pairs: pairs of the step over all DP ranks

``loss`` returns the SUM over this rank's rows of the sigmoid loss (SigLIP's
normalisation divides by the batch's pair count), like ``KeyeVLModel.loss`` returns
summed token losses: divide by the step's global pair count, SUM gradients over the
data-parallel ranks (``negatives_group``, whose texts serve as extra negatives), and the
step equals one process over the union batch. ``ContrastiveBatch.num_loss_tokens`` is
the pair count so token-count bookkeeping written for ``PackedBatch`` works unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from keyetron.config import ConfigError
from keyetron.data.dataset import MediaConfig
from keyetron.data.image import load_image
from keyetron.data.samples import Sample, SampleError, parse_sample
from keyetron.data.sources import JsonlSource
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.model.config import VisionConfig
from keyetron.model.keye import LossOutput, init_weights
from keyetron.model.pooling_head import AttentionPoolingHead
from keyetron.model.siglip_text import SiglipTextConfig, SiglipTextTower, init_siglip_weights
from keyetron.model.vit import VisionTransformer
from keyetron.train.siglip_loss import distributed_sigmoid_loss_sum, sigmoid_loss_sum

# SigLIP's initial log temperature and bias (paper: t' = log 10, b = -10).
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0


# -- data -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCaption:
    sample_id: str
    image: Path
    caption: str


def _texts(sample: Sample, role: str) -> str:
    return " ".join(p.value.strip() for t in sample.turns if t.role == role
                    for p in t.parts if p.kind in ("text", "ocr_text") and p.value.strip())


def image_caption(sample: Sample) -> ImageCaption | None:
    """A one-image sample as an image-caption pair; None for text, video and multi-image samples.

    A ``caption`` sample's caption is its answer; any other task's is question + answer
    (e.g. "What colour is the shape? red"), which still names what the image shows.
    """
    media = sample.media
    if len(media) != 1 or media[0].kind != "image":
        return None
    answer = _texts(sample, "assistant")
    caption = answer if sample.task == "caption" else f"{_texts(sample, 'user')} {answer}".strip()
    return ImageCaption(sample.sample_id, media[0].value, caption) if caption else None


def read_image_captions(manifest: str | Path) -> list[ImageCaption]:
    """Every usable image-caption pair of a JSONL manifest (malformed and non-image samples skipped)."""
    source = JsonlSource(manifest)
    pairs = []
    for i in range(len(source)):
        record = source.record(i)
        if record.error:
            continue
        try:
            pair = image_caption(parse_sample(record.raw, record.root))
        except SampleError:
            continue
        if pair is not None:
            pairs.append(pair)
    return pairs


class CaptionTokenizer:
    """Captions -> (B, max_length) ids, truncated and padded to the tower's fixed length.

    ``path`` is a tokenizer folder transformers can load offline (a real SigLIP checkpoint
    folder: its SentencePiece / Gemma tokenizer, which the tower's vocabulary belongs to).
    ``path=None`` uses the project's Qwen3 tokenizer, for towers trained from scratch with a
    vocabulary sized to it (the ``tiny``/``small`` text configs): ids, then
    ``<|endoftext|>`` as end of text, then ``<|endoftext|>`` padding.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = 64):
        self.max_length = max_length
        self.path = path
        if path is None:
            tok = KeyeTokenizer()
            self._qwen, self.vocab_size, self.pad_id = tok, len(tok), tok.pad_id
        else:
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{path}: no tokenizer transformers can load offline ({err}); give the SigLIP "
                                  "checkpoint folder holding its tokenizer files") from err
            if self._hf.pad_token_id is None:
                raise ConfigError(f"{path}: the tokenizer defines no pad token; captions are padded to {max_length}")
            self._qwen, self.vocab_size, self.pad_id = None, len(self._hf), self._hf.pad_token_id

    @classmethod
    def for_tower(cls, cfg: SiglipTextConfig, path: str | Path | None = None) -> CaptionTokenizer:
        """A tokenizer checked against the tower: every id must have a row in its embedding."""
        tok = cls(path, cfg.max_length)
        if tok.vocab_size > cfg.vocab_size:
            where = path or "the Qwen3 tokenizer"
            raise ConfigError(f"{where} has {tok.vocab_size} ids but text tower {cfg.name!r} has vocab_size "
                              f"{cfg.vocab_size}; use the tokenizer of the tower's checkpoint or a larger vocab_size")
        return tok

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        L = self.max_length
        if self._qwen is None:
            out = self._hf(list(captions), padding="max_length", truncation=True, max_length=L)
            return torch.tensor(out["input_ids"], dtype=torch.long)
        rows = torch.full((len(captions), L), self.pad_id, dtype=torch.long)
        for i, text in enumerate(captions):
            ids = self._qwen.encode(text)[: L - 1] + [self.pad_id]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


@dataclass
class ContrastiveBatch:
    """Packed native-resolution images (as the ViT takes them) and one caption row per image."""

    pixel_values: torch.Tensor  # (patches, C, p, p), images in order
    grid_thw: torch.Tensor  # (n, 3) long, (1, h, w) per image, in patches
    input_ids: torch.Tensor  # (n, L) long, fixed-length captions
    sample_ids: tuple[str, ...] = ()

    def __post_init__(self):
        assert self.grid_thw.shape[0] == self.input_ids.shape[0], (self.grid_thw.shape, self.input_ids.shape)
        assert int(self.grid_thw.prod(dim=1).sum()) == self.pixel_values.shape[0], (self.grid_thw, self.pixel_values.shape)

    @property
    def num_pairs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        """The loss is normalised per pair: the count the step divides the summed loss by."""
        return self.num_pairs

    @property
    def num_tokens(self) -> int:
        """ViT patches: the work of the step (throughput metrics)."""
        return int(self.pixel_values.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> ContrastiveBatch:
        """Move tensors to ``device``; ``dtype`` applies to pixel values only."""
        return ContrastiveBatch(self.pixel_values.to(device=device, dtype=dtype), self.grid_thw.to(device),
                                self.input_ids.to(device), self.sample_ids)


class ContrastiveBatchBuilder:
    """Image-caption pairs -> ContrastiveBatch: decode, smart-resize, patchify, pack; tokenize captions."""

    def __init__(self, tokenizer: CaptionTokenizer, media: MediaConfig | None = None):
        self.tokenizer = tokenizer
        self.media = media or MediaConfig()

    def build(self, pairs: Sequence[ImageCaption]) -> ContrastiveBatch:
        assert pairs, "cannot build a batch of zero pairs"
        m = self.media
        images = [load_image(p.image, m.image_min_tokens, m.image_max_tokens, m.max_source_pixels) for p in pairs]
        return ContrastiveBatch(
            pixel_values=torch.cat([img.pixel_values for img in images]),
            grid_thw=torch.tensor([img.size.grid_thw for img in images], dtype=torch.long),
            input_ids=self.tokenizer([p.caption for p in pairs]),
            sample_ids=tuple(p.sample_id for p in pairs),
        )


# -- the objective ------------------------------------------------------------------------
class ContrastiveObjective(nn.Module):
    """ViT + attention-pooling head vs. SigLIP text tower, with learned logit scale and bias.

    Parameter names follow ``keyetron.model.siglip_text.SIGLIP_NAMES`` (``vit``, ``pool_head``,
    ``text_tower``, ``logit_scale``, ``logit_bias``), so ``load_siglip_checkpoint`` /
    ``save_siglip_checkpoint`` work on it. ``negatives_group``: the data-parallel process
    group whose captions are gathered as extra negatives (None: this rank's batch only).
    """

    def __init__(self, vit: VisionTransformer, pool_head: AttentionPoolingHead, text_tower: SiglipTextTower,
                 logit_scale: float | torch.Tensor = LOGIT_SCALE_INIT,
                 logit_bias: float | torch.Tensor = LOGIT_BIAS_INIT, negatives_group=None):
        super().__init__()
        self.vit = vit
        self.pool_head = pool_head
        self.text_tower = text_tower
        dtype = vit.post_layernorm.weight.dtype  # shape (1,), as in SiglipModel checkpoints
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=dtype).detach().clone().reshape(1))
        self.logit_bias = nn.Parameter(torch.as_tensor(logit_bias, dtype=dtype).detach().clone().reshape(1))
        self.negatives_group = negatives_group

    def freeze_text_tower(self, frozen: bool = True) -> None:
        """Lock the text tower (its embeddings are then computed without autograd)."""
        self.text_tower.requires_grad_(not frozen)

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(patches, C, p, p) + (n, 3) -> (n, D) image embeddings (not normalised)."""
        return self.pool_head(self.vit(pixel_values, grid_thw), grid_thw)

    def embed_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) caption embeddings (not normalised)."""
        if not any(p.requires_grad for p in self.text_tower.parameters()):
            with torch.no_grad():
                return self.text_tower(input_ids)
        return self.text_tower(input_ids)

    def loss(self, batch: ContrastiveBatch) -> LossOutput:
        """Summed sigmoid loss of this rank's images against all captions, and this rank's pair count."""
        img = self.embed_images(batch.pixel_values, batch.grid_thw)
        txt = self.embed_texts(batch.input_ids)
        if self.negatives_group is None:
            loss_sum = sigmoid_loss_sum(img, txt, self.logit_scale, self.logit_bias)
        else:
            loss_sum = distributed_sigmoid_loss_sum(img, txt, self.logit_scale, self.logit_bias, self.negatives_group)
        return LossOutput(loss_sum, torch.tensor(batch.num_pairs, device=loss_sum.device))


def build_contrastive_objective(vision: VisionConfig, text: SiglipTextConfig, *, vit: VisionTransformer | None = None,
                                freeze_text: bool = False, seed: int | None = 0, device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32) -> ContrastiveObjective:
    """A freshly initialised head and text tower (and ViT, unless ``vit`` is given: e.g. ``model.vit``).

    Everything ends on ``device`` in ``dtype``, a given ViT included (a no-op when it is there already).
    """
    if text.projection_size != vision.hidden_size:
        raise ConfigError(f"text tower {text.name!r} projects to {text.projection_size} but the ViT width is "
                          f"{vision.hidden_size}; set projection_size: {vision.hidden_size} in the text config")
    head, tower = AttentionPoolingHead(vision), SiglipTextTower(text)
    init_siglip_weights(head, seed)
    init_siglip_weights(tower, None if seed is None else seed + 1)
    own_vit = None
    if vit is None:  # the ViT as build_model initialises it
        own_vit = VisionTransformer(vision)
        init_weights(own_vit, seed=None if seed is None else seed + 2)
    objective = ContrastiveObjective(vit if vit is not None else own_vit, head, tower).to(device=device, dtype=dtype)
    objective.freeze_text_tower(freeze_text)
    return objective
