"""Variable-length (packed) attention behind one interface.

All kernels take THD tensors: ``q (Tq, Hq, D)``, ``k, v (Tk, Hkv, D)`` with ``Hq % Hkv == 0``
(grouped-query attention), and ``cu_seqlens`` (int32, ``(n_docs + 1,)``) marking the
documents (or images / video frames) in the pack. A token attends only within its own
document. With ``causal=True`` and a document whose query part is shorter than its key
part, the mask is aligned bottom-right (flash-attn's convention: the last query sees
every key), which is what context-parallel chunks need.

Kernels:
- ``reference``: explicit softmax(QK^T)V per document, any device and dtype (fp64 for
  proofs). Every other kernel is tested against it.
- ``sdpa``: ``F.scaled_dot_product_attention`` per document; any device.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16).
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16; optional package).
``auto`` picks the fastest that can run for the given tensors.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

from keyetron.backend.device import is_accelerator

KERNELS = ("auto", "reference", "sdpa", "torch_varlen", "flash_attn")


def _doc_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """True where query i may see key j; bottom-right aligned when lq < lk."""
    q_pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    return torch.arange(lk, device=device)[None, :] <= q_pos


def reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool, scale: float) -> torch.Tensor:
    """The definition: per document, softmax(scale * Q K^T + mask) V, accumulated in at least fp32."""
    groups = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape)
    bq, bk = _doc_bounds(cu_seqlens_q), _doc_bounds(cu_seqlens_k)
    for (q0, q1), (k0, k1) in zip(zip(bq[:-1], bq[1:]), zip(bk[:-1], bk[1:])):
        if q1 == q0:
            continue
        qd = q[q0:q1].to(compute).transpose(0, 1)  # (H, lq, D)
        kd = k[k0:k1].to(compute).repeat_interleave(groups, dim=1).transpose(0, 1)
        vd = v[k0:k1].to(compute).repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = torch.matmul(qd, kd.transpose(1, 2)) * scale
        if causal:
            scores = scores.masked_fill(~_causal_mask(q1 - q0, k1 - k0, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.matmul(probs, vd).transpose(0, 1).to(q.dtype)
    return out


def sdpa_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool, scale: float) -> torch.Tensor:
    """torch's fused SDPA per document (no cross-document mask materialised)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    bq, bk = _doc_bounds(cu_seqlens_q), _doc_bounds(cu_seqlens_k)
    for (q0, q1), (k0, k1) in zip(zip(bq[:-1], bq[1:]), zip(bk[:-1], bk[1:])):
        if q1 == q0:
            continue
        qd = q[q0:q1].transpose(0, 1).unsqueeze(0)
        kd = k[k0:k1].transpose(0, 1).unsqueeze(0)
        vd = v[k0:k1].transpose(0, 1).unsqueeze(0)
        if groups > 1:
            kd = kd.repeat_interleave(groups, dim=1)
            vd = vd.repeat_interleave(groups, dim=1)
        lq, lk = q1 - q0, k1 - k0
        if causal and lq != lk:
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=_causal_mask(lq, lk, q.device), scale=scale)
        else:
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


@functools.cache
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    """torch's varlen kernel and its keyword names (read once: they differ between torch 2.11 and 2.12+)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool, scale: float) -> torch.Tensor:
    varlen_attn, params = _torch_varlen()
    lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    kwargs = {"scale": scale}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:  # torch >= 2.12
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:  # torch 2.11
        kwargs["is_causal"] = causal
    return varlen_attn(
        q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(lens_q.max()), int(lens_k.max()), **kwargs,
    )


@functools.cache
def _flash_attn() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_attn_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool, scale: float) -> torch.Tensor:
    lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return _flash_attn()(
        q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(lens_q.max()), int(lens_k.max()), softmax_scale=scale, causal=causal,
    )


_IMPLS = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "torch_varlen": torch_varlen_attention,
    "flash_attn": flash_attn_attention,
}


def kernel_available(name: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``name`` can run on tensors of this device and dtype here."""
    if name in ("reference", "sdpa"):
        return True
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "torch_varlen":
        return half and is_accelerator(device) and _torch_varlen() is not None
    if name == "flash_attn":
        return half and is_accelerator(device) and _flash_attn() is not None
    raise ValueError(f"unknown attention kernel {name!r}; choose one of {KERNELS}")


def select_kernel(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Resolve ``auto`` (fastest available) or check that an explicitly named kernel can run."""
    if name == "auto":
        for candidate in ("flash_attn", "torch_varlen", "sdpa"):
            if kernel_available(candidate, device, dtype):
                return candidate
    if not kernel_available(name, device, dtype):
        raise RuntimeError(
            f"attention kernel {name!r} cannot run on {torch.device(device).type} with {dtype}; "
            f"use 'auto' or one of {[k for k in _IMPLS if kernel_available(k, device, dtype)]}"
        )
    return name


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Packed attention over documents; returns ``(Tq, Hq, D)`` in q's dtype."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[1] % k.shape[1] == 0, (q.shape, k.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    impl = _IMPLS[select_kernel(kernel, q.device, q.dtype)]
    return impl(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
