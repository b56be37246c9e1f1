"""PNG plots of a run (matplotlib, the ``plots`` extra, imported only here and lazily)."""

from __future__ import annotations

import math
from pathlib import Path

from fedplan.errors import BadInputError
from fedplan.planner.plan import write_atomic

MIB = 2**20
COLORS = {"none": "C0", "all": "C1", "sqrt": "C2", "sac": "C3", "actnn2": "C4", "ilp": "C5",
          "ilp+compress": "C7", "greedy": "C6", "torch.compile": "C8"}
MARKERS = {"none": "*", "all": "s", "sqrt": "D", "sac": "^", "actnn2": "v", "ilp": "o",
           "ilp+compress": "P", "greedy": "x", "torch.compile": "h"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise BadInputError("plots need matplotlib; install it with "
                            "pip install 'fedplan[plots]' or pass --no-plots") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    return write_atomic(path, lambda stream: fig.savefig(stream, format="png", dpi=110,
                                                         bbox_inches="tight"), binary=True)


def pareto(points: list[dict], path: Path) -> Path:
    """Step-time overhead against measured peak, every planner, one panel per model."""
    plt = _pyplot()
    models = list(dict.fromkeys(p["model"] for p in points))
    columns = min(3, max(1, len(models)))
    rows = max(1, math.ceil(len(models) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for index, model in enumerate(models):
        axis = axes[index // columns][index % columns]
        mine = [p for p in points if p["model"] == model and p["status"] == "ok"
                and p["overhead"] is not None]
        for planner in dict.fromkeys(p["planner"] for p in mine):
            curve = sorted((p["measured_peak_bytes"] / MIB, 100 * p["overhead"])
                           for p in mine if p["planner"] == planner)
            xs, ys = zip(*curve)
            axis.plot(xs, ys, marker=MARKERS.get(planner, "."), label=planner,
                      color=COLORS.get(planner), linestyle="-" if len(curve) > 1 else "none")
        axis.set_title(model)
        axis.set_xlabel("measured peak (MiB)")
        axis.set_ylabel("step time vs keep-all (%)")
        axis.grid(alpha=0.3)
    for index in range(len(models), rows * columns):
        axes[index // columns][index % columns].axis("off")
    legend = {}  # every planner of every panel, once, same colour everywhere
    for row in axes:
        for axis in row:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                legend.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(list(legend.values()), list(legend), loc="upper center",
               ncol=max(1, min(9, len(legend))), bbox_to_anchor=(0.5, 1.0))
    result = _save(fig, path)
    plt.close(fig)
    return result


def predicted_vs_measured(points: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5.5, 5))
    pairs = [(p["measured_peak_bytes"] / MIB, p["predicted_peak_bytes"] / MIB, p["planner"])
             for p in points if p["status"] == "ok" and p["predicted_peak_bytes"]]
    for planner in dict.fromkeys(planner for *_, planner in pairs):
        xs = [m for m, _, name in pairs if name == planner]
        ys = [q for _, q, name in pairs if name == planner]
        axis.scatter(xs, ys, marker=MARKERS.get(planner, "."), label=planner,
                     color=COLORS.get(planner))
    if pairs:
        top = max(max(m, q) for m, q, _ in pairs) * 1.05
        axis.plot([0, top], [0, top], color="grey", linewidth=0.8, label="equal")
        axis.plot([0, top], [0, top * 1.05], color="grey", linewidth=0.5, linestyle=":")
        axis.plot([0, top], [0, top * 0.95], color="grey", linewidth=0.5, linestyle=":",
                  label="±5%")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("measured peak (MiB)")
    axis.set_ylabel("predicted peak (MiB)")
    if pairs:  # a --solver-only run has no model points: no legend to draw
        axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    result = _save(fig, path)
    plt.close(fig)
    return result


def solver_time(points: list[dict], solver_runs: list[dict], path: Path) -> Path:
    """Solve time against graph size: the example models' plans and the random graphs."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6, 4.5))
    for planner in ("ilp", "greedy"):
        xs = [p["graph_nodes"] for p in points if p["planner"] == planner
              and p["solve_seconds"] is not None]
        ys = [p["solve_seconds"] for p in points if p["planner"] == planner
              and p["solve_seconds"] is not None]
        if xs:
            axis.scatter(xs, ys, marker=MARKERS[planner], label=f"{planner} (example models)")
    for solver in dict.fromkeys(r["solver"] for r in solver_runs):
        runs = sorted((r["nodes"], r["solve_seconds"]) for r in solver_runs
                      if r["solver"] == solver)
        axis.plot(*zip(*runs), marker=MARKERS.get(solver, "."), linestyle="--",
                  label=f"{solver} (random layered graphs)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("graph nodes")
    axis.set_ylabel("solve time (s)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    result = _save(fig, path)
    plt.close(fig)
    return result


def write_plots(out: Path, payload: dict) -> list[Path]:
    points = payload["points"]
    return [pareto(points, out / "pareto.png"),
            predicted_vs_measured(points, out / "predicted_vs_measured.png"),
            solver_time(points, payload["solver_runs"], out / "solver_time.png")]
