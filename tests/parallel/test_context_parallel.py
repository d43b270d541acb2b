"""Context parallelism: the plan's bookkeeping, and CP attention / the whole tiny model equal
to single-process attention / training on the same packed row (fp64)."""
import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from keyetron.backend.attention import varlen_attention
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.model import build_model
from keyetron.objectives import LanguageModelObjective
from keyetron.parallel.context_parallel import ContextParallelAttention, gather_tokens, plan_context_parallel
from keyetron.parallel.parallelize import parallelize_keye
from keyetron.parallel.topology import ParallelDims, Topology
from synthetic import make_document


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def doc_of_token(lens):
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))


# -- the plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_every_token_is_on_exactly_one_rank_and_ranks_are_padded_equal(cp):
    lens = [40, 5, 9, 7, 3, 26, 11, 1]
    plan = plan_context_parallel(cu(lens), cp)
    held = torch.cat([s.token_index for s in plan.shards])
    assert sorted(held.tolist()) == list(range(sum(lens)))
    assert plan.local_len == max(s.num_tokens for s in plan.shards)
    x = torch.arange(sum(lens))
    parts = [plan.shard_tokens(x, r, pad_value=-1) for r in range(cp)]
    assert all(p.shape == (plan.local_len,) for p in parts)
    assert all((p == -1).sum() == plan.padding(r) for r, p in enumerate(parts))
    assert torch.equal(plan.unshard(parts), x)
    assert plan_context_parallel(cu(lens), cp, pad_multiple=8).local_len % 8 == 0


def test_long_documents_are_split_zigzag_and_short_ones_stay_whole():
    lens = [37, 5, 26, 9, 7, 3, 11]  # row 98, cp 4: documents over 24 tokens are split
    cp, starts = 4, cu(lens).tolist()
    plan = plan_context_parallel(cu(lens), cp)
    assert plan.split_documents == (0, 2)
    doc = doc_of_token(lens)
    for d in (0, 2):
        edges = [0]  # 2*cp equal-ish chunks
        for c in range(2 * cp):
            edges.append(edges[-1] + lens[d] // (2 * cp) + (c < lens[d] % (2 * cp)))
        for r, shard in enumerate(plan.shards):
            mine = shard.token_index[doc[shard.token_index] == d] - starts[d]
            want = list(range(edges[r], edges[r + 1])) + list(range(edges[2 * cp - 1 - r], edges[2 * cp - r]))
            assert mine.tolist() == want, (d, r)
            chunk_segments = [s for s in shard.segments if s.key_start == starts[d]]
            assert [s.key_end - starts[d] for s in chunk_segments] == [edges[r + 1], edges[2 * cp - r]]
    for d in (1, 3, 4, 5, 6):
        owners = [r for r, s in enumerate(plan.shards) if (doc[s.token_index] == d).any()]
        assert len(owners) == 1
        segment = [s for s in plan.shards[owners[0]].segments if s.key_start == starts[d]]
        assert [(s.key_end - s.key_start, s.query_end - s.query_start) for s in segment] == [(lens[d], lens[d])]


def test_zigzag_gives_every_rank_the_same_causal_work_of_a_long_document():
    plan = plan_context_parallel(cu([64]), 4, linear_weight=0.0)
    assert len({s.cost for s in plan.shards}) == 1
    contiguous = [(q1 * (q1 + 1) - q0 * (q0 + 1)) // 2 for q0, q1 in ((0, 16), (16, 32), (32, 48), (48, 64))]
    assert max(contiguous) / min(contiguous) > 6  # what a plain sequence split would cost


@pytest.mark.parametrize("linear_weight", [0.0, 2000.0])
def test_short_documents_balance_the_attention_work(linear_weight):
    g = torch.Generator().manual_seed(0)
    lens = [8000] + torch.randint(20, 600, (40,), generator=g).tolist()
    plan = plan_context_parallel(cu(lens), 4, linear_weight=linear_weight)
    costs = [s.cost for s in plan.shards]
    assert plan.split_documents == (0,)
    assert max(costs) / (sum(costs) / len(costs)) < 1.01, costs
    lengths = torch.tensor(lens, dtype=torch.float64)  # every document's cost counted exactly once
    assert sum(costs) == pytest.approx(float((lengths * (lengths + 1) / 2 + linear_weight * lengths).sum()))


def test_a_fixed_local_len_is_respected_or_refused_with_the_numbers():
    lens = [40, 5, 9, 7, 3]
    plan = plan_context_parallel(cu(lens), 2, local_len=40)
    assert plan.local_len == 40 and max(s.num_tokens for s in plan.shards) <= 40
    # no rank has room for the last (smallest) whole document: it is zigzag-split instead
    spread = plan_context_parallel(cu([20, 21, 23]), 2, local_len=33)
    assert len(spread.split_documents) == 1 and max(s.num_tokens for s in spread.shards) <= 33
    with pytest.raises(ValueError, match="local_len is 31"):  # 64 tokens cannot fit in 2 x 31
        plan_context_parallel(cu([20, 21, 23]), 2, local_len=31)


def test_a_local_batch_has_ignored_targets_on_padding():
    lens = [40, 5, 9, 7, 2]
    T = sum(lens)
    batch = PackedBatch(torch.arange(T) + 10, torch.arange(T).repeat(3, 1), cu(lens), torch.arange(T) + 11)
    plan = plan_context_parallel(batch.cu_seqlens, 2)
    for r in range(2):
        local = plan.shard_batch(batch, r)
        n = plan.shards[r].num_tokens
        assert local.num_tokens == plan.local_len and (local.targets[n:] == IGNORE_INDEX).all()
        assert torch.equal(local.targets[:n], batch.targets[plan.shards[r].token_index])
        assert torch.equal(local.position_ids[:, :n], batch.position_ids[:, plan.shards[r].token_index])
    assert sum(plan.shard_batch(batch, r).num_loss_tokens for r in range(2)) == T


# -- attention -------------------------------------------------------------------------------------
def packed_qkv(lens, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v, w = (torch.randn(T, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    return q, k, v, w  # w weights the output so every output element gets its own gradient


def _cp_attention(rank, world, lens):
    q, k, v, w = packed_qkv(lens)
    plan = plan_context_parallel(cu(lens), world)
    attn = ContextParallelAttention(plan, rank, dist.group.WORLD)
    # Padding holds large junk: if it leaked into real tokens the comparison would fail.
    local = [plan.shard_tokens(t, rank, pad_value=50.0).requires_grad_() for t in (q, k, v)]
    out = attn.attend(*local)
    (out * plan.shard_tokens(w, rank, pad_value=0.0)).sum().backward()
    full_out = gather_tokens(plan, out.detach(), dist.group.WORLD)  # the gather helper, on every rank
    return [out.detach()] + [t.grad for t in local] + [full_out]


@pytest.mark.parametrize("cp,lens", [(2, [40, 5, 9, 7, 2]), (4, [37, 5, 26, 9, 7, 3, 11])])
def test_cp_attention_equals_full_attention_forward_and_gradients(cp, lens):
    q, k, v, w = (t.requires_grad_() for t in packed_qkv(lens))
    ref = varlen_attention(q, k, v, cu(lens), causal=True)
    (ref * w).sum().backward()
    results = run_ranks(cp, _cp_attention, lens)
    plan = plan_context_parallel(cu(lens), cp)
    assert len(plan.split_documents) >= 1 and len(set(s.num_tokens for s in plan.shards)) > 1  # padding used
    for i, want in enumerate((ref, q.grad, k.grad, v.grad)):
        got = plan.unshard([r[i] for r in results])
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
    for r in results:
        torch.testing.assert_close(r[4], ref.detach(), rtol=0, atol=1e-12)


def test_a_single_rank_without_a_group_is_plain_varlen_attention():
    lens = [12, 5, 9]
    q, k, v, _ = packed_qkv(lens)
    plan = plan_context_parallel(cu(lens), 1)
    assert plan.padding(0) == 0 and torch.equal(plan.shards[0].token_index, torch.arange(sum(lens)))
    out = ContextParallelAttention(plan, 0).attend(q, k, v)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu(lens), causal=True), rtol=0, atol=0)


# -- the whole tiny model ------------------------------------------------------------------------
def tiny_row(cfg):
    """A long document with an image (split across CP ranks, image tokens included) and short ones."""
    g = torch.Generator().manual_seed(0)
    docs = [make_document(cfg, g, text=14, images=[(8, 8)], sample_id="long"),
            make_document(cfg, g, text=5, sample_id="text"),
            make_document(cfg, g, text=4, images=[(4, 4)], sample_id="image"),
            make_document(cfg, g, text=3, sample_id="short")]
    return PackedBatch.from_documents(docs)


def _tiny_model_cp(rank, world, model, batch, ref_loss, ref_grads):
    topo = Topology.from_process_group(ParallelDims(cp=world), "cpu")
    group = topo.group("cp")
    par = parallelize_keye(model, topo)  # CP attention and the ViT shared over the CP ranks
    local = par.slicer(batch)  # this rank's slice of the row
    plan = local.attention.plan
    loss = LanguageModelObjective()(model(local), local)
    loss.loss_sum.backward()
    total = loss.loss_sum.detach().clone()
    dist.all_reduce(total, group=group)
    worst, with_grad = 0.0, 0
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=group)  # CP ranks hold the same weights, each a partial gradient
        worst = max(worst, float((grad - ref_grads[name]).abs().max()))
        with_grad += bool(ref_grads[name].abs().sum() > 0)
    return abs(float(total) - ref_loss), worst, with_grad, plan.split_documents


def test_tiny_model_under_cp2_equals_the_single_process_loss_and_gradients(tiny_cfg):
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    batch = tiny_row(tiny_cfg)
    loss = LanguageModelObjective()(model(batch), batch).loss_sum
    loss.backward()
    loss = float(loss.detach())
    ref_grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for loss_diff, grad_diff, with_grad, split in run_ranks(2, _tiny_model_cp, model, batch, loss, ref_grads):
        assert split == (0,)
        assert with_grad == len(ref_grads)  # ViT, projector and LLM weights all compared
        assert loss_diff < 1e-10 and grad_diff < 1e-10, (loss_diff, grad_diff)
