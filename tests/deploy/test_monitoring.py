"""Alert rules checked and unit-tested by promtool; every metric the dashboard and the rules
query is one tserve really exports (against a live /metrics scrape)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest
import yaml

from tests.conftest import DEFAULT_REPOSITORY, ROOT
from service.launcher import ServerProcess

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "tserve-dashboard.json"


def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    config = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name tserve can expose, from its # TYPE lines (children or not)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "summary": ["", "_sum", "_count"],
    }
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.M):
        names.update(name.removesuffix("_total") + s for s in suffixes.get(kind, [""]))
    return names


def queried_names(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in re.findall(r"\btserve_[a-z_]+", e)}


@pytest.fixture(scope="module")
def live_metrics() -> str:
    with ServerProcess(DEFAULT_REPOSITORY) as server:
        return urllib.request.urlopen(server.metrics_url).read().decode()


def test_dashboard_queries_only_exported_metrics(live_metrics):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = queried_names(exprs)
    assert len(used) >= 15
    missing = used - exported_names(live_metrics)
    assert not missing, f"the dashboard queries metrics tserve does not export: {sorted(missing)}"


def test_alert_rules_query_only_exported_metrics(live_metrics):
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = queried_names(exprs)
    assert used and not used - exported_names(live_metrics), sorted(used - exported_names(live_metrics))
