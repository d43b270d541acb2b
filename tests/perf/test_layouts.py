"""`keyetron bench layouts`: layout strings, the figures of one layout from its ranks' records,
and an end-to-end run of real training steps on the demo data under two layouts."""
import json
import math
import xml.etree.ElementTree as ET

import pytest

from keyetron.perf.layout_worker import analytic_bubble, summarize
from keyetron.perf.layouts import Layout, parse_layout, parse_layouts
from keyetron.cli import main
from keyetron.data.demo import make_demo


def test_a_layout_string_names_tp_pp_cp_and_optionally_dp():
    assert parse_layout("tp2pp2cp1") == Layout(tp=2, pp=2, cp=1, dp=None)
    assert parse_layout("tp1pp4cp2dp3") == Layout(tp=1, pp=4, cp=2, dp=3)
    assert parse_layout("tp16pp1cp1").tp == 16


@pytest.mark.parametrize("text", ["tp2pp2", "pp2tp2cp1", "tp0pp1cp1", "TP2PP1CP1", "tp2pp1cp1dp", "tp02pp1cp1",
                                  "tp2pp1cp1x", "tp2 pp1cp1", "tp2pp1cp1dp0", ""])
def test_malformed_layout_strings_are_rejected_with_the_expected_form(text):
    with pytest.raises(ValueError, match="expected tp<N>pp<N>cp<N>"):
        parse_layout(text)


def test_dp_is_what_the_process_count_leaves_unless_the_layout_names_it():
    layouts = parse_layouts("tp2pp2cp1,tp1pp4cp2,tp1pp1cp1dp1", 16)
    assert [(lay.name, lay.world) for lay in layouts] == [("tp2pp2cp1dp4", 16), ("tp1pp4cp2dp2", 16),
                                                          ("tp1pp1cp1dp1", 1)]


def test_a_layout_that_does_not_divide_the_process_count_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"tp\*pp\*cp = 4 does not divide the process count 6"):
        parse_layouts("tp2pp1cp1,tp2pp2cp1", 6)
    with pytest.raises(ValueError, match="more than once"):
        parse_layouts("tp1pp1cp1,tp1pp1cp1dp2", 2)


def test_analytic_bubble_is_the_1f1b_formula():
    assert analytic_bubble(1, 8, "1f1b", 1) is None
    assert analytic_bubble(4, 8, "1f1b", 1) == pytest.approx(3 / 11)
    assert analytic_bubble(4, 8, "gpipe", 2) == pytest.approx(3 / 11)  # virtual stages only count interleaved
    assert analytic_bubble(4, 8, "interleaved", 2) == pytest.approx(3 / 19)


def _step(seconds, data_s, run, busy, tokens=0, rows=0, flops=0):
    return {"seconds": seconds, "data_s": data_s, "pipe_run_s": run, "pipe_busy_s": busy, "rows": rows,
            "padded_tokens": rows * 100, "tokens": tokens, "tokens_sq": tokens * 50, "patches": 8 * rows,
            "patches_sq": 64 * rows, "loss": 2.0,
            "flops": {"vit_linear": flops // 4, "vit_attention": 0, "projector": 0, "llm_linear": flops - flops // 4,
                      "llm_attention": 0}}


def test_the_summary_takes_the_slowest_rank_per_step_and_counts_rows_once_per_data_parallel_rank():
    # pp2: rank 0 (stage 0) reads 2 rows of 90 real tokens per step, rank 1 (stage 1) reads metadata only
    records = [
        {"rank": 0, "reader": True, "memory_bytes": 2 * 2**30, "memory_kind": "k",
         "steps": [_step(1.0, 0.2, 0.8, 0.6, 180, 2, 4000), _step(2.0, 0.1, 1.6, 1.0, 180, 2, 4000)]},
        {"rank": 1, "reader": False, "memory_bytes": 2**30, "memory_kind": "k",
         "steps": [_step(1.5, 0.3, 0.8, 0.4, 0, 0, 4000), _step(1.0, 0.1, 1.6, 1.2, 0, 0, 4000)]},
    ]
    s = summarize(records, layout={"layout": "tp1pp2cp1dp1", "tp": 1, "pp": 2, "cp": 1, "dp": 1}, micro_batches=2,
                  schedule="1f1b", virtual=1, peak_flops=1000.0)
    assert s["step_s"] == pytest.approx((1.5 + 2.0) / 2)
    assert s["tokens_per_s_per_device"] == pytest.approx(360 / 3.5 / 2)
    assert s["mfu"] == pytest.approx(8000 / (3.5 * 2 * 1000.0))
    assert s["tflops_per_device"] == pytest.approx(8000 / 3.5 / 2 / 1e12)
    assert s["tflop_per_step"] == pytest.approx(4000 / 1e12)  # rank 0's count, already summed over dp
    assert s["data_wait_s"] == pytest.approx((0.3 + 0.1) / 2)
    assert s["bubble_measured"] == pytest.approx(((1 - 1.6 / 2.4) + (1 - 1.6 / 2.4)) / 2)
    assert s["bubble_analytic"] == pytest.approx(1 / 3)
    assert (s["memory_max_gib"], s["memory_min_gib"]) == (2.0, 1.0)
    assert s["packing_efficiency"] == pytest.approx(0.9)
    assert s["workload_per_row"] == {"tokens": 90, "tokens_sq": 4500, "patches": 8, "patches_sq": 64}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    make_demo(tmp / "demo", seed=0, train_size=24, eval_size=2)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "bench", "output_dir": str(tmp / "unused"), "model": {"config": "tiny"},
        "data": {"sources": [str(tmp / "demo" / "train.jsonl")],
                 "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                 "loader": {"row_tokens": 256, "buffer_docs": 8, "seed": 0}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "constant"}, "train": {"grad_accum": 1}}))
    out = tmp / "out"
    code = main(["bench", "layouts", "--recipe", str(recipe), "--layouts", "tp1pp1cp1,tp1pp2cp1", "--steps", "2",
                 "--warmup", "1", "--nproc", "2", "--out", str(out), "--timeout", "240"])
    return code, out


def test_bench_layouts_runs_real_steps_per_layout_and_writes_table_json_and_plot(bench_run):
    code, out = bench_run
    assert code == 0
    results = json.loads((out / "layouts.json").read_text())
    assert results["micro_batches"] == 2  # the recipe's grad_accum 1, raised to the largest pp
    by_name = {r["layout"]: r for r in results["layouts"]}
    assert set(by_name) == {"tp1pp1cp1dp2", "tp1pp2cp1dp1"}
    for r in by_name.values():
        assert "error" not in r, r.get("error")
        assert r["world"] == 2 and r["steps"] == 2 and r["model"] == "tiny"
        for key in ("tokens_per_s_per_device", "step_s", "tflops_per_device", "tflop_per_step", "vit_tflop_per_step",
                    "llm_tflop_per_step", "memory_max_gib", "memory_min_gib", "data_wait_s", "packing_efficiency"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["layout"], key, r[key])
        assert r["mfu"] is None  # a CPU has no known peak
        assert r["memory_kind"].startswith("peak RSS")
        assert 0 < r["packing_efficiency"] <= 1
    pipe = by_name["tp1pp2cp1dp1"]
    assert 0 < pipe["bubble_measured"] < 1 and pipe["bubble_analytic"] == pytest.approx(1 / 3)
    assert by_name["tp1pp1cp1dp2"]["bubble_measured"] is None
    table = (out / "layouts.md").read_text()
    assert "| tp1pp1cp1dp2 | 2 |" in table and "| tp1pp2cp1dp1 | 2 |" in table and "n/a" in table
    svg = ET.parse(out / "layouts.svg").getroot()
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "tp1pp1cp1dp2" in labels and "tp1pp2cp1dp1" in labels


def test_plan_reports_its_prediction_error_on_the_bench_output(bench_run, capsys):
    _, out = bench_run
    capsys.readouterr()
    assert main(["plan", "--model", "keye-8b", "--gpus", "8", "--seq", "8192", "--measured",
                 str(out / "layouts.json")]) == 0
    text = capsys.readouterr().out
    compared = [line for line in text.splitlines() if line.startswith("| tp1pp")]
    assert len(compared) == 2 and all("%" in line for line in compared)


def test_a_failing_layout_is_reported_with_its_error_naming_the_cause(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"config": "tiny"}, "data": {"sources": [str(tmp_path / "missing.jsonl")]}}))
    assert main(["bench", "layouts", "--recipe", str(recipe), "--layouts", "tp1pp1cp1dp1", "--steps", "1",
                 "--out", str(tmp_path / "out"), "--timeout", "120"]) == 1
    (failed,) = json.loads((tmp_path / "out" / "layouts.json").read_text())["layouts"]
    assert "missing.jsonl" in failed["error"] and "launch.log" in failed["error"]
    assert "| tp1pp1cp1dp1 | 1 | failed: " in (tmp_path / "out" / "layouts.md").read_text()
    assert main(["bench", "layouts", "--recipe", str(recipe), "--layouts", "tp1pp1cp1", "--steps", "1",
                 "--set", "train.no_such_key=1", "--out", str(tmp_path / "out")]) == 2  # refused before any launch
    assert "no_such_key" in capsys.readouterr().err
