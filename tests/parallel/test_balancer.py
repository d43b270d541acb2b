"""The step load balancer: cost model, assignment invariants, targets, outliers, calibration, CLI."""
import json
import statistics

import pytest

from keyetron.perf.balance import synthetic_mix
from keyetron.cli import main
from keyetron.data.dataset import SampleCost
from keyetron.parallel.balancer import (CalibrationError, CostModel, assign, imbalance_report,
                                       naive_assign)

MODEL = CostModel.from_flops("keye-8b")


def _worst(report):
    return max(report[p]["ratio_to_lower_bound"] for p in ("vit", "llm"))


def test_flop_costs_are_positive_and_attention_grows_quadratically():
    assert min(MODEL.a, MODEL.b, MODEL.c, MODEL.d) > 0
    assert MODEL.llm_cost([2048]) > 2 * MODEL.llm_cost([1024])
    assert MODEL.llm_cost([2048]) - 2 * MODEL.llm_cost([1024]) == pytest.approx(2 * MODEL.b * 1024**2)
    assert MODEL.vit_cost([2048]) > 2 * MODEL.vit_cost([1024])  # one big frame > two small ones
    assert MODEL.vit_cost([1024, 1024]) == pytest.approx(2 * MODEL.vit_cost([1024]))
    vit, llm = MODEL.sample_cost(SampleCost("s", 300, (256, 256)))
    assert (vit, llm) == (pytest.approx(MODEL.vit_cost([256, 256])), pytest.approx(MODEL.llm_cost([300])))
    frozen_vit = CostModel.from_flops("keye-8b", {"vit": False})
    assert frozen_vit.c < MODEL.c and frozen_vit.d == pytest.approx(MODEL.d / 3)


@pytest.mark.parametrize("row_tokens", [8192, 131072])
def test_every_sample_once_rows_within_row_tokens_and_balanced_meets_target(row_tokens):
    mix = synthetic_mix(1024, row_tokens, seed=0)
    naive = naive_assign(mix, 64, row_tokens, model=MODEL)
    balanced = assign(mix, 64, row_tokens, model=MODEL)
    for a in (naive, balanced):
        placed = sorted(i for rows in a.rows for row in rows for i in row)
        assert placed == list(range(len(mix)))
        assert all(sum(mix[i].llm_tokens for i in row) <= row_tokens for rows in a.rows for row in rows)
    n, b = imbalance_report(naive), imbalance_report(balanced)
    assert _worst(n) > 1.3  # the synthetic mix is as hard as the reference's naive ~1.4
    assert _worst(b) <= 1.05
    assert b["combined"]["ratio_to_lower_bound"] < n["combined"]["ratio_to_lower_bound"]


def test_rows_per_rank_caps_the_micro_batches_of_every_rank():
    mix = synthetic_mix(1024, 8192, seed=1)
    balanced = assign(mix, 64, 8192, rows_per_rank=4, model=MODEL)
    assert balanced.rows_per_rank <= 4
    assert _worst(imbalance_report(balanced)) <= 1.05
    with pytest.raises(ValueError, match="raise rows_per_rank"):
        assign(mix, 64, 8192, rows_per_rank=1, model=MODEL)


def test_sample_longer_than_a_row_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'long'.*oversize policy"):
        assign([SampleCost("long", 9000)], 2, 8192, model=MODEL)


def test_outlier_goes_alone_to_a_rank_and_is_reported_against_the_lower_bound():
    small = [SampleCost(f"img-{i}", 1000, (1024,)) for i in range(63)]
    huge = SampleCost("huge-video", 8000, (4096,) * 40)  # far more ViT than a rank's fair share
    mix = [*small[:30], huge, *small[30:]]
    a = assign(mix, 8, 8192, model=MODEL)
    rank = a.rank_of()[30]
    assert [i for row in a.rows[rank] for i in row] == [30]  # alone: every other sample costs ViT
    report = imbalance_report(a)
    assert report["vit"]["max_over_mean"] > 2  # set by the outlier; no assignment can do better
    assert report["vit"]["ratio_to_lower_bound"] == pytest.approx(1.0)
    assert report["llm"]["ratio_to_lower_bound"] <= 1.05


def test_scheduler_time_for_1024_samples():
    mix = synthetic_mix(1024, 8192, seed=0)
    times = [assign(mix, 64, 8192, model=MODEL).scheduler_ms for _ in range(5)]
    assert statistics.median(times) < 200  # target 20 ms; generous so a loaded machine does not flake


def test_calibration_file_round_trip_and_errors_name_file_and_key(tmp_path):
    model = CostModel(a=1.5e-9, b=2e-14, c=3e-10, d=4e-15, units="seconds", source="H100 kernel sweep")
    for name in ("cal.json", "cal.yaml"):
        model.save(tmp_path / name)
        assert CostModel.load(tmp_path / name) == model
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "units": "flop", "a": 1, "b": 1, "c": "fast", "d": 1}))
    with pytest.raises(CalibrationError, match=r"bad\.json.*'c'"):
        CostModel.load(bad)
    bad.write_text(json.dumps({"version": 1, "units": "flop", "a": 1, "b": 1, "c": 1}))
    with pytest.raises(CalibrationError, match=r"bad\.json.*missing key 'd'"):
        CostModel.load(bad)
    bad.write_text(json.dumps({"version": 1, "units": "flop", "a": 1, "b": 1, "c": 1, "d": 1, "e": 2}))
    with pytest.raises(CalibrationError, match=r"bad\.json.*unknown key 'e'"):
        CostModel.load(bad)
    with pytest.raises(CalibrationError, match="missing.json"):
        CostModel.load(tmp_path / "missing.json")


def test_cli_bench_balance_prints_the_documented_json(capsys, tmp_path):
    assert main(["bench", "balance", "--ranks", "16", "--row-tokens", "8192", "--samples", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"ranks", "row_tokens", "seed", "mix", "cost_model", "naive", "balanced"} <= set(out)
    for name in ("naive", "balanced"):
        assert set(out[name]) == {"vit", "llm", "combined", "rows_per_rank", "scheduler_ms"}
        for phase in ("vit", "llm", "combined"):
            assert set(out[name][phase]) == {"max_over_mean", "ratio_to_lower_bound"}
    assert set(out["mix"]["token_share"]) == {"video", "image", "text"}
    (tmp_path / "bad.json").write_text("{")
    assert main(["bench", "balance", "--ranks", "4", "--row-tokens", "8192",
                 "--calibration", str(tmp_path / "bad.json")]) == 1
    assert "bad.json" in capsys.readouterr().err
