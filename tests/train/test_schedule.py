"""Learning-rate schedules: warmup endpoints, cosine and WSD shapes, monotonicity, config errors."""
import math

import pytest
import torch

from keyetron.config import ConfigError, from_dict
from keyetron.train.schedule import ScheduleConfig, lr_lambda


def values(cfg: ScheduleConfig, total: int) -> list[float]:
    f = lr_lambda(cfg, total)
    return [f(step) for step in range(total)]


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_warmup_ramps_linearly_to_the_peak_without_a_zero_step(name):
    f = lr_lambda(ScheduleConfig(name=name, warmup_steps=10), total_steps=100)
    assert f(0) == pytest.approx(0.1)  # the first update already moves
    assert [f(k) for k in range(10)] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert f(9) == 1.0  # peak at update warmup_steps


def test_cosine_midpoint_and_end():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg, total_steps=110)
    assert f(59) == pytest.approx(0.55)  # half way through the 100 decay updates: (1 + 0.1) / 2
    assert f(109) == pytest.approx(0.1)  # the last update is at min_lr_ratio
    assert f(500) == pytest.approx(0.1)  # past the end it stays there
    assert f(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.21)))


def test_cosine_without_warmup_decays_from_the_first_update():
    vals = values(ScheduleConfig(name="cosine", min_lr_ratio=0.0), 50)
    assert vals[0] < 1.0 and vals[0] > 0.99
    assert vals[-1] == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["cosine", "wsd"])
def test_decay_is_monotone_after_warmup(name):
    vals = values(ScheduleConfig(name=name, warmup_steps=5, decay_shape="1-sqrt"), 200)
    assert all(a < b for a, b in zip(vals[:4], vals[1:5]))  # rising to the peak at index 4
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert all(0.0 <= v <= 1.0 for v in vals)


def test_wsd_plateau_then_decay_to_min():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.05, decay_fraction=0.2)
    f = lr_lambda(cfg, total_steps=100)  # decay over the last 20 updates
    assert all(f(k) == 1.0 for k in range(9, 80))
    assert f(80) < 1.0
    assert f(89) == pytest.approx(0.05 + 0.95 * 0.5)  # linear: half way down
    assert f(99) == pytest.approx(0.05)


def test_wsd_one_minus_sqrt_cooldown():
    cfg = ScheduleConfig(name="wsd", min_lr_ratio=0.0, decay_fraction=0.2, decay_shape="1-sqrt")
    f = lr_lambda(cfg, total_steps=100)
    assert f(79) == 1.0
    assert f(84) == pytest.approx(1 - math.sqrt(0.25))
    assert f(99) == pytest.approx(0.0)
    # 1-sqrt drops faster at first than linear.
    linear = lr_lambda(ScheduleConfig(name="wsd", min_lr_ratio=0.0, decay_fraction=0.2), 100)
    assert f(84) < linear(84)


def test_constant_holds_the_peak():
    assert values(ScheduleConfig(name="constant", warmup_steps=4), 20)[3:] == [1.0] * 17


def test_works_with_lambda_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ScheduleConfig(warmup_steps=4), 20))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.5) and seen[3] == pytest.approx(2.0) and seen[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "linear"}, r"name 'linear' is not one of \['cosine', 'wsd', 'constant'\]"),
    ({"decay_shape": "sqrt"}, r"decay_shape 'sqrt' is not one of \['linear', '1-sqrt'\]"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"decay_fraction": 0.0}, r"decay_fraction must be in \(0, 1\]"),
])
def test_invalid_config_names_the_field_and_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**kwargs)


def test_yaml_errors_name_the_file_and_key():
    with pytest.raises(ConfigError, match=r"recipe.yaml.*decay_shape 'cubic'"):
        from_dict(ScheduleConfig, {"name": "wsd", "decay_shape": "cubic"}, "recipe.yaml")


@pytest.mark.parametrize("cfg, total, match", [
    (ScheduleConfig(warmup_steps=10), 10, "warmup_steps 10 must be below total_steps 10"),
    (ScheduleConfig(name="wsd", warmup_steps=90, decay_fraction=0.2), 100, "wsd schedule: warmup_steps 90"),
    (ScheduleConfig(), 0, "total_steps must be >= 1"),
])
def test_impossible_step_budgets_are_errors(cfg, total, match):
    with pytest.raises(ValueError, match=match):
        lr_lambda(cfg, total)


def test_every_step_of_every_tiny_twin_trains():
    """The twins run a handful of steps: none of them may spend one at learning rate 0."""
    from pathlib import Path

    from keyetron.train.recipe import load_recipe

    for path in sorted((Path(__file__).resolve().parents[2] / "recipes" / "tiny").glob("*.yaml")):
        if path.name == "merge.yaml":
            continue
        recipe = load_recipe(path)
        multipliers = [lr_lambda(recipe.schedule, recipe.train.steps)(s) for s in range(recipe.train.steps)]
        assert min(multipliers) > 0, (path.name, multipliers)
