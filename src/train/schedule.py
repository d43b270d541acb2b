"""Learning-rate schedules as plain functions of the step, for ``torch.optim.lr_scheduler.LambdaLR``.

Each schedule returns a multiplier in [0, 1] of the peak learning rate. Plain functions
(not scheduler subclasses) keep them trivially testable and checkpoint-free: the step
alone determines the value, so resuming only needs the step.

Step convention: ``LambdaLR`` evaluates the function at 0 for the first optimizer update,
so update k (0-based) is the (k+1)-th. Warmup ramps linearly over the first
``warmup_steps`` updates, reaching the peak exactly at update ``warmup_steps`` (no update
is wasted at lr 0); decay ends exactly at ``min_lr_ratio`` on the last update
(``total_steps``); later steps stay there.

- ``cosine``: half a cosine from the peak to ``min_lr_ratio`` over the steps after warmup.
- ``wsd`` (warmup-stable-decay): constant after warmup, then the last ``decay_fraction`` of
  all steps decays to ``min_lr_ratio``, ``linear`` or ``1-sqrt`` (Hägele et al., arXiv
  2405.18392, found 1-sqrt the better cooldown). A run can be extended or branched from
  any checkpoint of the plateau, which is why long pretraining runs use it.
- ``constant``: the peak after warmup (``min_lr_ratio`` and the decay fields are unused).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr / peak lr
    decay_fraction: float = 0.2  # wsd: share of all steps spent decaying
    decay_shape: str = "linear"  # wsd: "linear" or "1-sqrt"

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule name {self.name!r} is not one of {list(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"schedule decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"schedule decay_shape {self.decay_shape!r} is not one of {list(DECAY_SHAPES)}")


def _decayed(progress: float, min_lr_ratio: float, shape: str) -> float:
    """Multiplier at ``progress`` in [0, 1] of a decay from 1 to ``min_lr_ratio``."""
    if shape == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif shape == "linear":
        remaining = 1.0 - progress
    else:  # "1-sqrt"
        remaining = 1.0 - math.sqrt(progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining


def lr_lambda(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak lr at each 0-based step, for ``LambdaLR(optimizer, lr_lambda(cfg, n))``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = cfg.warmup_steps
    if warmup > total_steps or (warmup == total_steps and cfg.name != "constant"):
        raise ValueError(f"schedule warmup_steps {warmup} must be below total_steps {total_steps} (at most equal "
                         f"for 'constant'): lower warmup_steps or train longer")

    if cfg.name == "constant":
        def constant(step: int) -> float:
            done = step + 1
            return done / warmup if done < warmup else 1.0
        return constant

    if cfg.name == "cosine":
        def cosine(step: int) -> float:
            done = step + 1
            if done < warmup:
                return done / warmup
            progress = min(1.0, (done - warmup) / (total_steps - warmup))
            return _decayed(progress, cfg.min_lr_ratio, "cosine")
        return cosine

    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if decay_start < warmup:
        raise ValueError(
            f"wsd schedule: warmup_steps {warmup} + decay steps {decay_steps} (decay_fraction {cfg.decay_fraction} "
            f"of total_steps {total_steps}) exceed total_steps; lower warmup_steps or decay_fraction")

    def wsd(step: int) -> float:
        done = step + 1
        if done < warmup:
            return done / warmup
        if done <= decay_start:
            return 1.0
        progress = min(1.0, (done - decay_start) / decay_steps)
        return _decayed(progress, cfg.min_lr_ratio, cfg.decay_shape)
    return wsd
