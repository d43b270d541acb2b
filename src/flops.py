"""Training FLOPs counted the honest way, from config shapes, and MFU against a stated peak.

Why analytic: the count must not depend on which kernel ran or how the model was sharded,
and it must bill only real work. The rules are those of the project's performance reference
(shared/reference/performance.md):

- **LLM linear**: ``6 * N * tokens`` over real tokens only, where N is every LLM parameter
  except the input embedding table (a lookup, not a matmul). The LM head is billed only on
  ``head_tokens``, the tokens whose logits are computed (``KeyeVLModel.loss`` runs the head
  only where the target is not IGNORE_INDEX; the trainer passes the loss-token count).
- **LLM attention**: per document from ``cu_seqlens``, causal fwd+bwd
  ``6 * L * n_heads * head_dim * sum_d(len_d^2)`` (query heads: GQA shares K/V, not scores).
  Padding documents (``sample_id == "<padding>"``) count zero; so do their tokens above.
- **ViT**: per attention frame of p patches (a video grid (t, h, w) is t frames of h*w
  patches, as the ViT attends per frame) ``6 * N_vit * p + 12 * L_vit * hidden_vit * p^2``
  (bidirectional: no causal half). N_vit leaves out the learned position table, which is
  resized once per grid and added, never multiplied per patch (same reason as the LLM
  embedding). Billed per patch, never per decoder token.
- **Projector**: ``6 * N_proj * p / merge^2``: it runs on the merged tokens.

Frozen modules. Modules run in the order vit -> projector -> llm, and the multiplier of a
module's linear FLOPs follows from which modules train (``FlopCounter(trainable=...)``):

- 6: the module trains (forward, input-gradient and weight-gradient matmuls);
- 4: it is frozen but an *earlier* module trains, so gradients must flow through it
  (forward + input gradient, no weight gradient); e.g. a frozen LLM under a trainable ViT;
- 2: it is frozen and nothing before it trains: forward only; e.g. a frozen ViT.

Attention has no weights, so its backward (dQ, dK, dV = twice the forward) is the same
whether the module trains or only passes gradients through: it is billed in full (the
fwd+bwd formulas above) under 6 and 4, and one third of it (forward only) under 2.
The 6x convention also bills the input gradient of the very first trainable layer, which
is never computed; at one layer of dozens that is within the rounding of any MFU figure.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.data.packing import PADDING_SAMPLE_ID
from keyetron.model.config import KeyeConfig

MODULE_ORDER = ("vit", "projector", "llm")  # the order activations (and, reversed, gradients) flow


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one step (or micro-batch) by part; add counts of micro-batches and ranks with ``+``."""

    vit_linear: int = 0
    vit_attention: int = 0
    projector: int = 0
    llm_linear: int = 0  # including the LM head on head tokens
    llm_attention: int = 0
    objective: int = 0  # an objective's own modules (stage 0's pooling head and text tower)

    @property
    def vit(self) -> int:
        return self.vit_linear + self.vit_attention

    @property
    def llm(self) -> int:
        return self.llm_linear + self.llm_attention

    @property
    def total(self) -> int:
        return self.vit + self.projector + self.llm + self.objective

    def __add__(self, other: FlopCount) -> FlopCount:
        if not isinstance(other, FlopCount):
            return NotImplemented
        return FlopCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def __radd__(self, other):  # lets builtin sum() start from 0
        return self if other == 0 else NotImplemented


def parameter_counts_from_config(cfg: KeyeConfig) -> dict[str, int]:
    """Parameters per part computed from shapes; equals ``keyetron.model.parameter_counts(build_model(cfg))``."""
    v, t = cfg.vision, cfg.text
    d, m = v.hidden_size, v.hidden_size * cfg.projector.merge_size**2
    mlp = (d * v.intermediate_size + v.intermediate_size) + (v.intermediate_size * d + d)
    vit_block = 2 * 2 * d + 4 * (d * d + d) + mlp  # two LayerNorms, q/k/v/out, fc1/fc2
    vit = (v.num_channels * v.patch_size**2 * d + d) + v.position_table_side**2 * d + v.num_layers * vit_block + 2 * d
    projector = 2 * m + (m * m + m) + (m * t.hidden_size + t.hidden_size)
    h = t.hidden_size
    attn = h * t.num_heads * t.head_dim * 2 + h * t.num_kv_heads * t.head_dim * 2 + 2 * t.head_dim  # q,o; k,v; norms
    llm_block = 2 * h + attn + 3 * h * t.intermediate_size  # two RMSNorms, attention, gate/up/down
    embed = t.vocab_size * h
    head = 0 if t.tie_word_embeddings else t.vocab_size * h
    llm = embed + t.num_layers * llm_block + h + head
    return {"vit": vit, "projector": projector, "llm": llm, "total": vit + projector + llm}


def frame_patches(grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[int]:
    """Patches of every ViT attention sequence: a grid (t, h, w) gives t frames of h*w patches."""
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [int(h) * int(w) for t, h, w in rows for _ in range(int(t))]


def linear_multipliers(trainable: Mapping[str, bool]) -> dict[str, int]:
    """2, 4 or 6 per module (see the module docstring) from which modules train."""
    out, upstream_trains = {}, False
    for name in MODULE_ORDER:
        out[name] = 6 if trainable[name] else (4 if upstream_trains else 2)
        upstream_trains = upstream_trains or trainable[name]
    return out


class FlopCounter:
    """Counts the FLOPs of packed batches for one model config and one choice of trainable modules."""

    def __init__(self, cfg: KeyeConfig, trainable: Mapping[str, bool] | None = None):
        trainable = dict(trainable or {})
        unknown = sorted(set(trainable) - set(MODULE_ORDER))
        if unknown:
            raise ValueError(f"trainable: unknown module(s) {unknown}; allowed keys are {list(MODULE_ORDER)}")
        self.cfg = cfg
        self.trainable = {name: bool(trainable.get(name, True)) for name in MODULE_ORDER}
        self.multipliers = linear_multipliers(self.trainable)

        v, t = cfg.vision, cfg.text
        counts = parameter_counts_from_config(cfg)
        self.merge_tokens = cfg.projector.merge_size**2
        self.vit_params = counts["vit"] - v.position_table_side**2 * v.hidden_size  # position table is a lookup
        self.projector_params = counts["projector"]
        self.llm_head_params = t.vocab_size * t.hidden_size  # a matmul even when tied to the embedding
        embed = t.vocab_size * t.hidden_size
        untied_head = 0 if t.tie_word_embeddings else self.llm_head_params
        self.llm_body_params = counts["llm"] - embed - untied_head  # decoder layers + final norm
        # Per unit of sum(len^2) (LLM) or sum(p^2) (ViT): fwd+bwd figures from the module docstring.
        self.llm_attention_coeff = 6 * t.num_layers * t.num_heads * t.head_dim
        self.vit_attention_coeff = 12 * v.num_layers * v.hidden_size

    def _attention(self, module: str, coeff: int, sum_sq: int) -> int:
        full = coeff * sum_sq
        return full if self.multipliers[module] > 2 else full // 3  # forward only: 1 of 3 passes

    def count(self, doc_lengths: Iterable[int], frame_patches: Iterable[int] = (),
              head_tokens: int | None = None) -> FlopCount:
        """FLOPs of real documents (padding excluded by the caller) and ViT frames.

        ``doc_lengths``: tokens of every real document; ``frame_patches``: patches of every
        image or video frame; ``head_tokens``: tokens whose logits are computed (default all).
        """
        lengths = [int(n) for n in doc_lengths]
        patches = [int(p) for p in frame_patches]
        assert all(n >= 0 for n in lengths) and all(p >= 0 for p in patches), (lengths, patches)
        tokens = sum(lengths)
        head_tokens = tokens if head_tokens is None else int(head_tokens)
        assert 0 <= head_tokens <= tokens, (head_tokens, tokens)
        bad = [p for p in patches if p % self.merge_tokens]
        if bad:
            raise ValueError(f"frame patch counts {bad} are not multiples of merge_size^2 = {self.merge_tokens}")
        mult = self.multipliers
        return FlopCount(
            vit_linear=mult["vit"] * self.vit_params * sum(patches),
            vit_attention=self._attention("vit", self.vit_attention_coeff, sum(p * p for p in patches)),
            projector=mult["projector"] * self.projector_params * (sum(patches) // self.merge_tokens),
            llm_linear=mult["llm"] * (self.llm_body_params * tokens + self.llm_head_params * head_tokens),
            llm_attention=self._attention("llm", self.llm_attention_coeff, sum(n * n for n in lengths)),
        )

    def count_batch(self, batch: PackedBatch) -> FlopCount:
        """FLOPs of a packed batch: documents from cu_seqlens without padding, frames from the grids,
        the head on loss tokens.

        Count batches whose documents are whole: a document sharded across context-parallel
        ranks costs len^2 in attention, not the sum of its shards' squares, so count before
        the split (or count whole documents once, on one rank).
        """
        lengths = batch.document_lengths
        ids = batch.sample_ids or ("",) * len(lengths)
        assert len(ids) == len(lengths), (len(ids), len(lengths))
        real = [n for n, sid in zip(lengths, ids) if sid != PADDING_SAMPLE_ID]
        head_tokens = int((batch.targets != IGNORE_INDEX).sum())
        return self.count(real, frame_patches(batch.vision_grid_thw), head_tokens)


# -- MFU ---------------------------------------------------------------------------------

def mfu(flops: float, seconds: float, n_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: counted FLOPs / (step time * devices * peak per device)."""
    if seconds <= 0 or n_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError(f"mfu needs positive seconds, n_devices and peak_flops_per_device; got "
                         f"{seconds}, {n_devices}, {peak_flops_per_device}")
    return flops / (seconds * n_devices * peak_flops_per_device)


# Dense (no structured sparsity) tensor-core peaks in FLOP/s, from NVIDIA's datasheets, whose
# tensor figures are quoted "with sparsity" (halved here). "tf32" is fp32 matmuls with TF32
# enabled; "fp32" is plain fp32 (PyTorch's default for matmuls). First matching pattern wins;
# None marks a part we recognise but do not tabulate (no trustworthy figure to hand).
_PEAKS: list[tuple[str, dict[str, float] | None]] = [
    (r"\bH100\b.*\bNVL\b", None),
    (r"\bH200\b.*\bNVL\b", None),
    # H100 PCIe datasheet: BF16/FP16 1,513 (sparse), TF32 756 (sparse), FP32 51 TFLOP/s.
    (r"\bH100\b.*\bPCIE\b", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    # H100 SXM datasheet: BF16/FP16 1,979 (sparse), TF32 989 (sparse), FP32 67 TFLOP/s;
    # 989e12 is the peak the project's performance reference uses. Device name "NVIDIA H100 80GB HBM3".
    (r"\bH100\b", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    # H200 (SXM) datasheet: same compute as H100 SXM, more and faster memory.
    (r"\bH200\b", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    # A100 (40/80 GB, SXM and PCIe) datasheet: BF16/FP16 312, TF32 156, FP32 19.5 TFLOP/s (dense).
    (r"\bA100\b", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def peak_flops(device_name: str, dtype: torch.dtype, *, tf32: bool = False,
               override: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in ``dtype``, or None where unknown (e.g. CPU).

    ``device_name`` is what ``torch.cuda.get_device_name()`` returns; ``tf32`` says whether
    fp32 matmuls run on TF32 tensor cores; ``override`` (a user-given peak) wins over the table.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    if dtype in (torch.bfloat16, torch.float16):
        kind = "bf16"
    elif dtype == torch.float32:
        kind = "tf32" if tf32 else "fp32"
    else:
        return None
    name = device_name.upper()
    for pattern, peaks in _PEAKS:
        if re.search(pattern, name):
            return None if peaks is None else peaks[kind]
    return None
