"""The layout of a run: the recipe's ``parallel`` section (``torchrun ... -m keyetron.train``
flags override its sizes), and the one check of a layout against a model and a world size."""
from __future__ import annotations

from dataclasses import dataclass

from keyetron.config import ConfigError

SHARDINGS = ("zero1", "zero2", "fsdp2", "none")  # LLM optimizer state (zero1), + gradients (zero2), + weights (fsdp2)
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _choices(values: list[int]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])


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

    @property
    def processes(self) -> int:
        """The fewest processes the layout runs on (dp 0 counts as 1)."""
        return self.pp * self.cp * self.tp * max(self.dp, 1)

    def check(self, model_cfg, grad_accum: int, world_size: int | None = None) -> None:
        """Raise ConfigError, naming the recipe key, its value and what to choose instead, for
        whatever the layout code would refuse only after the processes started: the split of
        ``model_cfg``'s heads, vocabulary and layers, the micro-batches a pipeline needs
        (``grad_accum``: train.grad_accum) and, when ``world_size`` is given, the world."""
        self.check_model(model_cfg, grad_accum)
        if world_size is not None:
            self.check_world(world_size)

    def check_model(self, model_cfg, grad_accum: int) -> None:
        """The checks of ``check`` that need no world size (``model_cfg``: a KeyeConfig)."""
        text, name = model_cfg.text, model_cfg.name
        heads, kv, vocab = text.num_heads, text.num_kv_heads, text.vocab_size
        if self.tp > 1:
            # tensor_parallel.apply_tensor_parallel's rules: heads split, KV heads split or replicated, vocabulary split
            fits = [t for t in range(1, heads + 1)
                    if heads % t == 0 and (kv % t == 0 or t % kv == 0) and vocab % t == 0]
            numbers = f"model config {name!r} has num_heads {heads}, num_kv_heads {kv}, vocab_size {vocab}"
            advice = f"choose parallel.tp from {_choices(fits)}"
            if heads % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} does not divide the attention heads: {numbers}; {advice}")
            if kv % self.tp and self.tp % kv:
                raise ConfigError(f"parallel.tp={self.tp} and num_kv_heads {kv}: one must divide the other (KV heads "
                                  f"are split over tp, or each is replicated on tp/num_kv_heads ranks): {numbers}; "
                                  f"{advice}")
            if vocab % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} does not divide the vocabulary (the embedding and head are "
                                  f"split on it): {numbers}; {advice}")
        if self.pp > 1:
            self._check_pipeline(text.num_layers, name, grad_accum)

    def _check_pipeline(self, num_layers: int, name: str, grad_accum: int) -> None:
        stages = self.pp * self.virtual_stages
        if stages > num_layers:
            what = (f"parallel.pp={self.pp} x parallel.virtual_stages={self.virtual_stages} = {stages} pipeline "
                    f"stages" if self.virtual_stages > 1 else f"parallel.pp={self.pp} pipeline stages")
            raise ConfigError(f"{what} for the {num_layers} decoder layers of model config {name!r} (num_layers "
                              f"{num_layers}): every stage needs a layer; choose pp x virtual_stages <= {num_layers}")
        if self.stage_layers is not None and (
                len(self.stage_layers) != stages
                or sorted(i for chunk in self.stage_layers for i in chunk) != list(range(num_layers))):
            raise ConfigError(f"parallel.stage_layers {self.stage_layers}: give {stages} lists (pp x virtual_stages) "
                              f"of decoder layers that together hold 0..{num_layers - 1} of model config {name!r} "
                              f"once, or leave it out (balanced)")
        if self.sharding == "fsdp2":
            raise ConfigError(f"parallel.sharding=fsdp2 with parallel.pp={self.pp}: FSDP2 with pipeline stages is not "
                              "supported yet; use parallel.sharding zero1, zero2 or none, or parallel.pp=1")
        if grad_accum < self.pp:
            raise ConfigError(f"train.grad_accum={grad_accum} with parallel.pp={self.pp}: a pipeline of {self.pp} "
                              f"stages needs at least {self.pp} packed rows (micro-batches) per step and data-parallel "
                              f"rank; set train.grad_accum to {self.pp} or more, or lower parallel.pp")
        rounds = max(1, grad_accum // self.pp)  # torch's Interleaved1F1B runs the micro-batches in equal rounds
        if self.schedule == "interleaved" and grad_accum % rounds:
            raise ConfigError(f"train.grad_accum={grad_accum} with parallel.schedule=interleaved and parallel.pp="
                              f"{self.pp}: the interleaved schedule needs a multiple of grad_accum // pp = {rounds} "
                              f"micro-batches; set train.grad_accum to a multiple of {self.pp} (e.g. "
                              f"{rounds * self.pp})")

    def check_world(self, world_size: int) -> None:
        """The layout fits ``world_size`` processes (``keyetron.parallel.topology.ParallelDims.resolve``'s rule)."""
        model = self.pp * self.cp * self.tp
        product = f"parallel.pp x cp x tp = {self.pp} x {self.cp} x {self.tp} = {model}"
        if self.dp == 0 and world_size % model:
            raise ConfigError(f"{product} does not divide the {world_size} processes; start a multiple of {model} "
                              f"processes or choose a layout whose product divides {world_size}")
        if self.dp and self.dp * model != world_size:
            raise ConfigError(f"parallel.dp={self.dp} x ({product}) needs {self.dp * model} processes, the world has "
                              f"{world_size}; set parallel.dp=0 (dp is then what the world leaves) or start "
                              f"{self.dp * model} processes")


__all__ = ["SCHEDULES", "SHARDINGS", "ParallelConfig"]
