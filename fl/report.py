"""Write a simulation's results: per-round CSV and JSON, and accuracy against simulated time.

matplotlib is optional (the ``plots`` extra): without it the PNG is skipped with a
warning and everything else is still written.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Any

from fedplan.planner.plan import write_json_atomic

__all__ = ["CSV_COLUMNS", "write_outputs"]

CSV_COLUMNS = ("round", "simulated_seconds", "round_seconds", "accuracy", "test_loss",
               "train_loss", "selected", "participants", "below_keep_all", "skipped",
               "rejected", "stragglers", "violations", "max_peak_over_budget")


def _clean(value: Any) -> Any:
    """NaN/Inf become None so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """``metrics.csv``, ``result.json`` and ``accuracy.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    with open(out / "metrics.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(CSV_COLUMNS)
        for m in result["history"]:
            writer.writerow([m.get(c) for c in CSV_COLUMNS])
    written["csv"] = str(out / "metrics.csv")
    written["json"] = str(write_json_atomic(out / "result.json", _clean(result)))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'fedplan[plots]'); "
                      "skipping accuracy.png", stacklevel=2)
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [m["simulated_seconds"] for m in result["history"]]
    ys = [m["accuracy"] for m in result["history"]]
    ax.plot(xs, ys, marker=".", label=result.get("selector", ""))
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    written["png"] = str(out / "accuracy.png")
    return written
