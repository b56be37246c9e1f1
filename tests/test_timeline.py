"""The memory timeline picture: written, its peak the plan's, its measurement the measure's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedplan
from fedplan.planner.simulate import simulate
from fedplan.timeline import (
    PHASES,
    MeasuredTimeline,
    PhaseSpan,
    map_measured,
    measured_timeline,
    plot_timeline,
    positions,
    write_timeline,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(128, 128), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


@pytest.fixture(scope="module")
def planned():
    """An 8-layer MLP at batch 512 (activations 4x its weights), analysed once, and a
    recompute-only plan for it."""
    model = mlp()
    inputs = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(2))
    analysis = fedplan.analyze(model, inputs, targets, compress=False, repeats=1)
    plan, _ = fedplan.plan(model, inputs, targets, budget=fedplan.Budget(fraction=0.7),
                           analysis=analysis, compress=False, verify=False)
    return model, inputs, targets, analysis, plan


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # copying a pytree spec
def test_picture_is_a_png_and_its_peaks_are_the_plans(planned, tmp_path):
    model, inputs, targets, analysis, plan = planned
    before = [p.detach().clone() for p in model.parameters()]
    picture = write_timeline(tmp_path / "step.png", model, inputs, targets,
                             analysis=analysis, plan=plan, title="mlp")
    assert picture.path.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind
    predicted = simulate(analysis.graph, analysis.costs, plan.decision_map).peak_bytes
    assert picture.predicted_peak_bytes == predicted == plan.predicted_peak_bytes
    assert picture.keep_all_peak_bytes == plan.keep_all_peak_bytes
    assert picture.predicted_peak_bytes < picture.keep_all_peak_bytes  # the plan's panel
    # the measured planned step, drawn on the plan's panel, against fedplan.measure
    module = fedplan.PlannedModule(*copy.deepcopy((model, analysis.captured)), plan)
    measured = fedplan.measure(module, inputs, targets).peak_bytes
    assert picture.measured_peak_bytes == pytest.approx(measured, rel=0.02)
    # the user's model is not trained by the picture's measured steps
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_peak_label_names_the_operator_and_the_largest_category(planned, tmp_path):
    _, _, _, analysis, plan = planned
    keep_all = simulate(analysis.graph, analysis.costs)
    timeline = simulate(analysis.graph, analysis.costs, plan.decision_map)
    picture = plot_timeline(tmp_path / "p.png", keep_all=keep_all, planned=timeline,
                            graph=analysis.graph)
    assert picture.measured_peak_bytes is None
    largest = max(timeline.breakdown, key=timeline.breakdown.get).replace("_", " ")
    assert largest in picture.peak_label
    if timeline.peak_phase in ("forward", "backward", "recompute"):
        node = analysis.graph.node(timeline.peak_node)
        assert f"{timeline.peak_node} ({node.module_path}" in picture.peak_label


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(64, 512), nn.Linear(32, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, image, extra):
        return self.head(torch.relu(self.left(image) + self.right(extra)))


@pytest.mark.parametrize("as_dict", [False, True])
def test_measured_timeline_peak_is_the_measured_peak(as_dict):
    torch.manual_seed(0)
    model = TwoInputs()
    image, extra = torch.randn(512, 64), torch.randn(512, 32)
    inputs = {"image": image, "extra": extra} if as_dict else (image, extra)
    targets = torch.randint(0, 10, (512,))
    loss_fn = nn.functional.cross_entropy
    reference = copy.deepcopy(model)
    timeline = measured_timeline(model, inputs, targets, loss_fn,
                                 torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    measured = fedplan.measure(reference, inputs, targets, loss_fn=loss_fn)
    assert timeline.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02)
    assert timeline.start_bytes == measured.start_bytes == timeline.levels[0]
    # the hidden activation (512 x 512 float32 = 1 MiB) is allocated in the step
    assert timeline.peak_bytes - timeline.start_bytes >= 2**20
    assert [span.name for span in timeline.phases] == list(PHASES)
    for earlier, later in zip(timeline.phases, timeline.phases[1:]):
        assert earlier.start_ns <= earlier.end_ns <= later.start_ns
    assert list(timeline.times_ns) == sorted(timeline.times_ns)
    assert timeline.peak_phase in ("forward", "loss", "backward")


def test_measured_phases_map_linearly_onto_the_predicted_positions():
    measured = MeasuredTimeline(
        start_bytes=10, times_ns=(0, 50, 100, 150, 200, 250, 300, 400),
        levels=(10, 20, 30, 25, 40, 15, 12, 10),
        phases=(PhaseSpan("forward", 0, 100), PhaseSpan("loss", 100, 120),
                PhaseSpan("backward", 200, 300), PhaseSpan("optimizer", 350, 450)))
    spans = {"forward": (0.0, 10.0), "loss": (10.0, 11.0), "backward": (11.0, 21.0),
             "optimizer": (21.0, 22.0)}
    # 150 ns falls between the loss and the backward: the end of the loss
    assert map_measured(measured, spans) == [0.0, 5.0, 10.0, 11.0, 11.0, 16.0, 21.0, 21.5]
    assert measured.peak_bytes == 40 and measured.peak_phase == "backward"


def test_positions_widen_the_loss_and_the_optimizer(planned):
    _, _, _, analysis, _ = planned
    timeline = simulate(analysis.graph, analysis.costs)
    edges, spans = positions(timeline)
    assert len(edges) == len(timeline.events) + 1
    assert list(spans) == list(PHASES)
    wide = max(1.0, 0.04 * len(timeline.events))
    assert spans["loss"][1] - spans["loss"][0] == pytest.approx(wide)
    assert spans["optimizer"] == pytest.approx((edges[-1] - wide, edges[-1]))
    assert spans["forward"][1] == spans["loss"][0] and spans["loss"][1] == spans["backward"][0]


@pytest.mark.parametrize("name", ["missing/step.png", "step.jpg", "folder.png"])
def test_bad_path_is_one_line_bad_input(planned, tmp_path, name):
    _, _, _, analysis, _ = planned
    (tmp_path / "folder.png").mkdir()
    keep_all = simulate(analysis.graph, analysis.costs)
    with pytest.raises(fedplan.BadInputError) as error:
        plot_timeline(tmp_path / name, keep_all=keep_all, graph=analysis.graph)
    assert "\n" not in str(error.value) and name.split("/")[0] in str(error.value)
    assert not (tmp_path / "missing").exists() and not list(tmp_path.glob("*.jpg"))
