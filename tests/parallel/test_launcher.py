"""The multi-process test launcher itself: results come back by rank, failures name the rank."""
import pytest
import torch
import torch.distributed as dist

from distributed import RankFailure, run_ranks


def _sum_ranks(rank, world, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t) * scale


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_results_come_back_by_rank():
    assert run_ranks(3, _sum_ranks, 2.0) == [6.0, 6.0, 6.0]


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailure, match="rank 1 ---(.|\n)*rank one is broken"):
        run_ranks(2, _fail_on_one, timeout=60)
