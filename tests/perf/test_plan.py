"""`keyetron plan`: which layouts are candidates, memory against a hand computation, the memory
cap, the step-time terms, and the prediction error against measured step times."""
import json
import math

import pytest

from keyetron.perf.plan import (GIB, Hardware, Workload, candidate_layouts, compare_measured, plan, predict,
                                 synthetic_workload)
from keyetron.cli import main
from keyetron.model import load_model_config
from keyetron.parallel.balancer import CostModel


@pytest.fixture(scope="module")
def keye():
    return load_model_config("keye-8b")


@pytest.mark.parametrize("gpus", [8, 64])
def test_candidates_are_every_factorisation_with_tp_within_a_node_and_pp_dividing_36_layers(keye, gpus):
    want = {(tp, pp, cp, gpus // (tp * pp * cp)) for tp in (1, 2, 4, 8) for pp in (1, 2, 3, 4, 6, 9, 12, 18, 36)
            for cp in range(1, gpus + 1) if gpus % (tp * pp * cp) == 0}
    assert set(candidate_layouts(keye, gpus, 8192)) == want
    assert all(pp in (1, 2, 4) for _, pp, _, _ in want)  # 3, 6, 9... do not divide 8 or 64


@pytest.mark.parametrize("gpus,seq", [(8, 8192), (8, 131072), (64, 8192), (64, 131072)])
def test_plan_ranks_the_layouts_that_fit_by_step_time_and_flags_the_rest(keye, gpus, seq):
    hw = Hardware()
    w = synthetic_workload(seq, seq, 0.5, 1024, 4)
    rows = plan(keye, gpus, seq, gpus, w, hw)
    fits = [r for r in rows if r["fits"]]
    assert fits, "some layout must fit keye-8b"
    assert rows[:len(fits)] == fits  # feasible first
    assert [r["step_s"] for r in fits] == sorted(r["step_s"] for r in fits)
    cap = hw.memory_gib - hw.reserve_gib
    for r in rows:
        assert r["tp"] * r["pp"] * r["cp"] * r["dp"] == gpus
        assert (r["memory_gib"]["total"] <= cap) == r["fits"]
        if not r["fits"]:
            assert "GiB" in r["why"]
        for key in ("step_s", "compute_s", "tokens_per_s_per_gpu", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert 0 < r["mfu"] < hw.efficiency  # communication and bubbles only ever add time
    # one fp32 copy of every LLM weight, its gradient and ZeRO's flat buffer do not fit without sharding
    assert not next(r for r in rows if (r["tp"], r["pp"]) == (1, 1))["fits"]


def test_memory_of_tp2_pp2_cp2_dp2_equals_the_hand_computation(keye):
    # keye-8b: h 4096, q 32x128, kv 8x128, I 12288, 36 layers, vocabulary 151,936, untied head.
    layer = 2 * 4096 + 4096 * 4096 * 2 + 4096 * 1024 * 2 + 2 * 128 + 3 * 4096 * 12288  # norms, q/o, k/v, q/k norms, MLP
    embed = 151936 * 4096
    vis = 412_987_248 + 40_125_952  # SigLIP ViT + projector (keyetron model-info)
    llm = 18 * layer // 2 + embed // 2  # stage 0 of 2: 18 layers and the embedding, split over tp=2
    weights = grads = 4 * llm + 4 * vis  # fp32 (and autocast): fp32 weights and gradients
    optimizer = 12 * llm / 4 + 8 * vis  # ZeRO-1 over dp*cp = 4; the ViT steps in full, no master
    t = 8192 / 2  # cp = 2
    per_layer = (12 * 4096 + 6 * 4096 + 6 * 1024 + 6 * 12288) * t / 2 + 4 * (1024 / 2) * (8192 - t)
    patches = 4096 * 4 / 4  # half the row is visual, 4 patches a token, shared by tp*cp = 4 ranks
    vit = 27 * patches * (20 * 1152 + 4 * 4304)
    activations = 2 * (18 * per_layer + vit)  # 1F1B: stage 0 holds pp = 2 micro-batches
    total = weights + grads + optimizer + max(activations, 4 * llm)

    w = synthetic_workload(8192, 8192, 0.5, 1024, 4)
    r = predict(keye, CostModel.from_flops(keye), CostModel.from_flops(keye), 2, 2, 2, 2, 8192, 16, w,
                Hardware(precision="fp32"))
    bf16 = predict(keye, CostModel.from_flops(keye), CostModel.from_flops(keye), 2, 2, 2, 2, 8192, 16, w,
                   Hardware(precision="bf16"))["memory_gib"]
    # bf16: bf16 weights, fp32 main gradients, fp32 masters (the ViT's too, stepped in full)
    assert bf16["weights"] * GIB == pytest.approx(2 * llm + 2 * vis, rel=1e-12)
    assert bf16["grads"] * GIB == pytest.approx(grads, rel=1e-12)
    assert bf16["optimizer"] * GIB == pytest.approx(12 * llm / 4 + 12 * vis, rel=1e-12)
    got = r["memory_gib"]
    assert r["ac"] is False and r["micro_batches"] == 8
    assert got["weights"] * GIB == pytest.approx(weights, rel=1e-12)
    assert got["grads"] * GIB == pytest.approx(grads, rel=1e-12)
    assert got["optimizer"] * GIB == pytest.approx(optimizer, rel=1e-12)
    assert got["activations"] * GIB == pytest.approx(activations, rel=1e-12)
    assert got["total"] * GIB == pytest.approx(total, rel=1e-12)


def test_activation_checkpointing_is_used_only_when_needed_and_costs_a_third_more_compute(keye):
    w = synthetic_workload(131072, 131072, 0.5, 1024, 4)
    flops = CostModel.from_flops(keye)
    auto = predict(keye, flops, flops, 8, 1, 1, 1, 131072, 8, w, Hardware())
    off = predict(keye, flops, flops, 8, 1, 1, 1, 131072, 8, w, Hardware(), "off")
    assert auto["ac"] and not off["fits"] and auto["fits"]
    assert auto["memory_gib"]["activations"] < off["memory_gib"]["activations"]
    assert auto["compute_s"] == pytest.approx(off["compute_s"] * 4 / 3)


def test_a_seconds_calibration_is_used_as_is_and_split_over_tp_cp_and_pp(keye):
    w = Workload(tokens=1000, tokens_sq=0)
    cal = CostModel(a=1e-3, b=0, c=0, d=0, units="seconds")  # one second per 1,000-token row on one GPU
    r = predict(keye, cal, CostModel.from_flops(keye), 2, 2, 2, 1, 1000, 8, w, Hardware())
    assert r["compute_s"] == pytest.approx(8 * 1.0 / 8)  # 8 rows, each over pp*tp*cp = 8 GPUs
    assert r["bubble"] == pytest.approx(1 / 9)  # (pp-1)/(m+pp-1)
    fast = predict(keye, cal, CostModel.from_flops(keye), 2, 2, 2, 1, 1000, 8, w, Hardware(nvlink_gbs=1e6))
    assert fast["tp_comm_s"] < r["tp_comm_s"] and fast["step_s"] < r["step_s"]


def test_prediction_error_is_reported_per_measured_layout(tmp_path, capsys):
    measured = {"layouts": [
        {"layout": "tp1pp1cp1dp2", "model": "tiny", "tp": 1, "pp": 1, "cp": 1, "dp": 2, "micro_batches": 2,
         "row_tokens": 256.0, "step_s": 0.5, "memory_max_gib": 0.8, "memory_kind": "peak RSS of the process (CPU)",
         "tflop_per_step": 4e-3,
         "workload_per_row": {"tokens": 200.0, "tokens_sq": 20000.0, "patches": 400.0, "patches_sq": 60000.0}},
        {"layout": "tp2pp1cp1dp1", "tp": 2, "pp": 1, "cp": 1, "dp": 1, "world": 2, "error": "exit 1"}]}
    path = tmp_path / "layouts.json"
    path.write_text(json.dumps(measured))
    rows = compare_measured(measured, Hardware(peak_tflops=0.01, efficiency=1.0, nvlink_gbs=1e9))
    assert [r["layout"] for r in rows] == ["tp1pp1cp1dp2"]  # failed layouts are skipped
    # the trainer's count of 1e9 FLOPs per row (4 rows) at 1e10 FLOP/s, communication free: 2 rows per rank
    assert rows[0]["predicted_s"] == pytest.approx(2 * 1e9 / 1e10, rel=1e-6)
    assert rows[0]["error"] == pytest.approx(rows[0]["predicted_s"] / 0.5 - 1)
    assert main(["plan", "--model", "keye-8b", "--gpus", "8", "--seq", "8192", "--measured", str(path),
                 "--peak-tflops", "0.01", "--efficiency", "1"]) == 0
    out = capsys.readouterr().out
    assert "prediction against measurement" in out
    assert f"| tp1pp1cp1dp2 | 0.500 | {rows[0]['predicted_s']:.3g} | {rows[0]['error']:+.0%} |" in out


def test_cli_plan_prints_the_ranking_and_fails_when_nothing_fits(capsys):
    assert main(["plan", "--model", "keye-8b", "--gpus", "64", "--seq", "131072", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | tp" in out and "| 3 | tp" in out and "| 4 | tp" not in out and "fit in memory" in out
    assert main(["plan", "--model", "keye-8b", "--gpus", "8", "--seq", "131072", "--gpu-memory-gib", "16"]) == 1
    out = capsys.readouterr().out
    assert "0 of 19 layouts fit" in out
    # ... and says what to change: the closest layout, how far it is, and the knobs that close the gap
    advice = out[out.index("The closest is"):]
    assert "tp8pp1cp1dp1: 55.0 GiB for 10 GiB usable" in advice and "--precision" not in advice and "--gpus" in advice and "--seq" in advice
    assert main(["plan", "--model", "keye-8b", "--gpus", "8", "--seq", "131072", "--gpu-memory-gib", "141"]) == 0
    assert "The closest is" not in capsys.readouterr().out


def test_plan_with_too_few_rows_for_any_pipeline_says_to_raise_the_global_batch(capsys):
    from keyetron.perf.plan import no_fit_advice

    class Args:
        gpu_memory_gib, reserve_gib, precision = 80, 4, "fp32"
    assert "raise --global-batch" in no_fit_advice([{"layout": "tp8 pp2", "flag": "no micro-batch"}], Args)
    advice = no_fit_advice([{"layout": "a", "memory_gib": {"total": 90.0}},
                            {"layout": "b", "memory_gib": {"total": 85.5}}], Args)
    assert advice.startswith("The closest is b: 85.5 GiB for 76 GiB usable.")
    assert "bf16 weights (--precision bf16)" in advice  # an fp32 plan is told bf16 would help
