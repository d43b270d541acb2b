"""Mixed precision as Megatron does it: bf16 weights, fp32 main gradients, fp32 master weights.

Under ``train.precision: bf16`` the model's parameters are stored in bf16 (``cast_model``)
and every matmul runs in bf16 with no autocast. What must not lose precision does not:

- **main gradients**: a post-accumulate-grad hook moves each backward's bf16 gradient into
  the parameter's fp32 ``main_grad`` and frees ``.grad``. Micro-batches are summed there,
  and the data-parallel reductions, the global norm and clipping all work on it, so no
  gradient is ever summed in bf16 across micro-batches or ranks. (Within one backward,
  autograd sums a parameter's uses in its dtype, as Megatron without gradient-accumulation
  fusion does.)
- **master weights**: the optimizer steps fp32 copies (``MasterWeights`` for replicated
  parameters; ZeRO-1/2 keep fp32 slices anyway; FSDP2 keeps its shards in fp32 and gathers
  them in bf16 through ``MixedPrecisionPolicy``) and writes the rounded result back into
  the bf16 parameters after every step.
- norms' statistics, the RoPE angles, softmax and the loss reduction are computed in fp32
  by the model itself (see ``RMSNorm``, ``sectioned_rope``, ``OutputHead``).

Code that reads gradients asks ``grad_of(p)``: the main gradient where there is one, else
``p.grad``. Checkpoints hold the masters (``optim.<name>.master``), so a bf16 run resumes
exactly in fp32 and under any layout, and an fp32 run resumes into bf16 masters exactly.
"""
from __future__ import annotations

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)
PRECISIONS = ("fp32", "bf16", "autocast")  # what ``train.precision`` resolves to ("auto" picks one)


def is_low_precision(p: torch.Tensor) -> bool:
    return p.dtype in LOW_PRECISION


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient optimizers and reductions use: the fp32 main gradient of a low-precision
    parameter, else ``p.grad``."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def set_grad(p: torch.Tensor, grad: torch.Tensor | None) -> None:
    if hasattr(p, "main_grad"):
        p.main_grad = grad
    else:
        p.grad = grad


def zero_grad_of(p: torch.Tensor) -> torch.Tensor:
    """A zero gradient for ``p`` in the dtype its gradients are summed in."""
    return torch.zeros_like(p, dtype=torch.float32 if hasattr(p, "main_grad") else p.dtype)


def clear_grads(params) -> None:
    for p in params:
        p.grad = None
        if hasattr(p, "main_grad"):
            p.main_grad = None


def _accumulate_main_grad(p: torch.Tensor) -> None:
    g = p.grad
    if p.main_grad is None:
        p.main_grad = g.to(torch.float32)
    else:
        p.main_grad.add_(g)
    p.grad = None


def install_main_grads(module: nn.Module) -> list:
    """Give every trainable low-precision parameter of ``module`` an fp32 ``main_grad`` that
    each backward adds into (before any other gradient hook: install before the optimizer)."""
    handles = []
    for p in module.parameters():
        if p.requires_grad and is_low_precision(p) and not hasattr(p, "main_grad"):
            p.main_grad = None
            handles.append(p.register_post_accumulate_grad_hook(_accumulate_main_grad))
    return handles


def cast_model(module: nn.Module, dtype: torch.dtype, *, skip: tuple[str, ...] = ()) -> None:
    """Store ``module``'s floating-point parameters and buffers in ``dtype``, except the
    children named in ``skip`` (FSDP2 keeps the LLM's shards in fp32)."""
    for name, child in module.named_children():
        if name not in skip:
            child.to(dtype)
    for name, p in module.named_parameters(recurse=False):
        if p.is_floating_point():
            p.data = p.data.to(dtype)


class MasterWeights:
    """fp32 copies of low-precision parameters that the optimizer steps in their place.

    ``wrap(params)`` returns the tensors to hand to ``torch.optim.AdamW`` (a parameter itself
    when it is already fp32/fp64); ``attach_grads`` points each master's gradient at its
    parameter's main gradient before the step; ``publish`` rounds the stepped masters back
    into the parameters."""

    def __init__(self):
        self.of: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> master

    def wrap(self, params: list) -> list:
        return [self._master(p) for p in params]

    @torch.no_grad()
    def _master(self, p: torch.Tensor) -> torch.Tensor:
        if not is_low_precision(p):
            return p
        master = p.detach().to(torch.float32).clone()
        self.of[p] = master
        return master

    def attach_grads(self) -> None:
        for p, master in self.of.items():
            master.grad = grad_of(p)

    @torch.no_grad()
    def publish(self) -> None:
        for p, master in self.of.items():
            _local(p).copy_(_local(master))

    def names(self, param_names: dict[int, str]) -> dict[int, str]:
        """``{id(master): name}`` for the masters of named parameters."""
        return {id(m): param_names[id(p)] for p, m in self.of.items() if id(p) in param_names}


def full_precision_state(module: nn.Module, masters: MasterWeights | None) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each low-precision parameter's fp32 master in its place:
    what checkpoints hold, so that a bf16 run resumes exactly in fp32 and the other way round."""
    of = {id(p): m for p, m in masters.of.items()} if masters is not None else {}
    return {k: of.get(id(v), v).detach() for k, v in module.state_dict(keep_vars=True).items()}


def master_targets(module: nn.Module, masters: MasterWeights | None) -> dict[str, torch.Tensor]:
    """``{state-dict key: master}`` for the parameters of ``module`` that have a master."""
    of = {id(p): m for p, m in masters.of.items()} if masters is not None else {}
    return {k: of[id(v)] for k, v in module.state_dict(keep_vars=True).items() if id(v) in of}


__all__ = ["LOW_PRECISION", "MasterWeights", "full_precision_state", "master_targets", "PRECISIONS", "cast_model", "clear_grads", "grad_of",
           "install_main_grads", "is_low_precision", "set_grad", "zero_grad_of"]
