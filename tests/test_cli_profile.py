"""`fedplan profile` and its handling of bad input: one line, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedplan.cli import main
from fedplan.errors import BadInputError
from fedplan.units import parse_size

from .conftest import EXAMPLES

GOOD_TAIL = """
def example_batch(batch_size):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 8, generator=g), torch.zeros(batch_size, dtype=torch.long)
"""


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    # progress lines may precede it; the error itself is exactly one line
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_profile_json_reports_prediction_and_measurement(capsys):
    code, out, _ = run_cli(capsys, "profile", str(EXAMPLES / "mnist_cnn.py"), "--json",
                           "--repeats", "1", "--steps", "1")
    assert code == 0
    data = json.loads(out)
    for key in ("predicted_peak_bytes", "measured_peak_bytes", "breakdown"):
        assert key in data
    assert set(data["breakdown"]) == {"parameters", "optimizer_state", "inputs", "gradients",
                                      "saved_activations", "temporaries"}
    assert sum(data["breakdown"].values()) == data["predicted_peak_bytes"]
    assert abs(data["prediction_error"]) < 0.05
    assert data["batch_size"] == 32


def test_profile_table_output(capsys):
    code, out, _ = run_cli(capsys, "profile", str(EXAMPLES / "mnist_cnn.py"), "--repeats", "1",
                           "--steps", "1", "--batch-size", "4")
    assert code == 0
    assert "predicted peak" in out and "measured peak" in out and "conv1" in out


def test_missing_file(capsys):
    code, _, err = run_cli(capsys, "profile", "does/not/exist.py")
    assert_one_line_error(code, err, "not found")


def test_file_without_build_model(capsys, write_model):
    path = write_model("import torch\n" + GOOD_TAIL)
    code, _, err = run_cli(capsys, "profile", str(path))
    assert_one_line_error(code, err, "build_model")


def test_example_batch_with_wrong_shape(capsys, write_model):
    path = write_model("""
        import torch
        def build_model():
            return torch.nn.Linear(8, 2)
        def example_batch(batch_size):
            return torch.randn(3, 8)
    """)
    code, _, err = run_cli(capsys, "profile", str(path))
    assert_one_line_error(code, err, "(inputs, targets)")


def test_example_batch_with_wrong_batch_dimension(capsys, write_model):
    path = write_model("""
        import torch
        def build_model():
            return torch.nn.Linear(8, 2)
        def example_batch(batch_size):
            return torch.randn(3, 8), torch.zeros(3, dtype=torch.long)
    """)
    code, _, err = run_cli(capsys, "profile", str(path), "--batch-size", "5")
    assert_one_line_error(code, err, "batch dimension")


UNTRACEABLE = """
import torch
from torch import nn

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x)
        return x

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.gate(x))

def build_model():
    torch.manual_seed(0)
    return Net()
""" + GOOD_TAIL


def test_data_dependent_control_flow_names_the_users_line(capsys, write_model):
    path = write_model(UNTRACEABLE)
    code, _, err = run_cli(capsys, "profile", str(path))
    # the line of `if x.sum() > 0:` in the written file, and what to do
    line = UNTRACEABLE.splitlines().index("        if x.sum() > 0:") + 1
    assert_one_line_error(code, err, "control flow depends on a tensor's value",
                          f"model.py:{line}", "torch.cond")


# symbolic tracing failed on both: a mask from torch.ones of the input's length, and a
# buffer sliced by a length read from the input; torch.export captures them
SIZE_DEPENDENT = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.register_buffer("positions", torch.arange(32))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.ones(t, t).tril()
        h = self.embed(x) + self.embed(self.positions[:t] % 16)
        h = (mask / mask.sum(-1, keepdim=True)) @ h
        return self.head(h.mean(1))

def build_model():
    torch.manual_seed(0)
    return Net()

def example_batch(batch_size):
    return torch.randint(0, 16, (batch_size, 6)), torch.randint(0, 2, (batch_size,))
"""


def test_size_dependent_code_that_fx_could_not_trace_profiles(capsys, write_model):
    path = write_model(SIZE_DEPENDENT)
    code, out, _ = run_cli(capsys, "profile", str(path), "--json", "--repeats", "1",
                           "--steps", "1")
    assert code == 0
    result = json.loads(out)
    assert result["measured_peak_bytes"] > 0
    assert abs(result["prediction_error"]) < 0.02


def test_unknown_option_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(EXAMPLES / "mnist_cnn.py"), "--optimizer", "rmsprop"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512 * 10**6), ("0.5GiB", 2**29), ("1e9", 10**9), ("1048576", 2**20),
    ("64 MiB", 64 * 2**20), ("2k", 2048), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12 parsecs", "-5MB", "0", "nan", "1e999"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInputError, match="expected"):
        parse_size(text)


def test_console_script_exits_2_without_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "fedplan", "profile",
                             str(tmp_path / "missing.py")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
