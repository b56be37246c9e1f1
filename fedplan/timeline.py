"""The memory timeline picture: one training step, predicted against measured.

Three entry points:

* ``measured_timeline(module, inputs, targets, loss_fn, optimizer)`` runs one real step
  under the profiler (after a warm-up step) and returns the bytes held over time with the
  time spans of its phases (forward, loss, backward, optimizer), as plain data;
* ``plot_timeline(path, keep_all=..., planned=..., measured=..., graph=...)`` draws the
  simulator's timelines (``planner.simulate``) side by side, stacked by category, with the
  predicted level, the measured level mapped onto the same positions, and the peak marked
  with its operator and the categories that hold it; it writes the PNG atomically;
* ``write_timeline(path, model, inputs, targets, analysis=..., plan=...)`` does both for
  a model and a plan on copies of the model: what ``--timeline FILE.png`` calls.

The x axis is the simulator's positions (one per event; the loss and the optimizer step
are widened so that they stay visible). A measured phase's time span is mapped linearly
onto the same phase's positions, so the two lines meet at every phase boundary.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from fedplan.planner.cost import tensors_in
from fedplan.planner.costmodel import LOSS
from fedplan.planner.errors import BadInputError
from fedplan.planner.ir import PlanGraph
from fedplan.planner.plan import Plan, write_atomic
from fedplan.planner.profiling import memory_deltas, memory_profile
from fedplan.planner.simulate import CATEGORIES, Timeline, simulate
from fedplan.runtime.measure import held_bytes  # the storages fedplan.measure counts

from .modelfile import call_model, default_loss

PHASES = ("forward", "loss", "backward", "optimizer")
MIB = 2**20
COLORS = {"parameters": "#4c72b0", "optimizer_state": "#8172b3", "inputs": "#937860",
          "gradients": "#dd8452", "saved_activations": "#55a868", "temporaries": "#c44e52"}
_RANGE = "fedplan.timeline."  # prefix of the record_function ranges around each phase


@dataclass(frozen=True)
class PhaseSpan:
    name: str        # forward | loss | backward | optimizer
    start_ns: int    # since the step began
    end_ns: int


@dataclass(frozen=True)
class MeasuredTimeline:
    """Bytes held during one real step: ``levels[i]`` from ``times_ns[i]`` on.

    ``levels[0]`` is ``start_bytes`` (parameters, buffers, optimizer state and the batch,
    held when the step begins) at time 0; every later entry follows one allocation or
    free of the profiler's memory events. The maximum is ``fedplan.measure``'s peak.
    """

    start_bytes: int
    times_ns: tuple[int, ...]
    levels: tuple[int, ...]
    phases: tuple[PhaseSpan, ...]

    @property
    def peak_bytes(self) -> int:
        return max(self.levels)

    @property
    def peak_phase(self) -> str:
        moment = self.times_ns[self.levels.index(self.peak_bytes)]
        return next((span.name for span in self.phases
                     if span.start_ns <= moment <= span.end_ns), "")

    def to_json(self) -> dict:
        return {"start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase, "times_ns": list(self.times_ns),
                "levels": list(self.levels),
                "phases": [[s.name, s.start_ns, s.end_ns] for s in self.phases]}


@dataclass(frozen=True)
class TimelinePicture:
    """What a picture shows, read back from the plotted lines."""

    path: Path
    predicted_peak_bytes: int         # the plan's panel (keep-all's when there is no plan)
    keep_all_peak_bytes: int
    measured_peak_bytes: int | None   # the measurement drawn on the same panel
    peak_label: str                   # the operator at the predicted peak, as written


def measured_timeline(module: nn.Module, inputs: Any, targets: Any, loss_fn: Callable,
                      optimizer: torch.optim.Optimizer, *, warmup: int = 1
                      ) -> MeasuredTimeline:
    """Run ``warmup`` steps, then one profiled step; return its memory level over time.

    ``inputs`` is a tensor, a tuple (positional) or a dict (keyword inputs). The module
    and the optimizer are trained: pass copies if that matters. CPU only: the level is
    read from the profiler's CPU memory events.
    """
    batch = tensors_in(inputs) + tensors_in(targets)
    if any(tensor.device.type != "cpu" for tensor in batch):
        raise BadInputError("the measured timeline reads the profiler's CPU memory events; "
                            "found inputs on another device; measure on the CPU, or draw "
                            "the predictions alone (write_timeline(..., measure=False))")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with record_function(_RANGE + "forward"):
            outputs = call_model(module, inputs)
        with record_function(_RANGE + "loss"):
            loss = loss_fn(outputs, targets)
        # the outputs are the loss's to keep or free, as in fedplan.measure's step (GPT's
        # logits held here measured 1 MiB above it)
        del outputs
        with record_function(_RANGE + "backward"):
            loss.backward()
        with record_function(_RANGE + "optimizer"):
            optimizer.step()

    for _ in range(max(warmup, 1)):  # the first step creates the optimizer state
        step()
    optimizer.zero_grad(set_to_none=True)
    start_bytes = held_bytes(module, optimizer, batch)
    with memory_profile() as prof:
        step()
    spans = {}
    for event in prof.profiler.kineto_results.events():
        if event.name().startswith(_RANGE):
            spans[event.name()[len(_RANGE):]] = (event.start_ns(), event.end_ns())
    if set(spans) != set(PHASES):
        raise BadInputError(f"expected the profiler to record the phases {PHASES}; found "
                            f"{sorted(spans)}; report this with your PyTorch version")
    origin = min(start for start, _ in spans.values())
    times, levels, level = [0], [start_bytes], start_bytes
    for moment, delta in memory_deltas(prof):
        level += delta
        times.append(max(moment - origin, 0))
        levels.append(level)
    phases = tuple(PhaseSpan(name, spans[name][0] - origin, spans[name][1] - origin)
                   for name in PHASES)
    return MeasuredTimeline(start_bytes=start_bytes, times_ns=tuple(times),
                            levels=tuple(levels), phases=phases)


# ---- positions -------------------------------------------------------------------------

def event_phase(phase: str, node: str) -> str:
    """The picture's phase of a simulator event: the loss's forward event is ``loss``."""
    if phase == "forward":
        return "loss" if node == LOSS else "forward"
    return "optimizer" if phase == "optimizer" else "backward"


def positions(timeline: Timeline) -> tuple[list[float], dict[str, tuple[float, float]]]:
    """Left edge of every event (plus the right end) and each phase's span of positions.

    An event is one position wide; the loss and the optimizer step (one event each) are
    widened to 4 % of the step so that their bands and the measured line inside them show.
    """
    wide = max(1.0, 0.04 * len(timeline.events))
    edges, spans, x = [], {}, 0.0
    for event in timeline.events:
        phase = event_phase(event.phase, event.node)
        edges.append(x)
        x += wide if phase in ("loss", "optimizer") else 1.0
        start, _ = spans.get(phase, (edges[-1], x))
        spans[phase] = (start, x)
    edges.append(x)
    return edges, spans


def map_measured(measured: MeasuredTimeline, spans: Mapping[str, tuple[float, float]]
                 ) -> list[float]:
    """x of every measured sample: each phase's time span onto its span of positions.

    Samples outside every phase (between two of them, or the ``zero_grad`` before the
    forward) go to the end of the phase before them, or to 0 before the first.
    """
    xs = []
    for moment in measured.times_ns:
        x = 0.0
        for span in measured.phases:
            low, high = spans.get(span.name, (0.0, 0.0))
            if moment < span.start_ns:
                break
            if moment <= span.end_ns:
                fraction = (moment - span.start_ns) / max(span.end_ns - span.start_ns, 1)
                x = low + fraction * (high - low)
                break
            x = high
        xs.append(x)
    return xs


# ---- the picture -----------------------------------------------------------------------

def check_path(path: str | os.PathLike) -> Path:
    """A writable ``.png`` path in an existing folder, or a one-line BadInputError."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise BadInputError(f"the timeline is a PNG picture; expected a path ending in .png, "
                            f"found {str(path)!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"cannot write the timeline to {str(path)!r}: folder "
                            f"{str(folder)!r} does not exist")
    if path.is_dir():
        raise BadInputError(f"cannot write the timeline to {str(path)!r}: it is a folder")
    return path


def describe_peak(timeline: Timeline, graph: PlanGraph) -> str:
    """'backward of conv1 (layer1.0.conv1, Conv2d)' and the categories holding the peak."""
    node = timeline.peak_node
    if node == LOSS:
        where = "the loss"
    elif timeline.peak_phase == "optimizer":
        where = "the optimizer step"
    else:
        try:
            ir = graph.node(node)
            kind = ir.module_type or ir.target
            where = f"{timeline.peak_phase} of {node} ({ir.module_path or '<root>'}, {kind})"
        except KeyError:
            where = f"{timeline.peak_phase} of {node}"
    largest = sorted(((nbytes, name) for name, nbytes in timeline.breakdown.items()
                      if nbytes > 0), reverse=True)[:3]
    held = ", ".join(f"{name.replace('_', ' ')} {nbytes / MIB:.1f}" for nbytes, name in largest)
    return f"at {where}\nheld by (MiB): {held}"


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise BadInputError("the timeline picture needs matplotlib; install it with "
                            "pip install 'fedplan[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panel(axis, timeline: Timeline, measured: MeasuredTimeline | None, graph: PlanGraph,
           label: str) -> tuple[int, int | None, str]:
    """Draw one timeline; return the peaks read back from the plotted lines, and the label."""
    edges, spans = positions(timeline)
    for index, phase in enumerate(PHASES):
        if phase not in spans:
            continue
        low, high = spans[phase]
        axis.axvspan(low, high, color="0.93" if index % 2 == 0 else "0.86", zorder=0, lw=0)
        axis.text((low + high) / 2, 0.985, phase, transform=axis.get_xaxis_transform(),
                  ha="center", va="top", fontsize=8, color="0.3", rotation=90 * (
                      (high - low) < 0.08 * edges[-1]))
    bottom = [0.0] * len(edges)
    for column, category in enumerate(CATEGORIES):
        values = [event.levels[column] / MIB for event in timeline.events]
        top = [b + v for b, v in zip(bottom, values + values[-1:])]
        axis.fill_between(edges, bottom, top, step="post", color=COLORS[category], lw=0,
                          alpha=0.85, label=category.replace("_", " "))
        bottom = top
    predicted = [event.peak_inside / MIB for event in timeline.events]
    line, = axis.step(edges, predicted + predicted[-1:], where="post", color="black", lw=1.2,
                      label="predicted (transients included)")
    # read the peak back from what was drawn: division by 2**20 is exact in floating point
    plotted_peak = int(max(line.get_ydata()) * MIB)
    at = max(range(len(predicted)), key=lambda i: (predicted[i], -i))
    x_peak = (edges[at] + edges[at + 1]) / 2
    text = f"predicted peak {plotted_peak / MIB:.1f} MiB\n" + describe_peak(timeline, graph)
    axis.plot([x_peak], [plotted_peak / MIB], marker="v", color="black", ms=8, zorder=5)
    axis.annotate(text, (x_peak, plotted_peak / MIB), xytext=(0.02, 0.90),
                  textcoords="axes fraction", fontsize=8, va="top",
                  bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9},
                  arrowprops={"arrowstyle": "->", "color": "0.3"})
    measured_peak = None
    if measured is not None:
        xs = map_measured(measured, spans)
        mline, = axis.plot(xs, [level / MIB for level in measured.levels],
                           drawstyle="steps-post", color="#e377c2", lw=1.0,
                           label="measured (mapped onto the positions)")
        measured_peak = int(max(mline.get_ydata()) * MIB)
        top = measured.levels.index(measured.peak_bytes)
        axis.plot([xs[top]], [measured_peak / MIB], marker="o", color="#e377c2", ms=5, zorder=5)
    title = f"{label}: predicted peak {plotted_peak / MIB:.1f} MiB"
    if measured_peak is not None:
        title += f", measured {measured_peak / MIB:.1f} MiB"
    axis.set_title(title, fontsize=10)
    axis.set_xlim(0, edges[-1])
    axis.set_xlabel("position in the step (one per operator; loss and optimizer widened)")
    axis.grid(axis="y", alpha=0.3)
    return plotted_peak, measured_peak, text


def plot_timeline(path: str | os.PathLike, *, keep_all: Timeline,
                  planned: Timeline | None = None, measured: MeasuredTimeline | None = None,
                  measured_keep_all: MeasuredTimeline | None = None, graph: PlanGraph,
                  title: str = "", plan_label: str = "plan") -> TimelinePicture:
    """Write the timeline picture to ``path`` (a .png) and return what it shows.

    ``keep_all`` and ``planned`` are ``simulate`` results for the same ``graph``; with
    ``planned`` the two are side by side sharing the y axis, ``measured`` (a
    ``measured_timeline`` of the planned module) drawn on the plan's panel and
    ``measured_keep_all`` (of the unplanned model) on keep-all's. Without ``planned``
    there is one panel, and ``measured`` goes on it.
    """
    path = check_path(path)
    if not keep_all.events or (planned is not None and not planned.events):
        raise BadInputError("expected simulator timelines with events; found none; pass "
                            "simulate(graph, costs, decisions)")
    plt = _pyplot()
    panels = [(keep_all, measured_keep_all if planned is not None else measured, "keep-all")]
    if planned is not None:
        panels.append((planned, measured, plan_label))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.8), sharey=True,
                             squeeze=False)
    drawn = []
    try:
        for axis, (timeline, measurement, label) in zip(axes[0], panels):
            drawn.append(_panel(axis, timeline, measurement, graph, label))
        axes[0][0].set_ylabel("MiB held")
        # the highest line at 74 % of the height leaves the top to the phase names and the
        # peak's label box
        highest = max(max(peak, measured_peak or 0) for peak, measured_peak, _ in drawn)
        axes[0][0].set_ylim(0, highest / MIB / 0.74)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout(rect=(0, 0.09, 1, 1))
        write_atomic(path, lambda stream: fig.savefig(stream, format="png", dpi=110),
                     binary=True)
    except IsADirectoryError as exc:
        raise BadInputError(f"cannot write the timeline to {str(path)!r}: it is a folder") \
            from exc
    finally:
        plt.close(fig)
    (keep_peak, _, label), last = drawn[0], drawn[-1]
    return TimelinePicture(path=path, predicted_peak_bytes=last[0], keep_all_peak_bytes=keep_peak,
                           measured_peak_bytes=last[1], peak_label=last[2])


def write_timeline(path: str | os.PathLike, model: nn.Module, inputs: Any, targets: Any, *,
                   analysis, plan: Plan | None = None, loss_fn: Callable | None = None,
                   optimizer: str = "sgd", measure: bool = True, title: str = "",
                   packed_bytes: Mapping[str, int] | None = None) -> TimelinePicture:
    """Simulate keep-all and ``plan``, measure both on copies of ``model``, and plot them.

    ``analysis`` is the ``fedplan.analyze`` (or ``fedplan.plan``) result for ``model`` and
    ``inputs``; it must have measured compression when ``plan`` compresses. ``model`` is
    not trained: the measured steps run on deep copies. With ``measure=False`` only the
    predictions are drawn (no training step runs).
    """
    from fedplan.planner.optimizers import check_optimizer, make_optimizer
    from fedplan.runtime.rewrite import PlannedModule

    path = check_path(path)  # before any work
    check_optimizer(optimizer)
    step = getattr(plan, "step_choice", None)
    if step is not None and not step.is_ordinary:
        # the simulator's whole-step replay and train_step's phases are not drawn yet
        raise BadInputError(f"the timeline picture draws plans with an ordinary step; this "
                            f"plan has {step.describe()}; plan without step-level decisions "
                            f"to draw it")
    loss_fn = loss_fn or default_loss
    keep_all = simulate(analysis.graph, analysis.costs)
    planned = (simulate(analysis.graph, analysis.costs, plan.decision_map,
                        packed_bytes=packed_bytes) if plan is not None else None)
    measured = measured_keep_all = None
    if measure:
        reference = copy.deepcopy(model)
        measured_keep_all = measured_timeline(
            reference, inputs, targets, loss_fn, make_optimizer(optimizer, reference.parameters()))
        if plan is not None:
            # one deepcopy of both keeps the captured graph's parameters the copy's own
            with warnings.catch_warnings():  # copying the captured pytree specs warns
                warnings.filterwarnings("ignore", category=FutureWarning)
                shadow, captured = copy.deepcopy((model, analysis.captured))
            planned_module = PlannedModule(shadow, captured, plan)
            measured = measured_timeline(planned_module, inputs, targets, loss_fn,
                                         make_optimizer(optimizer, planned_module.parameters()))
        else:
            measured, measured_keep_all = measured_keep_all, None
    label = f"{plan.solver} plan" if plan is not None else "plan"
    return plot_timeline(path, keep_all=keep_all, planned=planned, measured=measured,
                         measured_keep_all=measured_keep_all, graph=analysis.graph,
                         title=title, plan_label=label)


__all__: Sequence[str] = (
    "MeasuredTimeline", "PhaseSpan", "TimelinePicture", "check_path", "describe_peak",
    "map_measured", "measured_timeline", "plot_timeline", "positions", "write_timeline")
