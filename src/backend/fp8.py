"""FP8 training of the LLM decoder's linear layers, with torchao's float8 training.

``convert_llm_to_fp8`` swaps each ``nn.Linear`` of the LLM's decoder layers (q/k/v/o and
gate/up/down projections) for torchao's ``Float8Linear``: the same module with the same
``weight`` parameter (names, state_dict keys and the optimizer's view are unchanged), whose
three GEMMs (output, input gradient, weight gradient) cast their operands to float8 with
dynamic scales and run on the FP8 tensor cores (``torch._scaled_mm``). Weights, gradients
and optimizer state stay in high precision; only the matmuls are FP8.

Not converted, on purpose:
- the ViT and the projector: their GEMMs are a small share of a step (one short attention
  sequence per frame, a few hundred patches), they are replicated rather than TP-sharded,
  and vision features are where Keye-VL trains most carefully (lower learning rate,
  frozen in some stages) -- little to gain and the quantisation noise lands on the inputs
  of every later layer;
- the embedding: a lookup, not a GEMM;
- the output head: its logits feed a softmax over 152K classes in fp32, and the head is an
  ``OutputHead`` (or, under tensor parallelism, a ``VocabParallelHead``) with its own
  ``token_logprobs`` interface. Keeping it in high precision is also what torchtitan does
  (its recipes filter ``output``).

Reference: the same model without the conversion (``tests/backend/test_fp8.py`` compares
them with torchao's emulation, which runs the casts on any device and does the matmul in
fp32, so CPUs can check what GPUs run).

Order with the rest of ``parallelize_keye`` (torchtitan's): after the pipeline split, before
tensor parallelism (TP's ``ColwiseParallel``/``RowwiseParallel`` then shard the
``Float8Linear``s like any linear; a swap after TP would drop TP's hooks), activation
checkpointing, ``torch.compile`` (needed for speed: it fuses the amax/scale/cast kernels)
and FSDP2. Under FSDP2 ``fsdp_float8_all_gather=True`` all-gathers the weights in float8
(tensorwise recipe only); then call ``precompute_fp8_scales`` after every optimizer step,
and write checkpoints from ``high_precision(p)`` (the weights are then a torchao subclass).

Rows: the weight gradient's GEMM has the token count as its inner dimension, so the rows
the linears see (the whole row under sequence parallelism, the rank's slice under context
parallelism, a stage's fixed length under pipelining) must hold a multiple of 16 tokens
(pad them, with ignored targets) or the conversion must use ``pad_inner_dim=True``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor

RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values we support
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
DIM_MULTIPLE = 16  # torch._scaled_mm needs both weight dimensions to be multiples of 16
INSTALL = "pip install -c constraints.txt -e '.[fp8]'  (torchao==0.18.0)"


@contextlib.contextmanager
def _quiet_import():
    # A CPU machine logs one warning per CUDA-only torchao extension (and torch one about an
    # enum) at import: noise, not a problem.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_float8():
    """The ``torchao.float8`` module (imported quietly), or None when torchao is not installed."""
    if importlib.util.find_spec("torchao") is None:
        return None
    with _quiet_import():
        import torchao.float8

    return torchao.float8


def _decoder(model: nn.Module) -> nn.Module | None:
    """The LLM's decoder layers of a ``KeyeVLModel`` or a ``Qwen3LM`` (None: this part holds none)."""
    llm = getattr(model, "llm", model)
    return getattr(llm, "layers", None) if llm is not None else None


def _prefix(model: nn.Module) -> str:
    return "llm.layers." if getattr(model, "llm", None) is not None else "layers."


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names (in ``model``) of the linear layers FP8 training converts: the decoder's projections."""
    layers = _decoder(model)
    if layers is None:
        return []
    return [_prefix(model) + name for name, m in layers.named_modules() if type(m) is nn.Linear]


def fp8_problem(device: torch.device | str | None, model: nn.Module | None = None, *, recipe: str = "tensorwise",
                emulate: bool = False) -> str | None:
    """Why FP8 training cannot run here (None: it can).

    ``device``: where the model trains (None: not checked, e.g. a model still on the meta
    device); ``model``: a ``KeyeVLModel`` or ``Qwen3LM`` whose decoder linears are checked;
    ``emulate``: torchao's emulation (any device, for tests)."""
    problems = []
    if recipe not in RECIPES:
        problems.append(f"unknown FP8 recipe {recipe!r}; use one of {list(RECIPES)}")
    if importlib.util.find_spec("torchao") is None:
        problems.append(f"FP8 training needs torchao, which is not installed: {INSTALL}")
    device = torch.device(device) if device is not None else None
    if not emulate and device is not None:
        if device.type != "cuda":
            problems.append(f"FP8 matmuls need an NVIDIA GPU of compute capability >= "
                            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper or newer); this process runs "
                            f"on {device.type}")
        elif torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            problems.append(f"FP8 matmuls need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; "
                            f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
    if model is not None:
        layers = _decoder(model)
        for name, m in (layers.named_modules() if layers is not None else ()):
            if type(m) is nn.Linear and (m.in_features % DIM_MULTIPLE or m.out_features % DIM_MULTIPLE):
                problems.append(f"layer {_prefix(model)}{name} has a {m.out_features} x {m.in_features} weight; "
                                f"FP8 GEMMs need both dimensions to be multiples of {DIM_MULTIPLE}")
    return "; ".join(problems) or None


def fp8_config(recipe: str = "tensorwise", *, emulate: bool = False, fsdp_float8_all_gather: bool = False,
               pad_inner_dim: bool = False):
    """torchao's ``Float8LinearConfig`` for ``recipe`` (tensorwise: one scale per tensor, the fastest;
    rowwise: one per row, more accurate, all-gathers stay in high precision). ``pad_inner_dim``
    zero-pads each GEMM's inner dimension to a multiple of 16 (costs a copy per GEMM): the
    weight gradient's inner dimension is the token count, so without it every row the
    linears see must have a multiple of ``DIM_MULTIPLE`` tokens."""
    float8 = torchao_float8()
    if float8 is None:
        raise ImportError(f"FP8 training needs torchao: {INSTALL}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; use one of {list(RECIPES)}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError(f"float8 all-gather under FSDP2 needs the tensorwise recipe, not {recipe!r}")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_float8_all_gather,
                               pad_inner_dim=pad_inner_dim)


def convert_llm_to_fp8(model: nn.Module, *, recipe: str = "tensorwise", emulate: bool = False,
                       fsdp_float8_all_gather: bool = False, pad_inner_dim: bool = False) -> list[str]:
    """Swap the LLM decoder's linear layers for FP8 ones, in place; returns their names.

    ``model``: a ``KeyeVLModel`` (or its ``Qwen3LM``), before tensor parallelism and FSDP2.
    ``emulate``: torchao's emulation (casts to float8 and back, fp32 matmul; any device,
    for tests only: slow, and not for ``torch.compile``). ``fsdp_float8_all_gather``: only with
    ``parallel.sharding: fsdp2`` (ZeRO-1/2 flatten the weights themselves and need plain
    tensors). ``pad_inner_dim``: see ``fp8_config`` (rows padded to a multiple of 16 tokens do
    without it). Raises with ``fp8_problem``'s reason when FP8 cannot run here."""
    layers = _decoder(model)
    weight = next(layers.parameters(), None) if layers is not None else None
    device = weight.device if weight is not None and weight.device.type != "meta" else None
    problem = fp8_problem(device, model, recipe=recipe, emulate=emulate)
    if problem:
        raise RuntimeError(f"train.fp8: {problem}")
    if layers is None:
        return []
    names = fp8_linear_names(model)
    config = fp8_config(recipe, emulate=emulate, fsdp_float8_all_gather=fsdp_float8_all_gather,
                        pad_inner_dim=pad_inner_dim)
    with _quiet_import():
        torchao_float8().convert_to_float8_training(
            layers, config=config,
            # Exactly nn.Linear: subclasses (and the KV projections TP installs) keep their own forward.
            module_filter_fn=lambda module, fqn: type(module) is nn.Linear)
    return names


def is_fp8_linear(module: nn.Module) -> bool:
    """Whether ``module`` runs its matmuls in FP8 (a torchao ``Float8Linear``)."""
    if torchao_float8() is None:
        return False
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)


def high_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` without torchao's float8 all-gather wrapper (FSDP2 with ``fsdp_float8_all_gather``
    makes FP8 weights a ``WeightWithDynamicFloat8CastTensor``, which checkpoints would pickle
    as a torchao class that a loader must allow-list); any other tensor unchanged. For what a
    checkpoint writes: the same values as plain tensors (DTensors stay DTensors)."""
    local = t._local_tensor if isinstance(t, DTensor) else t
    inner = getattr(local, "_tensor", None)
    if type(local).__name__ != "WeightWithDynamicFloat8CastTensor" or inner is None:
        return t
    if isinstance(t, DTensor):
        return DTensor.from_local(inner, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(),
                                  run_check=False)
    return inner


def precompute_fp8_scales(model: nn.Module) -> None:
    """Under FSDP2 with float8 all-gather: the next step's weight scales for every FP8 linear,
    in one all-reduce. Call after each optimizer step; a no-op for any other layout."""
    float8 = torchao_float8()
    if float8 is not None:
        float8.precompute_float8_dynamic_scale_for_fsdp(model)


__all__ = ["DIM_MULTIPLE", "MIN_CAPABILITY", "RECIPES", "convert_llm_to_fp8", "fp8_config", "fp8_linear_names",
           "fp8_problem", "high_precision", "is_fp8_linear", "precompute_fp8_scales", "torchao_float8"]
