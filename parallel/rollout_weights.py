"""The weights rollouts generate with, taken from a training layout: one full replica per rank.

``full_state(par)`` gives every rank the whole model's state (parameters and buffers, full size,
detached CPU copies): tensor-parallel and FSDP2 DTensors are gathered with ``full_tensor()`` (a
collective over their mesh), and under pipeline parallelism each stage's tensors are exchanged
over the ``pp`` group, so every rank ends with every stage. ZeRO-1/2 keep whole parameters on
every rank already (only optimizer state is sharded), so nothing else is needed.
``generation_replica`` loads that state into a freshly built model of the architecture: the
rollout engine (``keyetron.rollout``) runs it unchanged on every rank, prompts sharded over the
data-parallel ranks. Call both on every rank of the layout (they hold collectives). The replica
is built anew from the weights as they are after the optimizer step, so no vision feature,
cache or weight of the previous policy can survive into the next rollout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from keyetron.model import build_model
from keyetron.model.config import KeyeConfig

_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.")  # torch.compile / activation checkpointing names


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def full_state(par) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank (collective over the layout's groups)."""
    local = {}
    for name, t in par.model.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        local[_clean(name)] = t.detach().to("cpu", copy=True)
    topo = par.topo
    if topo.distributed and topo.dims.pp > 1:
        pieces: list = [None] * topo.dims.pp
        dist.all_gather_object(pieces, local, group=topo.group("pp"))
        local = {}
        for piece in pieces:
            local.update(piece)
    return local


def generation_replica(par, cfg: KeyeConfig, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A whole model for generation holding the layout's current weights (default: the trained
    parameters' dtype), on ``device`` (default: the layout's)."""
    state = full_state(par)
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    model = build_model(cfg, device="cpu", dtype=dtype, seed=None)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise RuntimeError(f"the layout's state lacks {len(missing)} tensors of the full model, e.g. {missing[:3]}")
    model.load_state_dict({k: state[k].to(dtype) if state[k].is_floating_point() else state[k]
                           for k in model.state_dict()})
    return model.to(device or par.topo.device).eval()


__all__ = ["full_state", "generation_replica"]
