"""The short reliability suite (the long one is `make chaos`): every scenario against its own
real server, held to the targets the long suite must meet."""

from __future__ import annotations

import json

import pytest

from tests.chaos.scenarios import SCENARIOS, SHORT, targets


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_meets_its_targets(name):
    figures = SCENARIOS[name](SHORT)
    checks = targets(name, figures, long=False)
    assert all(checks.values()), f"{checks}: {json.dumps(figures)}"
