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
