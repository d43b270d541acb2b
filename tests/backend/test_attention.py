"""Every attention kernel that can run here equals the reference definition on packed documents."""
import pytest
import torch

from keyetron.backend.attention import kernel_available, select_kernel, varlen_attention
from keyetron.backend.device import default_device


def packed(lens, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, d, generator=g, dtype=torch.float64).to(device, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def naive_full_mask(q, k, v, cu, causal):
    """Dense attention over the whole pack with an explicit block-diagonal (and causal) mask."""
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_is_block_diagonal_attention(causal, hq, hkv):
    q, k, v, cu = packed([5, 1, 12, 7], hq, hkv, 8, torch.float64)
    out = varlen_attention(q, k, v, cu, causal=causal, kernel="reference")
    torch.testing.assert_close(out, naive_full_mask(q, k, v, cu, causal), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_reference_forward_and_backward(causal):
    q, k, v, cu = packed([9, 3, 16, 1], 4, 2, 16, torch.float64)
    grads = []
    for kernel in ("reference", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attention(qq, kk, vv, cu, causal=causal, kernel=kernel)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_causal_with_shorter_query_is_bottom_right_aligned():
    q, k, v, cu = packed([10], 2, 2, 8, torch.float64)
    full = varlen_attention(q, k, v, cu, causal=True, kernel="reference")
    cu_q = torch.tensor([0, 4], dtype=torch.int32)
    for kernel in ("reference", "sdpa"):
        tail = varlen_attention(q[6:], k, v, cu_q, cu_seqlens_k=cu, causal=True, kernel=kernel)
        torch.testing.assert_close(tail, full[6:], rtol=0, atol=1e-12)


def test_auto_on_cpu_is_sdpa_and_gpu_kernels_refuse_cpu():
    assert select_kernel("auto", "cpu", torch.float32) == "sdpa"
    assert not kernel_available("flash_attn", "cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        select_kernel("torch_varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        select_kernel("magic", "cpu", torch.float32)


@pytest.mark.parametrize("kernel", ["torch_varlen", "flash_attn"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_kernels_equal_reference_in_bf16(kernel, causal):
    device = default_device() if torch.cuda.is_available() else torch.device("cpu")
    if not kernel_available(kernel, device, torch.bfloat16):
        pytest.skip(f"{kernel} needs a GPU and its library (device here: {device})")
    q, k, v, cu = packed([300, 17, 1024, 5], 8, 2, 128, torch.bfloat16, device=device)
    grads = []
    for name in ("reference", kernel):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attention(qq, kk, vv, cu, causal=causal, kernel=name)
        out.float().square().sum().backward()
        grads.append((out, qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
