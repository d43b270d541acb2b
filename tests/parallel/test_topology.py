"""The topology: Megatron's rank order, every group from one mesh, nothing global."""
import pytest
import torch.distributed as dist

from distributed import run_ranks
from keyetron.parallel.topology import ParallelDims, Topology, coordinates, ranks_of


def test_rank_order_is_tp_fastest_pp_slowest():
    dims = ParallelDims(pp=2, dp=2, cp=2, tp=2)
    assert coordinates(0, dims) == {"pp": 0, "dp": 0, "cp": 0, "tp": 0}
    assert coordinates(1, dims) == {"pp": 0, "dp": 0, "cp": 0, "tp": 1}
    assert coordinates(2, dims) == {"pp": 0, "dp": 0, "cp": 1, "tp": 0}
    assert coordinates(4, dims) == {"pp": 0, "dp": 1, "cp": 0, "tp": 0}
    assert coordinates(8, dims) == {"pp": 1, "dp": 0, "cp": 0, "tp": 0}
    assert ranks_of(dims, ("tp",), coordinates(5, dims)) == [4, 5]
    assert ranks_of(dims, ("pp",), coordinates(5, dims)) == [5, 13]
    assert ranks_of(dims, ("dp", "cp"), coordinates(1, dims)) == [1, 3, 5, 7]


def test_dims_resolve_infers_dp_and_refuses_bad_layouts():
    assert ParallelDims(pp=2, tp=2).resolve(8) == ParallelDims(2, 2, 1, 2)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims(tp=3).resolve(8)
    with pytest.raises(ValueError, match="needs 8 processes"):
        ParallelDims(pp=2, dp=2, tp=2).resolve(4)
    assert str(ParallelDims(2, 1, 1, 2)) == "PP2xTP2" and str(ParallelDims(1, 1, 1, 1)) == "single"


def _groups(rank, world):
    topo = Topology.from_process_group(ParallelDims(pp=2, cp=1, tp=2), "cpu")
    out = {"coords": topo.coords, "first": topo.is_first_stage, "last": topo.is_last_stage}
    for vary in (("tp",), ("pp",), ("dp",), ("dp", "cp"), ("cp", "tp"), ("dp", "cp", "tp")):
        out[vary] = sorted(dist.get_process_group_ranks(topo.group(*vary)))
        assert out[vary] == topo.ranks(*vary)
    return out


def test_groups_on_eight_ranks_match_the_rank_arithmetic():
    results = run_ranks(8, _groups)
    assert results[5]["coords"] == {"pp": 1, "dp": 0, "cp": 0, "tp": 1}
    assert results[5][("tp",)] == [4, 5] and results[5][("pp",)] == [1, 5]
    assert results[5][("dp",)] == [5, 7] and results[0][("dp", "cp", "tp")] == [0, 1, 2, 3]
    assert [r["first"] for r in results] == [True] * 4 + [False] * 4
    assert [r["last"] for r in results] == [False] * 4 + [True] * 4


def test_single_process_topology_has_no_groups():
    topo = Topology.single()
    assert topo.group("tp") is None and topo.tp_rank == 0 and topo.is_first_stage and topo.is_last_stage
