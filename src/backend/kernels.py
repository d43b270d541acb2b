"""Fused RMSNorm and fused AdamW, each chosen here with the pure-PyTorch reference beside it.

RMSNorm (the LLM's final norm, its per-layer norms and the per-head q/k norms; the ViT and
projector use ``nn.LayerNorm``, which is already one fused kernel in torch):

- ``reference``: the model's own ``keyetron.model.llm.RMSNorm`` (statistics in at least
  fp32, scaled in the input dtype, times the weight) -- the definition the others are
  tested against, and what runs on CPU;
- ``torch``: ``torch.rms_norm``, one fused kernel on CUDA (and CPU) when the input and
  weight dtypes match;
- ``apex``: NVIDIA apex's ``fused_rms_norm_affine`` (CUDA; apex is built from source,
  ``docker/Dockerfile`` with ``INSTALL_APEX=1``).

Transformer Engine is not offered: its RMSNorm exists only as a module that owns its
weight and takes plain tensors, so it can neither share the model's parameter (names,
checkpoints) nor run under our DTensor tensor parallelism; with TE installed, apex
usually is too (NGC images) and torch's kernel always is.

``swap_rms_norm(model, RMSNorm)`` replaces each ``RMSNorm`` module by a ``FusedRMSNorm`` holding the very
same ``weight`` parameter (state_dict keys and the optimizer's view unchanged). Call it
before tensor parallelism (TP wraps the norms with hooks and makes their weight a
DTensor, which ``FusedRMSNorm`` understands) and before FSDP2. With ``train.compile`` leave
the reference in place: inductor generates a fused norm itself, and an apex kernel would
break the compiled graph.

AdamW: ``torch.optim.AdamW(fused=True)`` updates every tensor of a group in one
multi-tensor kernel on CUDA and CPU, for plain tensors and DTensors (TP or FSDP2 shards)
alike. apex's ``FusedAdam`` is the same multi-tensor algorithm, CUDA only and without
DTensor support; it adds nothing the engine needs (its fp32 master weights are what
ZeRO-1/2 already keep), so ``adamw`` uses torch's.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from keyetron.backend.device import is_accelerator

RMS_NORMS = ("auto", "reference", "torch", "apex")


@functools.cache
def _apex_rms_norm():
    """apex's fused RMSNorm functions (same dtype, mixed dtype), or None when apex is not built."""
    if importlib.util.find_spec("apex") is None:
        return None
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine
    except ImportError:  # apex without its CUDA extensions, or PyPI's unrelated "apex"
        return None
    return fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``keyetron.model.llm.RMSNorm``'s arithmetic: statistics in at least fp32, the normalised
    value back in the input dtype, times the weight (output dtype: the promotion of both)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _torch_rms_norm(x, weight, eps):
    # The fused kernel needs matching dtypes; the result takes the reference's output dtype.
    out = torch.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return out.to(torch.promote_types(x.dtype, weight.dtype))


def _apex_rms_norm_fn(x, weight, eps):
    same, mixed = _apex_rms_norm()
    if x.dtype == weight.dtype:
        return same(x, weight, (x.shape[-1],), eps)
    out = mixed(x, weight, (x.shape[-1],), eps)  # output in the weight's dtype (fp32 master weights)
    return out.to(torch.promote_types(x.dtype, weight.dtype))


_IMPLS = {"reference": reference_rms_norm, "torch": _torch_rms_norm, "apex": _apex_rms_norm_fn}


def rms_norm_available(name: str, device: torch.device | str) -> bool:
    """Whether RMSNorm implementation ``name`` runs on ``device`` here."""
    if name in ("reference", "torch"):
        return True
    if name == "apex":
        return is_accelerator(device) and _apex_rms_norm() is not None
    raise ValueError(f"unknown RMSNorm implementation {name!r}; choose one of {RMS_NORMS}")


def fused_rms_norm_available(device: torch.device | str) -> str | None:
    """The fused RMSNorm ``auto`` picks on ``device``: apex when built, else torch's kernel, on
    CUDA; None on CPU (the reference runs there: it is what tests compare layouts with)."""
    if not is_accelerator(device):
        return None
    return "apex" if rms_norm_available("apex", device) else "torch"


def select_rms_norm(name: str, device: torch.device | str) -> str:
    """Resolve ``auto`` or check that the named implementation can run on ``device``."""
    if name == "auto":
        return fused_rms_norm_available(device) or "reference"
    if not rms_norm_available(name, device):
        raise RuntimeError(f"RMSNorm implementation {name!r} cannot run on {torch.device(device).type}"
                           + (" (apex is not installed with its CUDA extensions)" if name == "apex" else "")
                           + f"; use 'auto' or one of {[n for n in _IMPLS if rms_norm_available(n, device)]}")
    return name


class FusedRMSNorm(nn.Module):
    """An RMSNorm computed by a chosen kernel, holding the replaced module's ``weight`` parameter."""

    def __init__(self, weight: nn.Parameter, eps: float, impl: str):
        super().__init__()
        assert impl in _IMPLS, impl
        self.weight, self.eps, self.impl = weight, eps, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _IMPLS[self.impl]
        if not isinstance(x, DTensor):
            return kernel(x, self.weight, self.eps)
        # Tensor parallelism (ReplicatedParams): x is this rank's tokens or heads, or all of it,
        # and the weight is replicated. Rows normalise independently, so the kernel runs on the
        # local rows; the weight's gradient from split rows is a partial sum over the ranks.
        assert all(not (p.is_shard() and p.dim in (-1, x.dim() - 1)) for p in x.placements), x.placements
        grad_placements = [Partial() if p.is_shard() else Replicate() for p in x.placements]
        out = kernel(x.to_local(), self.weight.to_local(grad_placements=grad_placements), self.eps)
        return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, impl={self.impl}"


def swap_rms_norm(model: nn.Module, norm_type: type[nn.Module], impl: str = "auto",
                  device: torch.device | str | None = None) -> int:
    """Replace every ``norm_type`` module of ``model`` (``keyetron.model.llm.RMSNorm``: the
    backend does not import the model) with a ``FusedRMSNorm`` using ``impl`` (``auto``:
    ``fused_rms_norm_available``), in place; returns how many were replaced (0 when the choice
    is the reference). ``device``: where the model runs (default: its parameters' device)."""
    if device is None:
        device = next(model.parameters()).device
    impl = select_rms_norm(impl, device)
    if impl == "reference":
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is norm_type:
                setattr(parent, name, FusedRMSNorm(child.weight, child.eps, impl))
                swapped += 1
    return swapped


def fused_adamw_supported(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on CPU or CUDA, plain
    tensors or DTensors (it has a DTensor rule; every tensor of a group goes in one kernel)."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def adamw(param_groups: list[dict], *, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``param_groups``, fused when every parameter allows it (else
    torch's default multi-tensor ``foreach`` implementation)."""
    params = [p for g in param_groups for p in g["params"]]
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, fused=fused_adamw_supported(params) or None)


__all__ = ["FusedRMSNorm", "RMS_NORMS", "adamw", "fused_adamw_supported", "fused_rms_norm_available",
           "reference_rms_norm", "rms_norm_available", "select_rms_norm", "swap_rms_norm"]
