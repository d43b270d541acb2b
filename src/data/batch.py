"""The packed batch: one value object that flows unchanged from the loader through the model.

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
    """

    input_ids: torch.Tensor  # (n,) long
    targets: torch.Tensor  # (n,) long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (3, n) long
    pixel_values: torch.Tensor | None = None  # (patches, C, p, p)
    vision_grid_thw: torch.Tensor | None = None  # (items, 3) long, in patches
    sample_id: str = ""
    # Topology-aware loading: the rank of the stage-0 TP x CP group that decoded this
    # document's media and will encode them; ``pixel_values`` is None on the other ranks.
    # None: the pixels are here (one process, or every rank decodes).
    vision_owner: int | None = None

    def __post_init__(self):
        n = self.input_ids.numel()
        problems = []
        if self.input_ids.dim() != 1:
            problems.append(f"input_ids must be 1-D, got shape {tuple(self.input_ids.shape)}")
        if tuple(self.targets.shape) != (n,):
            problems.append(f"targets shape {tuple(self.targets.shape)} != ({n},)")
        if tuple(self.position_ids.shape) != (3, n):
            problems.append(f"position_ids shape {tuple(self.position_ids.shape)} != (3, {n})")
        remote = self.vision_owner is not None and self.pixel_values is None
        if (self.pixel_values is None) != (self.vision_grid_thw is None) and not remote:
            problems.append("pixel_values and vision_grid_thw must be given together")
        elif self.pixel_values is not None and int(self.vision_grid_thw.prod(dim=1).sum()) != self.pixel_values.shape[0]:
            problems.append(f"grids {self.vision_grid_thw.tolist()} need {int(self.vision_grid_thw.prod(dim=1).sum())} "
                            f"patches, pixel_values has {self.pixel_values.shape[0]}")
        if problems:
            raise ValueError(f"document {self.sample_id or '<unnamed>'}: " + "; ".join(problems))

    @property
    def has_vision(self) -> bool:
        """Whether the document has visual items (their pixels may live on another rank)."""
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
    """Tokens of several documents on one axis, with everything each stage needs."""

    input_ids: torch.Tensor  # (T,) long
    position_ids: torch.Tensor  # (3, T) long: t, h, w positions, restarting per document
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 document boundaries
    targets: torch.Tensor  # (T,) long, IGNORE_INDEX where no loss
    pixel_values: torch.Tensor | None = None  # (patches, C, p, p), images/frames in token order
    vision_grid_thw: torch.Tensor | None = None  # (items, 3) long, in patches
    sample_ids: tuple[str, ...] = ()
    # Topology-aware loading (keyetron.parallel.loading): per item, the rank of the stage-0
    # TP x CP group that holds its pixels; ``pixel_values`` then holds only this rank's items
    # (in item order). None: every item's pixels are here.
    vision_owner: torch.Tensor | None = None  # (items,) long
    # Rows that carry metadata only (later pipeline stages) say how many loss tokens the
    # real row has; None: count ``targets``.
    loss_token_count: int | None = None

    def __post_init__(self):
        T = self.input_ids.shape[0]
        assert self.input_ids.dim() == 1, self.input_ids.shape
        assert self.position_ids.shape == (3, T), (self.position_ids.shape, T)
        assert self.targets.shape == (T,), (self.targets.shape, T)
        assert int(self.cu_seqlens[-1]) == T and int(self.cu_seqlens[0]) == 0, (self.cu_seqlens, T)
        if self.vision_owner is not None:
            assert self.vision_grid_thw is not None and self.vision_owner.shape == (self.vision_grid_thw.shape[0],)
        elif self.pixel_values is not None:
            assert self.vision_grid_thw is not None
            assert int(self.vision_grid_thw.prod(dim=1).sum()) == self.pixel_values.shape[0], (
                self.vision_grid_thw, self.pixel_values.shape)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        if self.loss_token_count is not None:
            return self.loss_token_count
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def document_lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def has_vision(self) -> bool:
        """Whether the row has visual items (under topology-aware loading their pixels may
        live on other ranks of the stage-0 group: see ``vision_owner``)."""
        return self.vision_grid_thw is not None and self.vision_grid_thw.shape[0] > 0

    def local_items(self, rank: int) -> list[int]:
        """Indices of the visual items whose pixels ``rank`` of the stage-0 group holds."""
        assert self.vision_owner is not None
        return [i for i, r in enumerate(self.vision_owner.tolist()) if r == rank]

    def to(self, device=None, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move tensors to ``device``; ``dtype`` applies to pixel values only."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if f.name == "pixel_values" else None)
            moved[f.name] = value
        return PackedBatch(**moved)

    @staticmethod
    def from_documents(docs: list[Document]) -> PackedBatch:
        """Concatenate documents in the given order (the packer decides the order)."""
        assert docs, "cannot pack zero documents"
        lengths = torch.tensor([len(d) for d in docs])
        cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        visual = [d for d in docs if d.has_vision]
        local = [d.pixel_values for d in visual if d.pixel_values is not None]
        owner = None
        if any(d.vision_owner is not None for d in visual):
            assert all(d.vision_owner is not None for d in visual), "mixed local and owned documents in one row"
            owner = torch.cat([torch.full((d.vision_grid_thw.shape[0],), d.vision_owner, dtype=torch.long)
                               for d in visual])
        return PackedBatch(
            input_ids=torch.cat([d.input_ids for d in docs]),
            position_ids=torch.cat([d.position_ids for d in docs], dim=1),
            cu_seqlens=cu,
            targets=torch.cat([d.targets for d in docs]),
            pixel_values=torch.cat(local) if local else None,
            vision_grid_thw=torch.cat([d.vision_grid_thw for d in visual]) if visual else None,
            sample_ids=tuple(d.sample_id for d in docs),
            vision_owner=owner,
        )
