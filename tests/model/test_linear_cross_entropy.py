"""The fused output projection + log-softmax equals the plain one, and never holds the logits whole.

Reference: ``-F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` and its autograd,
with a random upstream gradient per row (so a per-row scaling error cannot hide in a sum).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from keyetron.model import linear_cross_entropy
from keyetron.model.linear_cross_entropy import CHUNK_LOGITS, linear_token_logprobs
from keyetron.model.llm import OutputHead
from keyetron.perf.live_memory import LiveTensors

TOL = 1e-10


def _inputs(n, v, h, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, upstream


def _run(fn, hidden, weight, targets, upstream, *, grad_hidden=True, grad_weight=True):
    """log-probs and the gradients of sum(upstream * log-probs) w.r.t. hidden and weight."""
    hidden = hidden.clone().requires_grad_(grad_hidden)
    weight = weight.clone().requires_grad_(grad_weight)
    logprobs = fn(hidden, weight, targets)
    (logprobs * upstream.to(logprobs.dtype)).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


def plain(hidden, weight, targets):
    logits = hidden @ weight.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return -F.cross_entropy(logits, targets, reduction="none")


def fused(chunk_tokens=None):
    return lambda hidden, weight, targets: linear_token_logprobs(hidden, weight, targets, chunk_tokens=chunk_tokens)


def _max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 37, 100, None])
def test_fp64_equals_plain_cross_entropy_and_its_gradients(chunk_tokens):
    # 37 rows: chunks of 4 and 7 leave a short last chunk; 37 is one chunk; 100 is more than N
    inputs = _inputs(37, 50, 12, scale=3.0)
    got, ref = _run(fused(chunk_tokens), *inputs), _run(plain, *inputs)
    assert got[0].dtype == torch.float64
    for what, a, b in zip(("logprobs", "grad hidden", "grad weight"), got, ref):
        assert _max_diff(a, b) < TOL, f"{what}: {_max_diff(a, b):.3e}"


def test_no_rows_give_empty_logprobs_and_zero_gradients():
    hidden, weight, targets, upstream = _inputs(0, 50, 12)
    logprobs, grad_hidden, grad_weight = _run(fused(4), hidden, weight, targets, upstream)
    assert logprobs.shape == (0,) and grad_hidden.shape == (0, 12)
    assert grad_weight.shape == (50, 12) and not grad_weight.any()


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_a_frozen_input_gets_no_gradient_and_the_other_the_right_one(frozen):
    inputs = _inputs(19, 30, 8)
    flags = {"grad_hidden": frozen != "hidden", "grad_weight": frozen != "weight"}
    got, ref = _run(fused(5), *inputs, **flags), _run(plain, *inputs, **flags)
    skipped, computed = (1, 2) if frozen == "hidden" else (2, 1)
    assert got[skipped] is None
    assert _max_diff(got[computed], ref[computed]) < TOL
    assert _max_diff(got[0], ref[0]) < TOL


def test_output_head_token_logprobs_is_the_fused_path_and_logits_stay_whole(monkeypatch):
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_LOGITS", 4 * 50)  # 4 rows a chunk
    hidden, weight, targets, upstream = _inputs(23, 50, 12)
    head = OutputHead(12, 50, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    assert _max_diff(head.logits(hidden), hidden @ weight.T) < TOL
    x = hidden.clone().requires_grad_()
    with LargestTensor() as seen:
        logprobs = head.token_logprobs(x, targets)
        (logprobs * upstream).sum().backward()
    assert seen.numel < 23 * 50, seen.shape
    ref = _run(plain, hidden, weight, targets, upstream)
    for a, b in zip((logprobs.detach(), x.grad, head.weight.grad), ref):
        assert _max_diff(a, b) < TOL


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward run under it)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def test_the_fused_path_never_makes_a_tensor_as_large_as_the_logits():
    # N*V = 76,800 logits; a chunk's are 8*256 = 2,048, more than the weight (1,024) or hidden (1,200).
    n, v, h, chunk = 300, 256, 4, 8
    hidden, weight, targets, upstream = _inputs(n, v, h)
    with LargestTensor() as seen:
        _run(fused(chunk), hidden, weight, targets, upstream)
    assert seen.shape == (chunk, v)
    with LargestTensor() as seen:  # the detector catches the plain path's logits
        _run(plain, hidden, weight, targets, upstream)
    assert seen.numel >= n * v, seen.shape


def test_the_fused_path_holds_one_chunk_of_logits_at_a_time():
    # fp64: a chunk's logits are 8 x 2048 x 8 B = 128 KiB, all the row's 300 x 2048 x 8 B = 4.7 MiB.
    n, v, h, chunk = 300, 2048, 4, 8
    hidden, weight, targets, upstream = _inputs(n, v, h)
    hidden.requires_grad_()
    weight.requires_grad_()
    with LiveTensors(hidden, weight, targets, upstream) as live:
        (linear_token_logprobs(hidden, weight, targets, chunk_tokens=chunk) * upstream).sum().backward()
    grads, one_chunk, rows = (n + v) * h * 8, chunk * v * 8, n * 8
    # the gradients, one chunk's logits and a handful of (N,) vectors (statistics, targets, masks)
    assert live.peak <= grads + one_chunk + 8 * rows, (live.peak, grads, one_chunk)


def test_the_default_chunk_holds_chunk_logits_elements(monkeypatch):
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_LOGITS", 1000)
    hidden, weight, targets, _ = _inputs(100, 64, 4)
    with LargestTensor() as seen:
        linear_token_logprobs(hidden, weight, targets)
    assert seen.shape == (1000 // 64, 64)
    assert CHUNK_LOGITS // 151_936 == 441  # the real default: 441 rows, 256 MB of fp32 logits


def test_bf16_inputs_are_close_to_the_fp32_reference_with_fp32_statistics():
    """Same values in bf16 and fp32. A bf16 logit carries a relative rounding error of at most
    2^-9, so log p = z_t - logsumexp(z) moves by at most 2 * max|z| * 2^-9: that is the bound
    asserted on the log-probs. Gradients: every factor of (onehot - softmax) @ W is rounded to
    bf16 once or twice, and the softmax moves by the logit error above; 2^-6 of the gradient's
    largest entry covers it (measured about 2^-9)."""
    hidden, weight, targets, upstream = _inputs(64, 300, 32, dtype=torch.bfloat16, scale=0.3)
    got = _run(fused(10), hidden, weight, targets, upstream)
    ref = _run(plain, hidden.double(), weight.double(), targets, upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    max_logit = (hidden.double() @ weight.double().T).abs().max().item()
    assert _max_diff(got[0].double(), ref[0]) <= 2 * max_logit * 2**-9
    for a, b in zip(got[1:], ref[1:]):
        assert _max_diff(a.double(), b) <= 2**-6 * b.abs().max().item()
    unfused = _run(plain, hidden, weight, targets, upstream)  # what the head computed before
    assert _max_diff(got[0], unfused[0]) <= 2 * max_logit * 2**-9


def test_bf16_weight_gradient_is_summed_over_chunks_in_fp32():
    """1,024 chunks of 2 rows, each adding a small, mostly same-signed piece to every entry of
    the weight gradient: summed in bf16 the sum stops growing once it is ~2^8 pieces large;
    summed in fp32 and rounded once it stays within bf16's rounding of the exact sum."""
    n, v, h, chunk = 2048, 4, 4, 2
    gen = torch.Generator().manual_seed(1)
    hidden = (1 + 0.1 * torch.randn(n, h, generator=gen)).to(torch.bfloat16)
    weight = (0.1 * torch.randn(v, h, generator=gen)).to(torch.bfloat16)
    targets = torch.zeros(n, dtype=torch.long)  # every row pulls the same way
    upstream = torch.rand(n, generator=gen, dtype=torch.float64)
    _, _, grad_weight = _run(fused(chunk), hidden, weight, targets, upstream, grad_hidden=False)
    _, _, exact = _run(plain, hidden.double(), weight.double(), targets, upstream, grad_hidden=False)
    tol = 2**-7 * exact.abs().max().item()
    assert _max_diff(grad_weight.double(), exact) <= tol

    # The test has teeth: the same per-chunk pieces summed in bf16 miss by far more.
    logits = (hidden.double() @ weight.double().T)
    dz = (F.one_hot(targets, v) - logits.softmax(-1)) * upstream[:, None]
    bf16_sum = torch.zeros(v, h, dtype=torch.bfloat16)
    for s in range(0, n, chunk):
        bf16_sum += (dz[s:s + chunk].to(torch.bfloat16).T @ hidden[s:s + chunk])
    assert _max_diff(bf16_sum.double(), exact) > 10 * tol


def test_autocast_runs_the_backward_matmuls_in_the_autocast_dtype():
    """fp32 weights under bf16 autocast (``train.precision: auto``): the forward's logits and the
    backward's recomputed logits and gradients are bf16 matmuls, the gradients come back fp32,
    close to the unfused head under the same autocast."""
    hidden, weight, targets, upstream = _inputs(40, 64, 16, dtype=torch.float32, scale=0.3)

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    def under_autocast(fn):
        def run(h, w, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w, t)
        return run

    with MatmulDtypes() as seen:
        got = _run(under_autocast(fused(7)), hidden, weight, targets, upstream)
    assert seen.dtypes == {torch.bfloat16}
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    ref = _run(under_autocast(plain), hidden, weight, targets, upstream)
    for a, b in zip(got, ref):
        assert _max_diff(a, b) <= 2**-6 * b.abs().max().item()


class Matmuls(TorchDispatchMode):
    """Counts the (V, H)-sized matmuls: forward logits, backward recompute, grad hidden, grad weight."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_tokens, matmuls", [(37, 3), (100, 3), (10, 4 + 3 * 4)])
def test_rows_in_one_chunk_reuse_the_forward_softmax_instead_of_recomputing_the_logits(chunk_tokens, matmuls):
    # 37 rows in one chunk: logits once (forward), then grad hidden and grad weight = 3 matmuls.
    # Chunks of 10 (4 chunks): 4 forward logits, then per chunk a recompute and the two gradients.
    inputs = _inputs(37, 50, 12, scale=3.0)
    with Matmuls() as seen:
        got = _run(fused(chunk_tokens), *inputs)
    assert seen.count == matmuls
    ref = _run(plain, *inputs)
    for a, b in zip(got, ref):
        assert _max_diff(a, b) < TOL


def test_a_second_backward_through_a_kept_softmax_recomputes_and_gives_the_same_gradients():
    hidden, weight, targets, upstream = _inputs(37, 50, 12, scale=3.0)
    hidden.requires_grad_()
    loss = (linear_token_logprobs(hidden, weight, targets) * upstream).sum()
    first, = torch.autograd.grad(loss, hidden, retain_graph=True)
    second, = torch.autograd.grad(loss, hidden)
    assert _max_diff(first, second) < TOL
    assert _max_diff(first, _run(plain, hidden.detach(), weight, targets, upstream)[1]) < TOL
