"""Vocabulary-parallel fused log-probabilities over 2 gloo ranks equal the single-process plain
cross-entropy (fp64): log-probs on every rank, each rank's slice of the weight gradient, and
the hidden gradient summed over the ranks exactly once, both through ``linear_token_logprobs``
with the group and through the real ``VocabParallelHead``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed import run_ranks

TOL = 1e-10
TP = 2
N, V, H = 37, 50, 12
CASES = {  # name: (rows, chunk rows)
    "chunk 4 leaves a short last chunk": (N, 4),
    "one chunk larger than the rows": (N, 100),
    "no rows": (0, 4),
}


def _inputs(n: int):
    gen = torch.Generator().manual_seed(n)
    hidden = 3 * torch.randn(n, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (n,), generator=gen)  # in both ranks' slices
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, upstream


def _reference(hidden, weight, targets, upstream):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs = -F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


def _diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _rank(rank, world, cases):
    import torch.distributed as dist

    from keyetron.model import linear_cross_entropy
    from keyetron.model.linear_cross_entropy import linear_token_logprobs
    from keyetron.model.llm import OutputHead
    from keyetron.parallel.tensor_parallel import VocabParallelHead
    from keyetron.parallel.topology import ParallelDims, Topology

    mesh = Topology.from_process_group(ParallelDims(tp=world), "cpu").submesh("tp")
    group = mesh.get_group()
    v_local = V // world
    mine = slice(rank * v_local, (rank + 1) * v_local)
    diffs = {}
    for name, (chunk, (hidden, weight, targets, upstream), (ref_lp, ref_gh, ref_gw)) in cases.items():
        # The function with the group: the hidden gradient is this rank's part; the caller sums it.
        h, w = hidden.clone().requires_grad_(), weight[mine].clone().requires_grad_()
        logprobs = linear_token_logprobs(h, w, targets, chunk_tokens=chunk, group=group, vocab_start=rank * v_local)
        (logprobs * upstream).sum().backward()
        summed = h.grad.clone()
        dist.all_reduce(summed, group=group)
        diffs[f"{name}: function log-probs"] = _diff(logprobs.detach(), ref_lp)
        diffs[f"{name}: function hidden grad summed over ranks"] = _diff(summed, ref_gh)
        diffs[f"{name}: function weight grad slice"] = _diff(w.grad, ref_gw[mine])

        # The real head: its forward sums the hidden gradient over the ranks once.
        linear_cross_entropy.CHUNK_LOGITS = chunk * v_local  # ``chunk`` rows a chunk
        head = OutputHead(H, V, bias=False).double()
        with torch.no_grad():
            head.weight.copy_(weight)
        head = VocabParallelHead(head, mesh)
        x = hidden.clone().requires_grad_()
        logprobs = head.token_logprobs(x, targets)
        (logprobs * upstream).sum().backward()
        diffs[f"{name}: head log-probs"] = _diff(logprobs.detach(), ref_lp)
        diffs[f"{name}: head hidden grad"] = _diff(x.grad, ref_gh)
        diffs[f"{name}: head weight grad slice"] = _diff(head.weight.grad.to_local(), ref_gw[mine])
        if hidden.shape[0]:  # the rank's own part alone is not the gradient: the sum above is needed
            assert _diff(h.grad, ref_gh) > 1e-3
    return diffs


def test_vocabulary_parallel_fused_logprobs_equal_the_single_process_plain_loss():
    cases = {}
    for name, (n, chunk) in CASES.items():
        inputs = _inputs(n)
        assert n == 0 or ((inputs[2] < V // TP).any() and (inputs[2] >= V // TP).any())  # targets on both ranks
        cases[name] = (chunk, inputs, _reference(*inputs))
    for rank, diffs in enumerate(run_ranks(TP, _rank, cases)):
        for what, diff in diffs.items():
            assert diff < TOL, f"rank {rank} {what}: max abs diff {diff:.3e}"

