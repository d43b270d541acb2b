"""The layout of a run: the recipe's ``parallel`` section (``torchrun ... -m keyetron.train``
flags override its sizes)."""
from __future__ import annotations

from dataclasses import dataclass

SHARDINGS = ("zero1", "zero2", "fsdp2", "none")  # LLM optimizer state (zero1), + gradients (zero2), + weights (fsdp2)
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 0  # 0: the world size divided by pp * cp * tp
    # zero1 (optimizer state + fp32 masters over dp x cp) | zero2 (gradients too) | fsdp2 (weights too) | none
    sharding: str = "zero1"
    sequence_parallel: bool = True  # with tp > 1
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b | interleaved
    virtual_stages: int = 1  # pipeline stages per rank (interleaved)
    # Decoder layers per pipeline stage (pp x virtual_stages lists); None: balanced, counting the ViT on stage 0
    stage_layers: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.cp, self.virtual_stages) < 1 or self.dp < 0:
            raise ValueError(f"tp, pp, cp, virtual_stages must be >= 1 and dp >= 0, got {self}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding={self.sharding!r}: expected one of {list(SHARDINGS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ValueError(f"virtual_stages {self.virtual_stages} needs the 'interleaved' schedule")


__all__ = ["SCHEDULES", "SHARDINGS", "ParallelConfig"]
