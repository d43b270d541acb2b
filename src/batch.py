"""The value objects every layer shares: a training document and the packed batch of them.

Neither knows about ranks, groups or parallel layouts: the data pipeline builds them, the
model reads them, and ``keyetron.parallel`` derives from a batch the slice each rank's model
sees (its own subclass, ``keyetron.parallel.local_rows.LocalRow``) outside the model.

Layout is "THD": every document of a packed row (or of several rows) is concatenated on
one token axis, and ``cu_seqlens`` marks where documents start, so attention never
crosses a document boundary and nothing is padded per document.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Document:
    """One training document before packing.

    ``targets[t]`` is the token the model should predict at position t (the next token),
    or IGNORE_INDEX; shifting happens here, once, so that splitting a row across
    sequence- or context-parallel ranks never needs a neighbour's token.

    ``pixel_values`` may be None while ``vision_grid_thw`` is set: the document's media were
    decoded by another process, which holds the pixels (topology-aware loading).
    """

    input_ids: torch.Tensor  # (n,) long
    targets: torch.Tensor  # (n,) long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (3, n) long
    pixel_values: torch.Tensor | None = None  # (patches, C, p, p)
    vision_grid_thw: torch.Tensor | None = None  # (items, 3) long, in patches
    sample_id: str = ""

    def __post_init__(self):
        n = self.input_ids.numel()
        problems = []
        if self.input_ids.dim() != 1:
            problems.append(f"input_ids must be 1-D, got shape {tuple(self.input_ids.shape)}")
        if tuple(self.targets.shape) != (n,):
            problems.append(f"targets shape {tuple(self.targets.shape)} != ({n},)")
        if tuple(self.position_ids.shape) != (3, n):
            problems.append(f"position_ids shape {tuple(self.position_ids.shape)} != (3, {n})")
        if self.pixel_values is not None and self.vision_grid_thw is None:
            problems.append("pixel_values without vision_grid_thw")
        elif self.pixel_values is not None:
            need = int(self.vision_grid_thw.prod(dim=1).sum())
            if need != self.pixel_values.shape[0]:
                problems.append(f"grids {self.vision_grid_thw.tolist()} need {need} patches, pixel_values has "
                                f"{self.pixel_values.shape[0]}")
        if problems:
            raise ValueError(f"document {self.sample_id or '<unnamed>'}: " + "; ".join(problems))

    @property
    def has_vision(self) -> bool:
        """Whether the document has visual items (their pixels may be held by another process)."""
        return self.vision_grid_thw is not None and self.vision_grid_thw.shape[0] > 0

    @staticmethod
    def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Next-token targets: position t learns input_ids[t+1] where loss_mask[t+1] is set."""
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        nxt = input_ids[1:].clone()
        nxt[~loss_mask[1:].bool()] = IGNORE_INDEX
        targets[:-1] = nxt
        return targets

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PackedBatch:
    """Tokens of several documents on one axis, with everything each part of the model needs."""

    input_ids: torch.Tensor  # (T,) long
    position_ids: torch.Tensor  # (3, T) long: t, h, w positions, restarting per document
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 document boundaries
    targets: torch.Tensor  # (T,) long, IGNORE_INDEX where no loss
    # The pixels of the visual items held here, in item order: all of them, unless another
    # process decoded some (then their grids are here and their pixels are not).
    pixel_values: torch.Tensor | None = None  # (patches, C, p, p)
    vision_grid_thw: torch.Tensor | None = None  # (items, 3) long, in patches
    sample_ids: tuple[str, ...] = ()

    def __post_init__(self):
        T = self.input_ids.shape[0]
        assert self.input_ids.dim() == 1, self.input_ids.shape
        assert self.position_ids.shape == (3, T), (self.position_ids.shape, T)
        assert self.targets.shape == (T,), (self.targets.shape, T)
        assert int(self.cu_seqlens[-1]) == T and int(self.cu_seqlens[0]) == 0, (self.cu_seqlens, T)
        if self.pixel_values is not None:
            assert self.vision_grid_thw is not None
            assert int(self.vision_grid_thw.prod(dim=1).sum()) >= self.pixel_values.shape[0], (
                self.vision_grid_thw, self.pixel_values.shape)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def document_lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def has_vision(self) -> bool:
        """Whether the batch has visual items (their pixels may be held by another process)."""
        return self.vision_grid_thw is not None and self.vision_grid_thw.shape[0] > 0

    @property
    def has_all_pixels(self) -> bool:
        """Whether every visual item's pixels are here."""
        if not self.has_vision:
            return True
        return self.pixel_values is not None and \
            self.pixel_values.shape[0] == int(self.vision_grid_thw.prod(dim=1).sum())

    def replace(self, **changes) -> PackedBatch:
        """A copy with some fields changed (the same class: subclasses keep their own fields)."""
        return dataclasses.replace(self, **changes)

    def to(self, device=None, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move tensors to ``device``; ``dtype`` applies to pixel values only."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if f.name == "pixel_values" else None)
            moved[f.name] = value
        return type(self)(**moved)

    @staticmethod
    def from_documents(docs: list[Document]) -> PackedBatch:
        """Concatenate documents in the given order (the packer decides the order)."""
        assert docs, "cannot pack zero documents"
        lengths = torch.tensor([len(d) for d in docs])
        cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        visual = [d for d in docs if d.has_vision]
        local = [d.pixel_values for d in visual if d.pixel_values is not None]
        return PackedBatch(
            input_ids=torch.cat([d.input_ids for d in docs]),
            position_ids=torch.cat([d.position_ids for d in docs], dim=1),
            cu_seqlens=cu,
            targets=torch.cat([d.targets for d in docs]),
            pixel_values=torch.cat(local) if local else None,
            vision_grid_thw=torch.cat([d.vision_grid_thw for d in visual]) if visual else None,
            sample_ids=tuple(d.sample_id for d in docs),
        )


__all__ = ["IGNORE_INDEX", "Document", "PackedBatch"]
