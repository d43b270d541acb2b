"""The optimizer settings of a recipe and how parameters are grouped for AdamW.

Every layout builds its optimizer from these groups (``keyetron.parallel`` wraps them in
ZeRO-1/2, FSDP2 or plain AdamW), so a group's name, learning rate and weight decay are the
same in one process and under any parallel layout, and checkpoints can match groups by name.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

MODULES = ("vit", "projector", "llm")  # the model's parts, as ``optim.lr_scale`` names them


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float | None = 1.0  # max global gradient norm; None disables clipping
    lr_scale: dict[str, float] = field(default_factory=dict)  # per module (vit / projector / llm) lr multiplier

    def __post_init__(self) -> None:
        bad = sorted(set(self.lr_scale) - set(MODULES))
        if bad:
            raise ValueError(f"lr_scale: unknown module(s) {bad}; use {list(MODULES)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def top_level_part(name: str) -> str:
    """The part a parameter belongs to: the first component of its name (``vit``, ``llm``, ...)."""
    return name.split(".")[0]


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], opt: OptimSection, *,
                 part_of=top_level_part, lr_scale: dict[str, float] | None = None,
                 order: tuple[str, ...] | None = None) -> list[dict]:
    """AdamW groups per (part, decay) of the trainable parameters: weight decay on matrices only
    (not on norms, biases or embeddings), the learning rate scaled per part (``lr_scale``,
    default ``opt.lr_scale``). Groups are named ``<part>/decay`` and ``<part>/no_decay`` and
    ordered by ``order`` (default: by name)."""
    scale = opt.lr_scale if lr_scale is None else lr_scale
    groups: dict[tuple[str, bool], list] = {}
    for name, p in named:
        if p.requires_grad:
            decay = p.dim() >= 2 and "embed" not in name
            groups.setdefault((part_of(name), decay), []).append(p)
    if not groups:
        raise ValueError("every parameter is frozen (train.freeze); nothing would train")
    rank = (lambda part: order.index(part)) if order else (lambda part: part)
    return [{"params": ps, "lr": opt.lr * scale.get(part, 1.0),
             "weight_decay": opt.weight_decay if decay else 0.0, "name": f"{part}/{'decay' if decay else 'no_decay'}"}
            for (part, decay), ps in sorted(groups.items(), key=lambda kv: (rank(kv[0][0]), kv[0][1]))]


def optimizer_param_groups(model: torch.nn.Module, opt: OptimSection) -> list[dict]:
    """The model's groups: per (module, decay), decay on matrices only, ``opt.lr_scale`` per module."""
    return param_groups(model.named_parameters(), opt)


__all__ = ["MODULES", "OptimSection", "optimizer_param_groups", "param_groups", "top_level_part"]
