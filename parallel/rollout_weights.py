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





def data_parallel_rollouts(par, cfg: KeyeConfig, prompts, params, *, stop_ids, samples: int = 1, seed: int = 0,
                           prompt_keys=None, model=None):
    """Rollouts of ``prompts`` (documents) shared over the layout's data-parallel ranks; every rank
    returns all of them, in the input's order, as ``keyetron.rollout.generate`` would in one process.

    The cost balancer (``keyetron.parallel.balancer.assign``) deals the prompts to the DP ranks by
    predicted ViT work (the prompt's patches) and LLM work (G x (prompt + max new tokens)); a
    prompt's G samples stay together on one rank, prefilled once. Each rank generates its share
    with ``model`` (default: ``generation_replica(par, cfg)``); the ranks of one DP group (its CP,
    TP and pipeline ranks) compute the same share, and the shares are exchanged over ``dp``. Seeds
    follow the global prompt keys, so the result does not depend on the DP size (tested)."""
    from keyetron.data.dataset import SampleCost
    from keyetron.parallel.balancer import assign
    from keyetron.rollout import generate

    model = model if model is not None else generation_replica(par, cfg)
    keys = list(prompt_keys) if prompt_keys is not None else [d.sample_id or str(i) for i, d in enumerate(prompts)]
    topo = par.topo
    dp = topo.dims.dp if topo.distributed else 1
    mine = list(range(len(prompts)))
    if dp > 1 and prompts:
        costs = [SampleCost(keys[i], samples * (len(d) + params.max_new_tokens),
                            tuple(int(t * h * w) for t, h, w in d.vision_grid_thw.tolist())
                            if d.vision_grid_thw is not None else ())
                 for i, d in enumerate(prompts)]
        rank_of = assign(costs, dp, row_tokens=sum(c.llm_tokens for c in costs)).rank_of()
        mine = [i for i in range(len(prompts)) if rank_of[i] == topo.dp_rank]
    results, stats = generate(model, [prompts[i] for i in mine], params, stop_ids=stop_ids, samples=samples,
                              seed=seed, prompt_keys=[keys[i] for i in mine])
    if dp == 1:
        return results, [stats]
    shares: list = [None] * dp
    dist.all_gather_object(shares, (mine, results, stats), group=topo.group("dp"))
    ordered: list = [None] * len(prompts)
    for indices, share, _ in shares:
        for i, per_prompt in zip(indices, share):
            for r in per_prompt:
                r.prompt_index = i
            ordered[i] = per_prompt
    return ordered, [s for _, _, s in shares]
__all__ = ["data_parallel_rollouts", "full_state", "generation_replica"]
