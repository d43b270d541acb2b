"""``train.compile``: ``torch.compile`` per transformer block, torchtitan's way.

Each ViT encoder layer and each LLM decoder layer is compiled on its own, in place
(``nn.Module.compile``): parameter names and state_dict keys stay as they are (no
``_orig_mod.`` prefix), so checkpoints, FSDP2 units and pipeline stages see the same model.
The layers of one kind share their compiled code (torch inlines the module and passes its
parameters as inputs), so a 36-layer LLM compiles one decoder layer, not 36.

Shapes: packed rows vary in length, so the token dimension must be dynamic. ``dynamic=None``
(torch's default) compiles the first length as static and, at the first row of another
length, once more with a symbolic length that then serves every length.

Graph breaks: ``fullgraph=False`` by default because varlen attention is data-dependent
(per-document lengths read from ``cu_seqlens``, e.g. ``int(lens.max())`` for the flash
kernels, a Python loop over documents for ``sdpa``/``reference``): each block compiles to
the region before the attention call and the region after it (norms, projections, RoPE,
the MLP and the residuals: what inductor fuses), and the attention kernel runs between
them (with ``sdpa``, on CPU, Dynamo also traces its per-document loop, which recompiles for
new document layouts up to Dynamo's recompile limit and then runs eagerly).
``fullgraph=True`` needs the attention to be opaque to the compiler (a ``torch.library``
custom op with a fake implementation: ``opaque_varlen_attention``); until the model calls
one, it raises. Activation checkpointing meets the same wall: a graph break inside the
checkpoint makes Dynamo run the whole block eagerly (no graph at all). With the opaque op
both go away: one graph per block kind and length regime.

Order in ``parallelize_keye`` (torchtitan's): after FP8 conversion, tensor and context
parallelism and activation checkpointing, before FSDP2 (FSDP's hooks stay outside the
compiled code) and before building the pipeline schedule.
"""
from __future__ import annotations

import importlib.util
import shutil

import torch
from torch import nn

PARTS = ("vit", "llm")


def _cpp_compilers() -> list[str]:
    """The C++ compilers inductor would try on CPU (``$CXX``, else g++), in its order."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    return [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]


def compile_problem(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here (None: it can)."""
    if backend != "inductor":
        return None  # eager / aot_eager generate no code
    device = torch.device(device)
    if device.type == "cpu":
        compilers = _cpp_compilers()
        if not any(shutil.which(c) for c in compilers):
            return (f"torch.compile on CPU generates C++ and needs a C++ compiler; none of {compilers} is on PATH. "
                    "Install one (Debian: apt-get install g++; or set CXX) or set train.compile: false")
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return ("torch.compile on CUDA generates Triton kernels and triton is not installed "
                    "(it comes with torch's CUDA wheels: pip install triton); or set train.compile: false")
    else:
        return f"torch.compile is not set up for {device.type} devices here; set train.compile: false"
    return None


def transformer_blocks(model: nn.Module, parts=PARTS) -> list[nn.Module]:
    """The ViT encoder layers and LLM decoder layers this model (or pipeline stage) holds."""
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"compile: unknown part(s) {bad}; use {list(PARTS)}")
    blocks = []
    for part in parts:
        module = getattr(model, part, None)
        if module is not None and getattr(module, "layers", None) is not None:
            blocks.extend(module.layers)
    return blocks


@torch.library.custom_op("keyetron::varlen_attention", mutates_args=())
def opaque_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, causal: bool, scale: float, kernel: str) -> torch.Tensor:
    """``keyetron.backend.attention.varlen_attention`` as one operator the compiler does not look
    into (its fake implementation gives the output's shape): a block that calls this instead
    compiles to one graph, ``fullgraph=True`` included, and under activation checkpointing too.

    A proposal for ``attention.varlen_attention`` (not yet called by the model): its backward
    recomputes the forward under ``torch.func.vjp`` (one more attention forward per backward;
    flash-attn's old-style autograd function does not support torch.func). A production
    version would save the flash kernels' log-sum-exp and call their backward directly."""
    from keyetron.backend.attention import varlen_attention

    return varlen_attention(q, k, v, cu_seqlens_q, causal=causal, scale=scale, cu_seqlens_k=cu_seqlens_k,
                            kernel=kernel)


@opaque_varlen_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, kernel):
    return torch.empty_like(q)


@torch.library.custom_op("keyetron::varlen_attention_backward", mutates_args=())
def _opaque_varlen_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool,
                                      scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from keyetron.backend.attention import varlen_attention

    # Autograd is off inside an operator's implementation; torch.func's vjp differentiates anyway.
    _, vjp = torch.func.vjp(lambda q, k, v: varlen_attention(q, k, v, cu_seqlens_q, causal=causal, scale=scale,
                                                             cu_seqlens_k=cu_seqlens_k, kernel=kernel), q, k, v)
    return vjp(grad)


@_opaque_varlen_attention_backward.register_fake
def _(grad, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, causal, scale, kernel = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.args = (causal, scale, kernel)


def _backward(ctx, grad):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _opaque_varlen_attention_backward(grad.contiguous(), q, k, v, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


opaque_varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def compile_blocks(model: nn.Module, *, parts=PARTS, backend: str = "inductor", fullgraph: bool = False,
                   dynamic: bool | None = None) -> int:
    """Compile every transformer block of ``model`` in place (see the module docstring); returns
    how many. Raises with ``compile_problem``'s reason when the compiler cannot run here."""
    params = next(model.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    problem = compile_problem(device, backend) if device.type != "meta" else None
    if problem:
        raise RuntimeError(f"train.compile: {problem}")
    blocks = transformer_blocks(model, parts)
    for block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return len(blocks)


__all__ = ["PARTS", "compile_blocks", "compile_problem", "opaque_varlen_attention", "transformer_blocks"]
