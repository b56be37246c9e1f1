"""Blocks from the graph (fedplan/fl/strategies/partition.py): which cuts a hand-written
model offers, how they group into blocks, and block-wise strategies on a model that is
not an nn.Sequential."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fedplan.errors import BadInputError
from fedplan.fl.strategies.blocks import blocks_of
from fedplan.fl.strategies.partition import cut_points, graph_blocks, trace


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class ResNet(nn.Module):
    """A residual CNN whose forward is written by hand (root-level relu, pool, flatten)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer1 = Residual(8)
        self.layer2 = Residual(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


class LongSkip(nn.Module):
    """A U-Net-like skip: enc1's output is added after enc2 and dec."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Linear(6, 6)
        self.enc2 = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a = self.enc1(x)
        return self.head((self.dec(self.enc2(a)) + a).flatten(1))


def _unit_nodes(blocks):
    return [[[n.name for n in unit.graph.nodes if n.op not in ("placeholder", "output")]
             for unit in block] for block in blocks]


def test_residual_cnn_cuts_and_blocks():
    torch.manual_seed(0)
    model = ResNet()
    example = torch.rand(4, 1, 8, 8)
    cuts = cut_points(trace(model, example))
    # not after layer1_conv or layer1_bn (the skip's x crosses with them), nor after the
    # head (the end)
    assert [c.node for c in cuts] == ["stem", "relu", "add", "relu_1", "add_1", "relu_2",
                                      "adaptive_avg_pool2d", "flatten"]
    assert [c.owner for c in cuts] == ["stem", "", "layer1", "layer1", "layer2", "layer2",
                                       "", ""]
    assert cuts[-2].shape == (4, 8, 1, 1) and cuts[-1].shape == (4, 8)
    blocks = graph_blocks(model, example)
    # root-level relu joins layer1's block; pooling and flatten join the head's
    assert _unit_nodes(blocks) == [
        [["stem"]],
        [["relu"], ["layer1_conv", "layer1_bn", "add"], ["relu_1"]],
        [["layer2_conv", "layer2_bn", "add_1"], ["relu_2"]],
        [["adaptive_avg_pool2d"], ["flatten"], ["head"]]]
    assert blocks_of(model, "test", example)  # a non-Sequential model is accepted


def test_containers_of_blocks_are_looked_into():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.layers = nn.Sequential(Residual(8), Residual(8))  # a stack of blocks
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(8, 10))  # plain layers: one owner

        def forward(self, x):
            return self.head(self.layers(self.stem(x)))

    assert _unit_nodes(graph_blocks(Stacked(), torch.rand(2, 1, 8, 8))) == [
        [["stem"]],
        [["layers_0_conv", "layers_0_bn", "add"], ["relu"]],
        [["layers_1_conv", "layers_1_bn", "add_1"], ["relu_1"]],
        [["head_0"], ["head_1"], ["head_2"]]]


def test_blocks_share_the_model_and_run_any_batch_in_both_modes():
    torch.manual_seed(0)
    model = ResNet()
    blocks = graph_blocks(model, torch.rand(4, 1, 8, 8))
    ours = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    theirs = [t for b in blocks for t in list(b.parameters()) + list(b.buffers())]
    assert {id(t) for t in theirs} == ours
    x = torch.rand(7, 1, 8, 8)  # another batch size than the traced one
    for mode in (True, False):  # BatchNorm's batch statistics, then its running ones
        model.train(mode)
        before = copy.deepcopy(model.state_dict())
        expected = model(x)
        after = copy.deepcopy(model.state_dict())
        model.load_state_dict(before)
        y = x
        for block in blocks:
            y = block(y)
        assert torch.equal(y, expected)
        # the blocks update the model's own running statistics, exactly as it does
        assert all(torch.equal(model.state_dict()[k], v) for k, v in after.items())


def test_a_cut_inside_a_skip_is_never_offered():
    model = LongSkip()
    example = torch.rand(2, 6)
    cuts = cut_points(trace(model, example))
    assert [c.node for c in cuts] == ["enc1", "add", "flatten"]
    assert _unit_nodes(graph_blocks(model, example)) == [
        [["enc1"]], [["enc2", "dec", "add"]], [["flatten"], ["head"]]]


def test_in_place_reader_and_shared_module():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = self.a(x)
            x.relu_()  # a cut before it would let the next block write into its input
            return self.b(x)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.c(self.a(self.b(self.a(x))))  # a used twice: a..a is one block

    example = torch.rand(2, 4)
    # after a: relu_ would change the next block's input in place; after relu_: a's
    # tensor (changed in place) crosses, and relu_ stays before the cut
    assert [(c.index, c.node) for c in cut_points(trace(InPlace(), example))] == [(2, "a")]
    assert _unit_nodes(graph_blocks(InPlace(), example)) == [[["a", "relu_"]], [["b"]]]
    blocks = graph_blocks(Shared(), example)
    assert _unit_nodes(blocks) == [[["a"], ["b"], ["a_1"]], [["c"]]]


def test_root_parameters_and_tied_weights():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.pos = nn.Parameter(torch.zeros(4))  # the root's own parameter

        def forward(self, x):
            return self.head(self.mix(self.embed(x) + self.pos))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):  # a head tied to the first layer's weight
            return nn.functional.linear(self.mix(self.embed(x)), self.embed.weight)

    example = torch.rand(2, 4)
    # adding the root's parameter is root-level work: it joins the next block
    assert _unit_nodes(graph_blocks(Positional(), example)) == [
        [["embed"]], [["pos", "add"], ["mix"]], [["head"]]]
    assert [c.node for c in cut_points(trace(Tied(), example))] == ["embed", "mix"]
    with pytest.raises(BadInputError, match="weight-tied head"):
        graph_blocks(Tied(), example)


def test_models_that_cannot_be_cut_say_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: fx cannot trace it
                return self.a(x)
            return self.b(x)

    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) + x

    with pytest.raises(BadInputError, match="fx cannot trace Branchy") as info:
        graph_blocks(Branchy(), torch.rand(2, 4), "profl")
    assert "\n" not in str(info.value) and "nn.Sequential" in str(info.value)
    with pytest.raises(BadInputError, match="at least two blocks"):
        graph_blocks(OneBlock(), torch.rand(2, 4))


def test_sequential_models_keep_their_children():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [type(b) for b in blocks_of(model)] == [nn.Linear, nn.ReLU, nn.Linear]


# --------------------------------------------------------------------------- strategies


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from .conftest import TINY_MODEL

    path = tmp_path_factory.mktemp("graph-blocks") / "tiny.py"
    path.write_text(TINY_MODEL)  # stem, a Sequential of residual blocks, a head: by hand
    return path


def test_block_profile_of_a_hand_written_model(tiny_file):
    """Blocks: the stem; the root-level relu with the first residual block (the stack is an
    nn.Sequential of blocks: each is an owner); the second; the third; pooling, flatten
    and the head. Each block's keep-all peak is fedplan's prediction for it and its output
    module (8x8 digits, batch 8)."""
    from fedplan.fl.strategies.blocks import block_profile
    from fedplan.modelfile import load_model_file

    profile = block_profile(load_model_file(tiny_file), 8, "profl")
    # trained parameters: the block's plus its output module's (pool, Linear(8, 10): 90)
    assert [b["parameters"] for b in profile] == [80 + 90] + [872 + 90] * 3 + [1290]
    assert [b["output_shape"] for b in profile] == [[8, 8, 8]] * 4 + [[10]]
    peaks = [b["keep_all_bytes"] for b in profile]
    # the residual blocks at full resolution hold the most; the first one a ReLU more
    assert peaks[2] == peaks[3] < peaks[1] and max(peaks) == peaks[1]
    assert min(peaks) == peaks[4]  # the head: no spatial activations


@pytest.mark.parametrize("strategy", ["profl", "neulite", "smartsplit"])
def test_block_strategies_train_a_hand_written_model(tiny_file, strategy):
    """Three rounds on 8x8 digits with budgets at 0.5 and 1.2 of the whole model's keep-all
    peak: every participant's measured peak within its budget, the 0.5 clients train
    (their block, or the part before a cut), and the stages advance one block a round (of
    five blocks)."""
    from fedplan.fl import data
    from fedplan.fl.server import SimConfig, run_simulation

    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    result = run_simulation(SimConfig(
        model=str(tiny_file), dataset="digits", strategy=strategy, num_clients=6, rounds=3,
        clients_per_round=3, tiers="0.5,1.2", partition="iid", epochs=1, lr=0.05, seed=0,
        plan_time_limit=3.0))
    keep_all = result["federation"]["keep_all_peak_bytes"]
    peaks = [p for m in result["history"] for p in m["peaks"]]
    assert result["budget_violations"] == 0 and result["rejected"] == 0
    assert all(0 < peak <= budget for _, peak, budget in peaks)
    assert any(budget < keep_all for _, _, budget in peaks)
    if strategy != "smartsplit":
        assert [m["stage"] for m in result["history"]] == [0, 1, 2]
    else:
        assert sum(m["edge_clients"] for m in result["history"]) > 0


def test_output_modules_follow_what_the_model_predicts():
    """Sequence features get a per-position head when the model predicts per position
    (a next-token model's (B, T, V)), a mean over positions when it predicts per sample."""
    from fedplan.fl.strategies.blocks import output_module

    features = torch.rand(2, 5, 4)
    assert output_module(features, 3)(features).shape == (2, 5, 3)
    assert output_module(features, 3, per_position=False)(features).shape == (2, 3)
    images = torch.rand(2, 6, 3, 3)
    assert output_module(images, 3)(images).shape == (2, 3)
