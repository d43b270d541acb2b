"""The one topology object: the ("pp", "dp", "cp", "tp") device mesh and every group question.

Rank order is Megatron's: tensor-parallel ranks are adjacent (they exchange the most
data, so they share a node), then context, then data, with pipeline stages outermost.
A rank's coordinates follow from ``rank = ((pp * DP + dp) * CP + cp) * TP + tp``.

The ViT is pure data-parallel and lives on pipeline stage 0: its replicas are every rank
of stage 0 (dp x cp x tp of them), and its gradients are averaged over that group.
LLM gradients are reduced over dp x cp (context-parallel ranks hold the same weights and
see different tokens), and ZeRO-1 shards optimizer state over that same group.

Nothing here is global: build one ``Topology`` and pass it to whoever needs a group.
A world of one process needs no process group at all (``Topology.single()``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

DIMS = ("pp", "dp", "cp", "tp")
COMBINED = (("dp", "cp"), ("cp", "tp"), ("dp", "cp", "tp"))


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each dimension; ``dp=0`` means "whatever the world size leaves"."""

    pp: int = 1
    dp: int = 0
    cp: int = 1
    tp: int = 1

    def resolve(self, world_size: int) -> ParallelDims:
        for name in ("pp", "cp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        model = self.pp * self.cp * self.tp
        if self.dp == 0:
            if world_size % model:
                raise ValueError(f"world size {world_size} is not divisible by pp*cp*tp = {self.pp}*{self.cp}*{self.tp} "
                                 f"= {model}; change the layout or the number of processes")
            return ParallelDims(self.pp, world_size // model, self.cp, self.tp)
        if self.dp * model != world_size:
            raise ValueError(f"layout pp{self.pp} x dp{self.dp} x cp{self.cp} x tp{self.tp} needs "
                             f"{self.dp * model} processes, the world has {world_size}")
        return self

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def __str__(self) -> str:
        return "x".join(f"{n.upper()}{getattr(self, n)}" for n in DIMS if getattr(self, n) > 1) or "single"


def coordinates(rank: int, dims: ParallelDims) -> dict[str, int]:
    """(pp, dp, cp, tp) of a global rank under Megatron's order."""
    out = {}
    for name in reversed(DIMS):
        size = getattr(dims, name)
        out[name] = rank % size
        rank //= size
    return {n: out[n] for n in DIMS}


def ranks_of(dims: ParallelDims, vary: tuple[str, ...], fixed: dict[str, int]) -> list[int]:
    """Global ranks whose coordinates equal ``fixed`` on the other dims, in rank order."""
    return [r for r in range(dims.world_size)
            if all(coordinates(r, dims)[n] == fixed[n] for n in DIMS if n not in vary)]


class Topology:
    """Where this process sits in the mesh, and the groups it talks to."""

    def __init__(self, dims: ParallelDims, rank: int, device: torch.device, mesh=None):
        self.dims = dims
        self.rank = rank
        self.device = torch.device(device)
        self.mesh = mesh
        self.coords = coordinates(rank, dims)
        self._groups: dict[tuple[str, ...], object] = {}

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Topology:
        return cls(ParallelDims(1, 1, 1, 1), 0, torch.device(device))

    @classmethod
    def from_process_group(cls, dims: ParallelDims, device: torch.device | str) -> Topology:
        """Build the mesh over an initialised default process group (torchrun / SLURM set it up)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        dims = dims.resolve(world)
        device = torch.device(device)
        mesh = init_device_mesh(device.type, tuple(getattr(dims, n) for n in DIMS), mesh_dim_names=DIMS)
        topo = cls(dims, dist.get_rank(), device, mesh)
        expected = coordinates(topo.rank, dims)
        got = {n: mesh.get_local_rank(n) for n in DIMS}
        assert got == expected, (got, expected)  # the mesh and our rank arithmetic must agree
        topo._make_combined_groups()
        return topo

    # -- coordinates --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def cp_rank(self) -> int:
        return self.coords["cp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def is_first_stage(self) -> bool:
        return self.coords["pp"] == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pp"] == self.dims.pp - 1

    # -- groups ---------------------------------------------------------------------------------
    def ranks(self, *vary: str) -> list[int]:
        """The ranks that differ from this one only along ``vary`` (e.g. ``ranks("dp", "cp")``)."""
        return ranks_of(self.dims, vary, self.coords)

    def group(self, *vary: str):
        """The process group along ``vary`` (None in a single process): one dim (``"tp"``), or
        one of ``COMBINED`` (``("dp", "cp")``: LLM gradient reduction and ZeRO-1;
        ``("cp", "tp")``: the ranks sharing a micro-batch; ``("dp", "cp", "tp")``: the ViT
        replicas of a stage)."""
        if not self.distributed:
            return None
        key = tuple(n for n in DIMS if n in vary)
        if len(key) == 1:
            return self.mesh.get_group(key[0])
        if key not in self._groups:
            raise KeyError(f"no process group along {key}; combined groups are {COMBINED}")
        return self._groups[key]

    def _make_combined_groups(self) -> None:
        # Every rank must create every group in the same order, so they are made eagerly here.
        for key in COMBINED:
            seen, enumeration = set(), []
            for r in range(self.world_size):
                members = tuple(ranks_of(self.dims, key, coordinates(r, self.dims)))
                if members not in seen:
                    seen.add(members)
                    enumeration.append(list(members))
            mine, _ = dist.new_subgroups_by_enumeration(enumeration)
            self._groups[key] = mine

    def submesh(self, *names: str):
        return self.mesh[names if len(names) > 1 else names[0]] if self.mesh is not None else None

    def __repr__(self) -> str:
        coords = " ".join(f"{n}{self.coords[n]}/{getattr(self.dims, n)}" for n in DIMS)
        return f"Topology(rank {self.rank}/{self.world_size}: {coords}, {self.device})"


__all__ = ["COMBINED", "DIMS", "ParallelDims", "Topology", "coordinates", "ranks_of"]
