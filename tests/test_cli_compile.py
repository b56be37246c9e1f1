"""`fedplan compile` and `fedplan measure`: JSON contracts and bad input."""

from __future__ import annotations

import json

import pytest

from fedplan.cli import main

from .conftest import EXAMPLES
from .test_cli_profile import assert_one_line_error, run_cli

MODEL = str(EXAMPLES / "mnist_cnn.py")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One plan for the small CNN, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("plans")
    path = folder / "cnn.plan.json"
    code = main(["compile", MODEL, "--budget", "64MB", "--solver", "sqrt",
                 "--decisions", "recompute", "--repeats", "1", "-o", str(path), "--json"])
    assert code == 0
    return path


def test_compile_json_contract(capsys, tmp_path):
    path = tmp_path / "p.json"
    code, out, _ = run_cli(capsys, "compile", MODEL, "--budget", "64MB", "--repeats", "1",
                           "-o", str(path), "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("budget_bytes", "predicted_peak_bytes", "solver", "status", "solve_seconds"):
        assert key in data
    assert data["budget_bytes"] == 64 * 10**6
    assert data["predicted_peak_bytes"] <= data["budget_bytes"]
    assert json.loads(path.read_text())["decisions"]


def test_measure_json_contract(capsys, compiled):
    code, out, _ = run_cli(capsys, "measure", MODEL, "--plan", str(compiled), "--steps", "1",
                           "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("measured_peak_bytes", "predicted_peak_bytes", "step_seconds",
                "baseline_step_seconds", "max_grad_diff"):
        assert key in data
    assert data["max_grad_diff"] == 0.0  # recompute-only plans are exact
    assert abs(data["prediction_error"]) < 0.05


@pytest.mark.parametrize("budget", ["lots", "12 parsecs", "-1MB", ""])
def test_malformed_budget(capsys, tmp_path, budget):
    out = tmp_path / "p.json"
    code, _, err = run_cli(capsys, "compile", MODEL, f"--budget={budget}", "-o", str(out))
    assert_one_line_error(code, err, "budget")
    assert not out.exists()


def test_budget_below_the_parameters(capsys, tmp_path):
    out = tmp_path / "p.json"
    code, _, err = run_cli(capsys, "compile", MODEL, "--budget", "1000", "--repeats", "1",
                           "-o", str(out))
    assert_one_line_error(code, err, "fixed costs")
    assert not out.exists()


def test_unknown_solver_lists_the_valid_ones(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", MODEL, "--budget", "64MB", "--solver", "magic",
                           "-o", str(tmp_path / "p.json"))
    assert_one_line_error(code, err, "valid solvers")


@pytest.mark.parametrize("content,needle", [
    ("{corrupt", "not valid JSON"),
    ('{"schema_version": 1, "fingerp', "not valid JSON"),
    ('{"schema_version": 7, "fingerprint": "x"}', "schema version 7"),
])
def test_measure_rejects_bad_plan_files(capsys, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, _, err = run_cli(capsys, "measure", MODEL, "--plan", str(path))
    assert_one_line_error(code, err, needle)


def test_measure_rejects_a_plan_for_another_model(capsys, compiled):
    code, _, err = run_cli(capsys, "measure", str(EXAMPLES / "gpt.py"), "--plan",
                           str(compiled))
    assert_one_line_error(code, err, "fingerprint")


def test_measure_rejects_another_batch_size(capsys, compiled):
    code, _, err = run_cli(capsys, "measure", MODEL, "--plan", str(compiled),
                           "--batch-size", "3")
    assert_one_line_error(code, err, "batch size")


def test_compile_into_missing_folder_writes_nothing(capsys, tmp_path):
    out = tmp_path / "nope" / "p.json"
    code, _, err = run_cli(capsys, "compile", MODEL, "--budget", "64MB", "-o", str(out))
    assert_one_line_error(code, err, "does not exist")
    assert not out.parent.exists()


def test_compile_draws_the_timeline_with_the_plans_peak(capsys, tmp_path):
    picture = tmp_path / "timeline.png"
    code, out, _ = run_cli(capsys, "compile", str(EXAMPLES / "gpt.py"), "--budget-fraction",
                           "0.5", "--decisions", "recompute", "--timeline", str(picture),
                           "--repeats", "1", "--json", "-o", str(tmp_path / "p.json"))
    assert code == 0
    result = json.loads(out)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["timeline"]["predicted_peak_bytes"] == result["predicted_peak_bytes"]
    measured = result["timeline"]["measured_peak_bytes"]
    assert abs(measured - result["predicted_peak_bytes"]) <= 0.05 * measured
