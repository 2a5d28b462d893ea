"""Check that the Grafana dashboard and the alert rules query only metrics the worker exports.

Usage: python scripts/check_monitoring.py [--dashboard FILE.json ...] [--rendered RENDERED.yaml ...]
       [--docs docs/operations.md --docs-rules RENDERED.yaml]

Run by helm/check.sh (``make lint``). The exported names come from the worker's own collectors
(``worker.ops.metrics``, bound to a stand-in pipeline that takes every branch), with the series
suffixes Prometheus gives each type (``_total``; ``_bucket``, ``_sum``, ``_count``): a renamed
or removed metric fails the check instead of leaving a panel empty or an alert that never fires.
Queries are parsed with ``promql-parser`` (Prometheus' grammar), so a malformed query fails too.

* ``--dashboard``: a dashboard JSON file; every panel has a query and every query (and template
  variable query) names only exported metrics;
* ``--rendered``: the output of ``helm template``; the dashboards in its ConfigMaps and the
  expressions of its PrometheusRules, checked the same way;
* ``--docs`` with ``--docs-rules``: the alerts table of docs/operations.md and the chart's
  PrometheusRule rendered with the default thresholds name the same alerts with the same
  expressions (apart from the chart's ``namespace`` matcher) and ``for`` durations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import promql_parser
import yaml

# Grafana's interval macros, which PromQL's grammar does not know: any duration parses alike.
GRAFANA_DURATION = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")
# Grafana's Prometheus variable functions wrap a PromQL query (or a bare label name).
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<query>.*),)?\s*(?P<label>\w+)\s*\)\s*$", re.S)
QUERY_RESULT = re.compile(r"^\s*query_result\((?P<query>.*)\)\s*$", re.S)
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
NAMESPACE_MATCHER = re.compile(r'namespace\s*=\s*"[^"]*"\s*,?\s*')


class _AnyPipeline:
    """Answers every attribute, call and conversion, so that a collector runs all its branches
    (``if p.analysis is not None`` included) and yields every metric family it can export."""

    def __getattr__(self, name: str) -> _AnyPipeline:
        return self

    def __call__(self, *args: object, **kwargs: object) -> _AnyPipeline:
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __float__(self) -> float:
        return 0.0

    def __bool__(self) -> bool:
        return True


def exported_metrics() -> set[str]:
    """The series names the worker's /metrics can carry."""
    from worker.ops.metrics import Metrics

    metrics = Metrics()
    stand_in: Any = _AnyPipeline()
    metrics.bind(stand_in)
    metrics.bind_learner(stand_in)
    metrics.bind_profiler(stand_in)
    names: set[str] = set()
    for family in metrics.registry.collect():
        names |= {sample.name for sample in family.samples}
        suffixes = SERIES_SUFFIXES.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names(query: str) -> set[str]:
    """Metric names a PromQL query selects; ValueError if it does not parse or selects series
    by something other than a literal name."""
    expr = promql_parser.parse(GRAFANA_DURATION.sub("5m", query))
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next(
                (
                    m.value
                    for m in node.matchers.matchers
                    if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
                ),
                None,
            )
            if name is None:
                unnamed.append(str(node))
            else:
                names.add(name)

    promql_parser.walk(expr, visit)
    if unnamed:
        raise ValueError(f"selector without a metric name: {', '.join(unnamed)}")
    return names


def query_problems(where: str, query: str, exported: set[str]) -> list[str]:
    try:
        unknown = metric_names(query) - exported
    except ValueError as exc:
        return [f"{where}: {exc}: {query!r}"]
    return [f"{where}: the worker exports no metric {name}" for name in sorted(unknown)]


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_problems(dashboard: dict[str, Any], exported: set[str]) -> list[str]:
    problems: list[str] = []
    for panel in panels(dashboard.get("panels", [])):
        if panel.get("type") in ("row", "text"):
            continue
        where = f"panel {panel.get('title', panel.get('id'))!r}"
        queries = [t.get("expr", "") for t in panel.get("targets", [])]
        if not queries or not all(q.strip() for q in queries):
            problems.append(f"{where}: a panel without a query, or a target without an expr")
        for query in filter(str.strip, queries):
            problems += query_problems(where, query, exported)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        where = f"variable {variable.get('name')!r}"
        definition = variable.get("query", "")
        if isinstance(definition, dict):
            definition = definition.get("query", "")
        match = LABEL_VALUES.match(definition) or QUERY_RESULT.match(definition)
        query = match.group("query") if match else definition
        if query:
            problems += query_problems(where, query, exported)
    if not any(p.get("type") not in ("row", "text") for p in panels(dashboard.get("panels", []))):
        problems.append("the dashboard has no panel")
    return problems


def rule_problems(rule: dict[str, Any], exported: set[str]) -> list[str]:
    problems: list[str] = []
    name = rule["metadata"]["name"]
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            where = f"PrometheusRule {name}: {entry.get('alert') or entry.get('record')}"
            problems += query_problems(where, str(entry["expr"]), exported)
    return problems


def rendered_problems(docs: list[dict[str, Any]], exported: set[str]) -> list[str]:
    problems: list[str] = []
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            problems += rule_problems(doc, exported)
        elif doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith(".json"):
                    where = f"ConfigMap {doc['metadata']['name']} {key}"
                    problems += [f"{where}: {p}" for p in json_dashboard_problems(text, exported)]
    return problems


def json_dashboard_problems(text: str, exported: set[str]) -> list[str]:
    try:
        dashboard = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(dashboard, dict):
        return ["not a dashboard (a JSON object)"]
    return dashboard_problems(dashboard, exported)


def documented_alerts(markdown: str) -> dict[str, tuple[str, str]]:
    """Alert name -> (expression, for) from the "Alerts worth setting" table: the rows whose
    first cell names an alert in backticks."""
    section = markdown.split("### Alerts worth setting", 1)[1].split("\n#", 1)[0]
    alerts: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]) if len(cells) >= 3 else None
        if name:
            alerts[name.group(1)] = (cells[1].strip("`"), cells[2])
    return alerts


def normalized(query: str) -> str:
    """The query without namespace matchers (the chart adds one), in one canonical layout."""
    return promql_parser.parse(NAMESPACE_MATCHER.sub("", query)).prettify()


def docs_problems(markdown: str, docs: list[dict[str, Any]]) -> list[str]:
    documented = documented_alerts(markdown)
    rendered = {
        entry["alert"]: (str(entry["expr"]), str(entry.get("for", "")))
        for doc in docs
        if doc["kind"] == "PrometheusRule"
        for group in doc["spec"]["groups"]
        for entry in group["rules"]
        if "alert" in entry
    }
    problems = [f"{name}: in the docs, not in the chart" for name in documented.keys() - rendered]
    problems += [f"{name}: in the chart, not in the docs" for name in rendered.keys() - documented]
    for name in sorted(documented.keys() & rendered.keys()):
        (doc_expr, doc_for), (chart_expr, chart_for) = documented[name], rendered[name]
        try:
            if normalized(doc_expr) != normalized(chart_expr):
                problems.append(f"{name}: docs say {doc_expr!r}, the chart {chart_expr!r}")
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        if doc_for != (chart_for or "-"):
            problems.append(f"{name}: docs say for {doc_for}, the chart {chart_for or '-'}")
    return problems


def load_rendered(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dashboard", action="append", default=[])
    parser.add_argument("--rendered", action="append", default=[])
    parser.add_argument("--docs")
    parser.add_argument("--docs-rules", help="helm template output with the default thresholds")
    args = parser.parse_args()
    exported = exported_metrics()
    problems: list[str] = []
    checked: list[str] = []
    for path in args.dashboard:
        with open(path) as f:
            problems += [f"{path}: {p}" for p in json_dashboard_problems(f.read(), exported)]
        checked.append(os.path.basename(path))
    for path in args.rendered:
        problems += [f"{path}: {p}" for p in rendered_problems(load_rendered(path), exported)]
        checked.append(os.path.basename(path))
    if args.docs:
        with open(args.docs) as f:
            markdown = f.read()
        rendered = load_rendered(args.docs_rules)
        problems += [f"{args.docs}: {p}" for p in docs_problems(markdown, rendered)]
        for name, (expr, _) in sorted(documented_alerts(markdown).items()):
            problems += query_problems(f"{args.docs}: {name}", expr, exported)
        checked.append(f"{args.docs}'s alerts = the chart's")
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if not problems:
        print(f"ok   {len(exported)} series names exported; checked: {', '.join(checked)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
