"""The measured cost model on small real models: exact bytes where they are known."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedplan
from fedplan.planner.simulate import simulate

MiB = 2**20


class Mlp(nn.Module):
    """Linear(256, 256) on a batch of 1024: every activation is exactly 1 MiB."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(depth))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_saved_bytes_are_exact_and_parameters_excluded():
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(1024, 256)
    analysis = fedplan.analyze(model, x, torch.zeros(1024, dtype=torch.long), repeats=1)
    costs = analysis.costs
    linears = [n.name for n in analysis.graph.nodes
               if n.target == "aten.linear.default" and n.module_path.startswith("layers.")]
    relus = [n.name for n in analysis.graph.nodes if n.target == "aten.relu.default"]
    assert len(linears) == 3 and len(relus) == 3
    # the first Linear saves only the model input (held by the caller, not counted)
    assert costs.saved_bytes(linears[0]) == 0
    # each later Linear saves its input, which is the previous relu's output: 1 MiB
    for name in linears[1:]:
        assert costs.saved_bytes(name) == MiB
    # relu saves its own output: 1 MiB, the same storage the next Linear saves
    for name in relus:
        assert costs.saved_bytes(name) == MiB
    assert costs.node[relus[0]].saved == costs.node[linears[1]].saved
    assert costs.param_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert costs.optimizer_state_bytes == costs.param_bytes  # SGD momentum


def test_views_alias_their_base():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(64))

        def forward(self, x):
            y = torch.sin(x * self.scale)
            return y.view(-1, 16).sum(1).view(-1, 1)

    x = torch.randn(64, 64)
    analysis = fedplan.analyze(Views(), x, loss_fn=lambda out, _t: out.sum(), repeats=1)
    sin = next(n.name for n in analysis.graph.nodes if n.target == "aten.sin.default")
    view = next(n for n in analysis.graph.nodes if n.inputs == (sin,))
    assert analysis.costs.node[view.name].outputs == analysis.costs.node[sin].outputs
    assert analysis.costs.node[view.name].allocates == ()


def test_inplace_ops_are_detected():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(32, 32)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.linear(x))

    analysis = fedplan.analyze(InPlace(), torch.randn(8, 32), repeats=1)
    relu = next(n for n in analysis.graph.nodes if n.target == "aten.relu_.default")
    assert relu.module_path == "relu" and relu.module_type == "ReLU"
    assert analysis.costs.node[relu.name].mutates == ("linear",)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_predicted_keep_all_peak_matches_measured(optimizer):
    torch.manual_seed(0)
    model = Mlp()
    x, y = torch.randn(1024, 256), torch.randint(0, 10, (1024,))
    analysis = fedplan.analyze(model, x, y, optimizer=optimizer, repeats=1)
    predicted = simulate(analysis.graph, analysis.costs).peak_bytes
    measured = fedplan.measure(copy.deepcopy(model), x, y, optimizer=optimizer).peak_bytes
    # the simulator replays the same allocations the profiler records: within 1%
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


def test_profiling_leaves_batchnorm_statistics_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    fedplan.analyze(model, torch.randn(2, 3, 8, 8), loss_fn=lambda o, _t: o.sum(), repeats=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_analytic_mode_scales_with_device_speed():
    from fedplan.planner.cost import analytic_costs
    model = Mlp()
    analysis = fedplan.analyze(model, torch.randn(1024, 256), repeats=1)
    fast = analytic_costs(analysis.costs, flops_per_second=1e10, device_speed=1.0)
    slow = analytic_costs(analysis.costs, flops_per_second=1e10, device_speed=0.25)
    name = next(n.name for n in analysis.graph.nodes
                if n.target == "aten.linear.default" and n.module_path == "layers.0")
    assert fast.node[name].flops == 2 * 1024 * 256 * 256
    assert slow.node[name].forward_seconds == pytest.approx(4 * fast.node[name].forward_seconds)


def test_checkpoint_calls_inside_the_model_are_disclosed():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(16, 16)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)

    with pytest.warns(UserWarning, match="torch.utils.checkpoint"):
        analysis = fedplan.analyze(Checkpointed(), torch.randn(4, 16), repeats=1,
                                   loss_fn=lambda o, _t: F.mse_loss(o, torch.zeros_like(o)))
    assert any("checkpoint" in note for note in analysis.notes)
    assert any(n.module_path == "block" for n in analysis.graph.nodes)
