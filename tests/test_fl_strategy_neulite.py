"""The neulite round policy (fedplan/fl/strategies/neulite.py) on the real workloads."""

from __future__ import annotations

import pytest

from .test_fl_common import check_deadline, check_faults, check_learns, check_resume

STRATEGY = "neulite"


@pytest.mark.parametrize("dataset", ["fashion-mnist", "shakespeare"])
def test_learns_within_every_budget(dataset):
    check_learns(dataset, STRATEGY)


def test_faults_are_rejected():
    check_faults("shakespeare", STRATEGY)
    check_deadline("shakespeare", STRATEGY)


def test_resume_gives_the_same_result(tmp_path):
    check_resume("shakespeare", STRATEGY, tmp_path)


def test_compression_term_is_the_hsic_of_input_and_block_output():
    """nHSIC from B x B Gram matrices equals the feature-form nHSIC; MentorModule returns
    the part's outputs unchanged and nHSIC(its input, block k's output)."""
    import torch
    from torch import nn

    from fedplan.fl.strategies.neulite import (
        MentorModule,
        normalized_hsic,
        normalized_hsic_gram,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(normalized_hsic_gram(x, z), normalized_hsic(x, z), rtol=1e-12)
    assert torch.allclose(normalized_hsic_gram(x, x), torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(5, 4), nn.ReLU()), nn.Linear(4, 2)
    outputs, compression = MentorModule(body, head)(x.float())
    assert torch.equal(outputs, head(body(x.float())))
    assert torch.equal(compression, normalized_hsic_gram(x.float(), body(x.float())))


def test_compression_weight_trains_under_plans_for_the_wrapped_part():
    """NeuLite with compression_weight 0.5 on 8x8 digits (3 rounds, one block a round):
    every stage's plans are made for the wrapped part (it returns the compression term),
    every measured peak is within its budget, and the weights differ from the run without
    the term from round 1 on."""
    import numpy as np

    from fedplan.fl import data
    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads
    from fedplan.fl.strategies.neulite import MentorModule

    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    runs = {}
    for weight in (0.0, 0.5):
        config = SimConfig(dataset="digits", num_clients=4, rounds=3, clients_per_round=2,
                           strategy="neulite",
                           strategy_options={"compression_weight": weight} if weight else {},
                           partition="iid", tiers="0.7,1.2", epochs=1, lr=0.05, seed=0)
        run = Server(build_federation(config))
        with torch_threads(1):
            run.run_round()
        runs[weight] = (run, dict(run.weights))
        with torch_threads(1):
            run.run_round()
            run.run_round()
    plain, mentored = runs[0.0][0], runs[0.5][0]
    assert isinstance(mentored.policy.stage_cache(0).model_factory(), MentorModule)
    assert not isinstance(plain.policy.stage_cache(0).model_factory(), MentorModule)
    for run in (plain, mentored):
        assert [m["stage"] for m in run.history] == [0, 1, 2]
        assert run.result()["budget_violations"] == 0
        assert all(0 < peak <= budget for m in run.history for _, peak, budget in m["peaks"])
    first_plain, first_mentored = runs[0.0][1], runs[0.5][1]
    assert any(not np.array_equal(first_plain[k], first_mentored[k]) for k in first_plain)


def test_cli_hsic_compression_needs_neulite(capsys):
    from fedplan.cli import main

    assert main(["fl", "simulate", "--strategy", "profl", "--hsic-compression", "0.5"]) == 2
    assert "applies to --strategy neulite" in capsys.readouterr().err
    assert main(["fl", "simulate", "--strategy", "neulite", "--hsic-compression", "-1"]) == 2
    assert "--hsic-compression >= 0" in capsys.readouterr().err
