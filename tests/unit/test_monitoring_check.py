"""The dashboard and alert checker (scripts/check_monitoring.py, run by `make lint`) rejects
what would leave a panel empty or an alert silent: a metric the worker does not export, a
panel without a query, a query that is not PromQL, alerts that drift from the docs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.check_monitoring import (
    dashboard_problems,
    docs_problems,
    documented_alerts,
    exported_metrics,
    metric_names,
    rendered_problems,
)

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "helm" / "embedding-worker" / "dashboards" / "embedding-worker.json"
DOCS = ROOT / "docs" / "operations.md"


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metrics()


@pytest.fixture
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in dashboard["panels"] if p["title"] == title)


def test_exported_names_carry_the_series_suffixes_of_their_type(exported: set[str]) -> None:
    assert {
        "embedding_worker_events_consumed_total",  # counter
        "embedding_worker_events_dead_lettered_total",  # labelled counter, no sample yet
        "embedding_worker_api_request_seconds_bucket",  # labelled histogram, no sample yet
        "embedding_worker_api_request_seconds_count",
        "embedding_worker_end_to_end_seconds_sum",
        "embedding_worker_consumer_lag",  # gauge
        "embedding_worker_classifications_total",  # only with analysis
        "embedding_worker_decisions_applied_total",  # the learner's collector
        "embedding_worker_interactions_applied_total",  # the profiler's collector
    } <= exported
    assert "embedding_worker_events_consumed" not in exported
    assert "embedding_worker_end_to_end_seconds" not in exported


def test_metric_names_are_the_selected_series_not_functions_or_labels() -> None:
    query = (
        "histogram_quantile(0.95, sum by (le, outcome) "
        '(rate(embedding_worker_api_request_seconds_bucket{namespace=~"$namespace"}'
        "[$__rate_interval]))) / on() group_left sum(embedding_worker_ready)"
    )
    assert metric_names(query) == {
        "embedding_worker_api_request_seconds_bucket",
        "embedding_worker_ready",
    }
    assert metric_names('{__name__="embedding_worker_ready"}') == {"embedding_worker_ready"}
    with pytest.raises(ValueError, match="without a metric name"):
        metric_names('{__name__=~"embedding_worker_.*"}')
    with pytest.raises(ValueError):
        metric_names("sum(rate(embedding_worker_ready[5m])")


def test_the_shipped_dashboard_passes(dashboard: dict[str, Any], exported: set[str]) -> None:
    assert dashboard_problems(dashboard, exported) == []


def test_a_dashboard_naming_an_unknown_metric_is_rejected(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    target = panel(dashboard, "Events per second")["targets"][0]
    target["expr"] = target["expr"].replace(
        "embedding_worker_events_consumed_total", "embedding_worker_events_consumed"
    )
    assert dashboard_problems(dashboard, exported) == [
        "panel 'Events per second': the worker exports no metric embedding_worker_events_consumed"
    ]


def test_a_panel_without_a_query_or_with_a_broken_one_is_rejected(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    bad = copy.deepcopy(dashboard)
    panel(bad, "Consumer lag by partition")["targets"] = []
    panel(bad, "429s")["targets"][0]["expr"] = "rate(embedding_worker_api_throttled_total[5m]"
    problems = dashboard_problems(bad, exported)
    assert len(problems) == 2
    assert problems[0].startswith("panel 'Consumer lag by partition': a panel without a query")
    assert problems[1].startswith("panel '429s': unclosed left parenthesis")


def test_a_template_variable_naming_an_unknown_metric_is_rejected(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    variable = dashboard["templating"]["list"][1]
    variable["query"]["query"] = "label_values(embedding_worker_up, namespace)"
    assert dashboard_problems(dashboard, exported) == [
        "variable 'namespace': the worker exports no metric embedding_worker_up"
    ]


def test_rendered_dashboards_and_rules_are_checked(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    panel(dashboard, "AIMD concurrency")["targets"][0]["expr"] = "embedding_worker_aimd_limit"
    manifests = [
        {"kind": "Deployment", "metadata": {"name": "w"}},
        {
            "kind": "ConfigMap",
            "metadata": {"name": "w-dashboard"},
            "data": {"embedding-worker.json": json.dumps(dashboard), "notes.txt": "{"},
        },
        {"kind": "ConfigMap", "metadata": {"name": "w-broken"}, "data": {"d.json": "{"}},
        *rules_of({"EmbeddingWorkerNotReady": ("min(embedding_worker_readiness) == 0", "10m")}),
    ]
    problems = rendered_problems(manifests, exported)
    assert problems[0] == (
        "ConfigMap w-dashboard embedding-worker.json: panel 'AIMD concurrency': "
        "the worker exports no metric embedding_worker_aimd_limit"
    )
    assert problems[1].startswith("ConfigMap w-broken d.json: not JSON")
    assert problems[2:] == [
        "PrometheusRule r: EmbeddingWorkerNotReady: "
        "the worker exports no metric embedding_worker_readiness"
    ]
    assert len(problems) == 3


def rules_of(alerts: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """A rendered PrometheusRule holding these alerts (name -> (expression, for))."""
    entries = [{"alert": name, "expr": e, "for": f} for name, (e, f) in alerts.items()]
    return [
        {
            "kind": "PrometheusRule",
            "metadata": {"name": "r"},
            "spec": {"groups": [{"name": "g", "rules": entries}]},
        }
    ]


def test_alerts_that_drift_from_the_docs_are_reported() -> None:
    markdown = DOCS.read_text()
    documented = documented_alerts(markdown)
    assert documented["EmbeddingWorkerNotReady"] == ("min(embedding_worker_ready) == 0", "10m")
    # The chart's namespace matcher is not a difference, and neither is the layout.
    chart = documented | {
        "EmbeddingWorkerNotReady": ('min (embedding_worker_ready{namespace="vectors"})==0', "10m")
    }
    assert docs_problems(markdown, rules_of(chart)) == []
    drifted = chart | {"EmbeddingWorkerNotReady": ("min(embedding_worker_ready) == 1", "5m")}
    assert docs_problems(markdown, rules_of(drifted)) == [
        "EmbeddingWorkerNotReady: docs say 'min(embedding_worker_ready) == 0', "
        "the chart 'min(embedding_worker_ready) == 1'",
        "EmbeddingWorkerNotReady: docs say for 10m, the chart 5m",
    ]
    missing = {k: v for k, v in chart.items() if k != "EmbeddingWorkerLagGrowing"}
    extra = chart | {"EmbeddingWorkerExtra": ("vector(1)", "1m")}
    assert docs_problems(markdown, rules_of(missing)) == [
        "EmbeddingWorkerLagGrowing: in the docs, not in the chart"
    ]
    assert docs_problems(markdown, rules_of(extra)) == [
        "EmbeddingWorkerExtra: in the chart, not in the docs"
    ]


def test_the_command_fails_on_a_dashboard_file_naming_an_unknown_metric(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    panel(dashboard, "Dead letters by reason")["targets"][0]["expr"] = (
        "sum by (reason) (rate(embedding_worker_dead_letters_total[5m]))"
    )
    bad = tmp_path / "dashboard.json"
    bad.write_text(json.dumps(dashboard))
    script = str(ROOT / "scripts" / "check_monitoring.py")
    failed = subprocess.run(
        [sys.executable, script, "--dashboard", str(bad)], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert "exports no metric embedding_worker_dead_letters_total" in failed.stderr
    passed = subprocess.run(
        [sys.executable, script, "--dashboard", str(DASHBOARD)], capture_output=True, text=True
    )
    assert passed.returncode == 0, passed.stderr
