"""``fedplan bench``: a quick run on the MNIST CNN, its files, and failure handling."""

from __future__ import annotations

import csv
import json
import os

import pytest

from fedplan.bench.run import BenchConfig, ModelBench, Point
from fedplan.cli import main
from fedplan.modelfile import load_model_file

from .conftest import EXAMPLES


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = main(["bench", "--quick", "--out", str(out), "--json",
                   "--models", str(EXAMPLES / "mnist_cnn.py")])
    return status, out


def test_quick_run_writes_every_file(quick_run, capsys):
    status, out = quick_run
    assert status == 0
    for name in ("results.json", "results.csv", "summary.md", "pareto.png",
                 "predicted_vs_measured.png", "solver_time.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "results.csv").open()))
    data = json.loads((out / "results.json").read_text())
    assert len(rows) == len(data["points"])


def test_quick_run_measures_every_planner_or_says_why(quick_run):
    _, out = quick_run
    points = json.loads((out / "results.json").read_text())["points"]
    planners = {p["planner"] for p in points}
    assert planners >= {"none", "all", "sqrt", "sac", "actnn2", "ilp", "greedy",
                        "ilp+compress"}
    assert "torch.compile" not in planners  # --quick leaves it out
    # 5 fixed schemes + 3 budgeted planners x 2 budgets (+ ilp at its smallest budget)
    assert len(points) in (11, 12)
    by_name = {(p["planner"], p["budget"]): p for p in points}
    keep = by_name[("none", "-")]
    assert keep["status"] == "ok" and keep["overhead"] == 0.0
    assert keep["max_grad_diff"] == 0.0
    assert keep["measured_peak_bytes"] > 0
    # recompute-only plans reproduce keep-all's gradients bit for bit; 2-bit does not
    for name in ("all", "sqrt", "sac"):
        assert by_name[(name, "-")]["max_grad_diff"] == 0.0, name
    assert by_name[("actnn2", "-")]["max_grad_diff"] > 0.0
    for point in points:
        if point["status"] == "ok":
            assert point["step_seconds"] > 0 and point["keep_all_step_seconds"] > 0
        else:
            assert point["error"] and "\n" not in point["error"]


def test_quick_run_exact_gaps(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["gaps"] and all(g["gap"] == 0.0 for g in data["gaps"])
    assert {"status", "objective", "bound", "solve_seconds", "nodes"} <= set(
        data["solver_runs"][0])


def test_a_failing_peer_is_a_failed_point_and_the_run_goes_on():
    spec = load_model_file(EXAMPLES / "mnist_cnn.py")
    bench = ModelBench(spec, BenchConfig(models=(str(spec.path),)), lambda _m: None)

    def explode(_owner):
        raise RuntimeError("backend compiler failed\nlong traceback")

    bench._add(Point(model="mnist_cnn", planner="sac", budget="-"), explode)
    assert bench.points[-1].status == "failed"
    assert bench.points[-1].error == "RuntimeError: backend compiler failed"
    assert bench.variants == []


@pytest.mark.parametrize("argv,needle", [
    (["--planners", "ilp,bogus"], "unknown planner 'bogus'"),
    (["--budgets", "0.8,abc"], "comma-separated fractions"),
    (["--budgets", "0.8,2"], "budget fractions in (0, 1.5]"),
    (["--models", "no/such/model.py"], "not found"),
    (["--repeats", "0"], "--repeats >= 1"),
    (["--gap-graphs", "6by2"], "LAYERSxWIDTH"),
    (["--solver-only", "--no-solver"], "leave nothing to run"),
    (["--merge", "no/such/results.json"], "cannot read results"),
])
def test_bad_bench_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDPLAN_SLOW_TESTS"), reason="torch.compile takes "
                    "6-68 s per point on CPU; set FEDPLAN_SLOW_TESTS=1 to run it")
def test_torch_compile_point_on_the_mnist_cnn(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--planners", "none,torch.compile",
                 "--budgets", "0.5", "--repeats", "1", "--no-solver", "--no-plots",
                 "--models", str(EXAMPLES / "mnist_cnn.py")]) == 0
    points = json.loads((out / "results.json").read_text())["points"]
    compiled = [p for p in points if p["planner"] == "torch.compile"]
    assert len(compiled) == 1
    point = compiled[0]
    assert point["status"] == "ok", point["error"]
    assert point["measured_peak_bytes"] > 0 and point["block"] == "compile:0.5"


def test_merge_combines_runs_and_recomputes_the_goals(quick_run, tmp_path, capsys):
    _, out = quick_run
    merged = tmp_path / "merged"
    assert main(["bench", "--merge", str(out), str(out / "results.json"), "--out",
                 str(merged), "--no-plots", "--json"]) == 0
    data = json.loads((merged / "results.json").read_text())
    single = json.loads((out / "results.json").read_text())
    assert len(data["points"]) == 2 * len(single["points"])
    assert len(data["merged_from"]) == 2 and data["merged_from"][0]["command"]
    assert data["goals"]["ilp_gap"]["graphs"] == 2 * len(single["gaps"])
    assert main(["bench", "--merge", str(tmp_path / "nothing"), "--out",
                 str(merged)]) == 2


def _point(planner, peak, overhead, budget="-"):
    return {"model": "m", "planner": planner, "budget": budget, "status": "ok",
            "measured_peak_bytes": peak, "predicted_peak_bytes": peak, "overhead": overhead}


def test_goals_interpolate_fedplan_at_compile_peaks():
    from fedplan.bench.report import goals

    points = [_point("none", 100, 0.0), _point("sqrt", 70, 0.30),
              _point("ilp", 90, 0.02, "0.8"), _point("ilp", 60, 0.20, "0.4"),
              _point("ilp+compress", 40, 0.10, "0.4"),
              _point("torch.compile", 75, 0.30, "0.6"),
              _point("torch.compile", 50, 0.50, "0.25")]
    goal = goals(points, [])
    entry = goal["equal_peak_vs_compile"]["m"]
    # at 75 ilp is halfway between (60, 1.20) and (90, 1.02): 1.11 against 1.30
    assert entry["ratios"] == [pytest.approx(1.11 / 1.30)]
    assert entry["compile_peaks_below_fedplan_range"] == 1 and not entry["met"]
    anyplan = goal["equal_peak_vs_compile_any_plan"]["m"]
    assert anyplan["compile_peaks_below_fedplan_range"] == 0
    assert goal["smallest_peak_ratio"]["m"] == pytest.approx(60 / 50)
    assert goal["smallest_peak_ratio_with_compress"]["m"] == pytest.approx(40 / 50)


def test_solver_only_runs_outside_the_repository(tmp_path, monkeypatch, capsys):
    """--solver-only needs no example model files, so it runs from any directory."""
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--solver-only", "--quick", "--gap-graphs", "6x2", "--gap-seeds",
                 "1", "--gap-fractions", "0.9", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["points"] == 0
    assert payload["goals"]["ilp_gap"] == {"graphs": 1, "known": 1, "worst": 0.0, "met": True}
