"""Per-block activation checkpointing: a block flagged here recomputes its forward in backward."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointableBlock(nn.Module):
    """Subclasses define ``block_forward(*args)``; ``activation_checkpointing`` trades compute for memory."""

    activation_checkpointing: bool = False

    def forward(self, *args):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.block_forward, *args, use_reentrant=False)
        return self.block_forward(*args)
