"""Tensor-in / tensor-out collectives under one name across the supported torch versions.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` (the old names warn); torch 2.11, on the
GPU machines, has only the old names.
"""
from __future__ import annotations

import torch.distributed as dist

all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = ["all_gather_tensor", "reduce_scatter_tensor"]
