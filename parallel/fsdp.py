"""FSDP2 (``torch.distributed.fsdp.fully_shard``) of the LLM: the alternative to ZeRO-1.

ZeRO-1 keeps the full LLM weights and gradients on every rank and shards only the AdamW
state; FSDP2 shards the weights and gradients too. Each decoder layer is one FSDP unit
(all-gathered before its forward and again before its backward, its gradients
reduce-scattered right after), the embedding is one, the final norm and the head are one
(``fully_shard([norm, lm_head])``: the norm runs at the end of ``decode``, the head later
in the loss), and the LLM is the root that ties them together. A tied head shares one
unit with the embedding.

Sharding is over the flattened ``("dp", "cp")`` mesh dims: data- and context-parallel
ranks hold the same LLM weights (the replica group of ``data_parallel.py``). Under tensor
parallelism the parameters are already DTensors on ``topo.mesh["tp"]``; FSDP2 shards
their local TP shards on dim 0 and makes them DTensors on the 2-D ``(dp_cp, tp)`` mesh,
which needs the FSDP and TP meshes to be slices of the one ``topo.mesh``.

Every rank's loss is already divided by the step's global loss-token count, so FSDP must
SUM the gradients, not average them: the divide factor is 1 and reductions are forced to
plain ``SUM`` (fp32/bf16 would otherwise use ``PREMUL_SUM``, which gloo lacks).

The ViT and projector are not touched: replicated over dp x cp x tp as under ZeRO-1;
``FSDPAdamW.reduce_and_norm`` all-reduces their gradients.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from keyetron.model.keye import KeyeVLModel
from keyetron.parallel.data_parallel import PlainAdamW, counted_once, reduce_gradients
from keyetron.parallel.mixed_precision import grad_of
from keyetron.parallel.topology import Topology

FSDP_DIM = "dp_cp"  # name of the flattened ("dp", "cp") mesh dim


def fsdp_mesh(topo: Topology):
    """The 1-D mesh FSDP shards over: dp x cp flattened, a slice of ``topo.mesh`` (so that
    FSDP can join it with the TP mesh into one 2-D mesh). Idempotent."""
    if topo.mesh is None:
        raise ValueError("FSDP2 shards over data- and context-parallel ranks: it needs a distributed topology "
                         "(Topology.from_process_group); use sharding='none' in a single process")
    return topo.mesh["dp", "cp"]._flatten(FSDP_DIM)


def apply_fsdp(model: KeyeVLModel, topo: Topology, param_dtype: torch.dtype | None = None) -> None:
    """Shard ``model.llm`` in place with FSDP2 over dp x cp (after tensor parallelism, before
    building the optimizer). The ViT and projector stay replicated.

    ``param_dtype`` (bf16): the shards stay in fp32 (they are the optimizer's master weights),
    each unit is all-gathered in ``param_dtype`` for its forward and backward, and gradients
    are reduce-scattered and summed over micro-batches in fp32 (``MixedPrecisionPolicy``)."""
    llm = model.llm
    if llm is None:
        raise ValueError("parallel.sharding: fsdp2 shards the LLM and this model has none (a ViT-only objective); "
                         "use zero1 or none")
    if isinstance(llm, FSDPModule):
        raise ValueError("FSDP2 is already applied to this model (ParallelEngine(sharding='fsdp2') applies it; "
                         "do not call apply_fsdp before it)")
    mesh = fsdp_mesh(topo)
    shard = functools.partial(fully_shard, mesh=mesh,
                              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
                              if param_dtype is not None else MixedPrecisionPolicy())
    for layer in llm.layers:
        shard(layer)
    if llm.lm_head.weight is llm.embed_tokens.weight:  # tied: one unit, from the embedding to the head
        shard([llm.embed_tokens, llm.norm, llm.lm_head])
    else:
        shard(llm.embed_tokens)
        shard([llm.norm, llm.lm_head])
    shard(llm)
    for module in llm.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # FSDP picks its root (shared communication state, backward bookkeeping) lazily, in the
    # first forward of the root module. The model calls ``embed_tokens`` before ``llm.forward``
    # and the objective calls the head after it; each then runs as its own iteration's
    # forward root under the LLM's root state, the case FSDP supports for submodule-only
    # forwards. So the root is made here, before any of them runs.
    llm._get_fsdp_state()._lazy_init()


def _tp_sharded(p: torch.Tensor) -> bool:
    """Whether parameter ``p`` is split by tensor parallelism (not just by FSDP)."""
    mesh = getattr(p, "device_mesh", None)
    names = mesh.mesh_dim_names if mesh is not None else None
    return bool(names) and "tp" in names and p.placements[names.index("tp")].is_shard()


def fsdp_grad_norm(model: nn.Module, topo: Topology) -> torch.Tensor:
    """The 2-norm of the full-model gradient under FSDP2, every value counted once: an LLM
    gradient shard lives on one dp x cp rank (TP-replicated ones on every TP rank: counted
    on TP rank 0); a vision gradient, after the all-reduce, on every rank (counted once)."""
    grads = []
    for name, p in model.named_parameters():
        grad = grad_of(p)
        if grad is None:
            continue
        counted = (_tp_sharded(p) or topo.tp_rank == 0) if name.startswith("llm.") else counted_once(name, p, topo)
        if counted:
            grads.append(grad.to_local() if hasattr(grad, "to_local") else grad)
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    if grads:
        total += torch.stack(torch._foreach_norm(grads, 2.0)).double().pow(2).sum()
    if topo.distributed:
        dist.all_reduce(total)
    return total.sqrt()


class FSDPAdamW(PlainAdamW):
    """Plain ``torch.optim.AdamW`` over FSDP2's sharded parameters (each rank steps its 1/N
    of the LLM and the whole ViT), behind the interface of ``ShardedAdamW``.

    FSDP reduce-scatters LLM gradients during backward, so ``reduce_and_norm`` all-reduces
    only the vision gradients before taking the global norm.
    """

    def __init__(self, model: nn.Module, named_groups: list[dict], topo: Topology, betas, eps):
        super().__init__(model, named_groups, topo, betas, eps)
        self._llm_names = {n for n, _ in model.named_parameters() if n.startswith("llm.")}

    def reduce_and_norm(self) -> torch.Tensor:
        reduce_gradients(self.model, self.topo, skip=self._llm_names)
        return fsdp_grad_norm(self.model, self.topo)


__all__ = ["FSDPAdamW", "apply_fsdp", "fsdp_grad_norm", "fsdp_mesh"]
