"""Peak bytes of the tensors a piece of code creates, on any device (CPU tensors included,
which ``torch.cuda`` statistics and ``tracemalloc`` do not see)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages created by aten ops under this mode and not yet freed, and their peak.
    The storages of ``existing`` tensors (the inputs) are not counted, nor their views."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = {t.untyped_storage().data_ptr() for t in existing}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # one Python object per storage, freed with it
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.storages:
                    self.storages.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


__all__ = ["LiveTensors"]
