"""``embedding-worker evaluate``: measure classification or anomaly quality on labeled JSONL.

The rows go through the real pipeline (embedded Tansu + PostgreSQL, the configured
provider, the analysis stage) and the results are read back from the results topics, so the
figures describe what the worker emits, not a side computation. The run is deterministic
for a file and a seed: the split is drawn with numpy's seeded generator, the input topic has
one partition and one embedding request is in flight at a time, so the analysis sees the
rows in file order.

Split (classification): for each label in sorted order, ``default_rng(seed).choice`` draws
``shots`` of its rows (without replacement) as labeled examples; every other row, in file
order, is a test row. Anomalies: no split; every row is streamed in order and scored, the
label only says which rows an operator would want alerted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from worker import store
from worker.analysis import incident_quality, quality
from worker.analysis.config import (
    Anomaly,
    Classification,
    Label,
    NamespaceAnalysis,
    load_analysis,
)
from worker.config import ConfigError, Settings, load_settings
from worker.demo import run_until_caught_up
from worker.devstack import DevStack
from worker.kafka import make_producer, read_topic
from worker.migrate import migrate
from worker.produce import produce_values

NAMESPACE = "evaluate"
Task = Literal["classify", "anomaly"]


@dataclass(frozen=True)
class Row:
    index: int
    text: str
    label: str


@dataclass
class Report:
    task: Task
    file: str
    model: str
    rows: int
    split: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "file": self.file,
            "model": self.model,
            "rows": self.rows,
            "split": self.split,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 1),
        }


def read_rows(
    path: Path, text_field: str = "text", label_field: str = "label", dedupe: bool = False
) -> list[Row]:
    """Rows with a non-empty text and a label; with ``dedupe`` the first of equal texts."""
    rows: list[Row] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            text, label = data[text_field], data[label_field]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{path}:{number}: expected an object with `{text_field}` and `{label_field}`"
            ) from None
        if not isinstance(text, str) or not text.strip():
            continue
        if dedupe:
            if text in seen:
                continue
            seen.add(text)
        rows.append(Row(len(rows), text, str(label)))
    return rows


def split(rows: Sequence[Row], shots: int, seed: int) -> tuple[list[Row], list[Row]]:
    """(examples, test rows): ``shots`` per label drawn with the seed; the rest in order."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in sorted({r.label for r in rows}):
        members = [r.index for r in rows if r.label == label]
        if shots > len(members):
            raise ConfigError(f"label {label!r} has {len(members)} rows, fewer than {shots}")
        if shots:
            chosen.update(int(i) for i in rng.choice(members, size=shots, replace=False))
    return [r for r in rows if r.index in chosen], [r for r in rows if r.index not in chosen]


def label_set(
    rows: Sequence[Row], examples: Sequence[Row], labels_file: Path | None, namespace: str | None
) -> Classification:
    """The label set to evaluate: the file's (descriptions, parameters) plus the examples."""
    names = sorted({r.label for r in rows})
    if labels_file is None:
        if not examples:
            raise ConfigError("zero-shot needs label descriptions: pass --labels FILE")
        spec = Classification(labels=[Label(name=n) for n in names])
    else:
        namespaces = load_analysis(labels_file).namespaces
        chosen = namespace or next(
            (n for n, ns in namespaces.items() if ns.classify is not None), None
        )
        if chosen is None or namespaces[chosen].classify is None:
            raise ConfigError(f"{labels_file} has no label set to evaluate")
        configured = namespaces[chosen].classify
        assert configured is not None
        spec = configured.model_copy(deep=True)
        missing = set(names) - set(spec.names)
        if missing:
            raise ConfigError(f"labels in the data but not in {labels_file}: {sorted(missing)}")
    by_name = {label.name: label for label in spec.labels}
    for row in examples:
        by_name[row.label].examples.append(row.text)
    return spec


def anomaly_spec(labels_file: Path | None, namespace: str | None) -> Anomaly:
    if labels_file is None:
        return Anomaly(emit="all")
    namespaces = load_analysis(labels_file).namespaces
    chosen = namespace or next((n for n, ns in namespaces.items() if ns.anomaly), None)
    if chosen is None or namespaces[chosen].anomaly is None:
        raise ConfigError(f"{labels_file} has no anomaly rules to evaluate")
    configured = namespaces[chosen].anomaly
    assert configured is not None
    return configured.model_copy(update={"emit": "all"})


async def evaluate(
    base: Settings,
    path: Path,
    task: Task,
    *,
    shots: int = 0,
    seed: int = 0,
    labels_file: Path | None = None,
    namespace: str | None = None,
    normal_label: str = "normal",
    positive: str | None = None,
    dedupe: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> Report:
    started = time.monotonic()
    rows = read_rows(path, dedupe=dedupe)
    if limit is not None:
        rows = rows[:limit]
    if task == "classify":
        examples, test = split(rows, shots, seed)
        ns = NamespaceAnalysis(classify=label_set(rows, examples, labels_file, namespace))
        how = (
            f"seed {seed}: {shots} examples per label drawn with numpy default_rng({seed}), "
            f"{len(test)} test rows in file order"
            if shots
            else f"zero-shot: no examples, all {len(test)} rows are test rows"
        )
    else:
        test = rows
        ns = NamespaceAnalysis(anomaly=anomaly_spec(labels_file, namespace))
        how = f"unsupervised: all {len(rows)} rows streamed in file order"
    incidents: list[dict[str, Any]] = []
    results = await _run(base, ns, test, progress, incidents)
    report = Report(task, str(path), base.provider.model_name, len(rows), how)
    if task == "classify":
        report.metrics = classification_metrics(test, results, positive)
    else:
        assert ns.anomaly is not None
        report.metrics = anomaly_metrics(test, results, normal_label)
        report.metrics["incidents"] = incident_metrics(
            test, results, normal_label, ns.anomaly, incidents
        )
    report.seconds = time.monotonic() - started
    return report


def classification_metrics(
    test: Sequence[Row], results: dict[int, dict[str, Any]], positive: str | None
) -> dict[str, Any]:
    truth = [r.label for r in test]
    predicted = [results[r.index]["label"] for r in test]
    out: dict[str, Any] = {
        "accuracy": round(quality.accuracy(truth, predicted), 4),
        "macro_f1": round(quality.macro_f1(truth, predicted), 4),
        "per_label": {
            label: {
                "precision": round(s.precision, 4),
                "recall": round(s.recall, 4),
                "f1": round(s.f1, 4),
                "support": s.support,
            }
            for label, s in quality.per_class(truth, predicted).items()
        },
        "actions": dict(Counter(results[r.index]["action"] for r in test)),
    }
    if positive is not None:
        s = quality.prf([t == positive for t in truth], [p == positive for p in predicted])
        out["positive"] = {
            "label": positive,
            "precision": round(s.precision, 4),
            "recall": round(s.recall, 4),
            "f1": round(s.f1, 4),
        }
    return out


def anomaly_metrics(
    rows: Sequence[Row], results: dict[int, dict[str, Any]], normal_label: str
) -> dict[str, Any]:
    truth = [r.label != normal_label for r in rows]
    scores = [float(results[r.index]["score"]) for r in rows]
    alerts = [bool(results[r.index]["anomaly"]) for r in rows]
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r.text, i)
    firsts = sorted(first.values())
    at_threshold = quality.prf(truth, alerts)
    return {
        "base_rate": round(sum(truth) / len(truth), 4),
        "pr_auc": round(quality.average_precision(truth, scores), 4),
        "auroc": round(quality.auroc(truth, scores), 4),
        "auroc_first_occurrences": round(
            quality.auroc([truth[i] for i in firsts], [scores[i] for i in firsts]), 4
        ),
        "first_occurrences": len(firsts),
        "alerts": sum(alerts),
        "precision": round(at_threshold.precision, 4),
        "recall": round(at_threshold.recall, 4),
        "f1": round(at_threshold.f1, 4),
    }


def incident_metrics(
    rows: Sequence[Row],
    results: dict[int, dict[str, Any]],
    normal_label: str,
    spec: Anomaly,
    messages: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Incident-level P/R/F1 of the worker's incident messages, beside baselines on the same
    scores: a fixed (hindsight) quantile of the whole stream's scores, and the same on the
    novelty alone; alerts grouped as the worker groups them (``incident_gap`` events).

    True incidents are runs of labeled-anomalous rows with gaps <= ``incident_gap``; those
    that end inside the warm-up (where nothing alerts) are left out."""
    gap = spec.incident_gap
    truth = [
        t
        for t in incident_quality.spans([r.label != normal_label for r in rows], gap)
        if t[1] >= spec.warm_up
    ]
    final: dict[str, dict[str, Any]] = {}
    for m in messages:  # a consumer's view: the last message per key
        final[m["key"]] = m
    worker = [(m["first"]["position"], m["last"]["position"]) for m in final.values()]
    out: dict[str, Any] = {
        "gap": gap,
        "worker": incident_quality.incident_prf(truth, sorted(worker)).as_dict(),
        "closed": sum(m["status"] == "closed" for m in final.values()),
    }
    after = [r for r in rows if not results[r.index]["warm_up"]]
    for name, attribute in (("fixed_quantile", "score"), ("novelty_fixed_quantile", "novelty")):
        scores = np.array([float(results[r.index][attribute]) for r in after])
        cut = float(np.quantile(scores, spec.quantile)) if len(scores) else 0.0
        flags = [
            not results[r.index]["warm_up"] and float(results[r.index][attribute]) > cut
            for r in rows
        ]
        predicted = incident_quality.spans(flags, gap)
        out[name] = incident_quality.incident_prf(truth, predicted).as_dict()
    return out


async def _run(
    base: Settings,
    analysis: NamespaceAnalysis,
    rows: Sequence[Row],
    progress: bool,
    incidents: list[dict[str, Any]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Stream ``rows`` through a worker on a fresh embedded stack; the results by row.

    Incident messages (anomalies topic) are appended to ``incidents`` when it is given."""
    name = f"evaluate-{uuid.uuid4().hex[:8]}"
    stack = DevStack()
    try:
        await stack.start()
        settings = load_settings(
            kafka={
                **stack.kafka_settings(),
                "group_id": name,
                "input_topic": f"{name}.events",
                "dlq_topic": f"{name}.dlq",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 500,
            },
            postgres={"dsn": stack.dsn()},
            # One request at a time: the analysis then sees the rows in file order.
            provider={
                **base.provider.model_dump(exclude={"api_key"}),
                "api_key": base.provider.api_key,
                "max_concurrency": 1,
                "min_concurrency": 1,
            },
            http={"enabled": False},
            analysis={
                "namespaces": {NAMESPACE: analysis.model_dump()},
                "classifications_topic": f"{name}.classifications",
                "anomalies_topic": f"{name}.anomalies",
            },
        )
        k, a = settings.kafka, settings.analysis
        await stack.create_topics([k.input_topic], partitions=1)
        await stack.create_topics(
            [k.dlq_topic, a.classifications_topic, a.anomalies_topic], partitions=1
        )
        conn = await store.connect_unchecked(settings.postgres.dsn.get_secret_value())
        try:
            await migrate(conn, settings.provider.dim)
        finally:
            await conn.close()
        events = [
            json.dumps({"id": f"row-{r.index}", "text": r.text, "namespace": NAMESPACE}).encode()
            for r in rows
        ]
        producer = make_producer(k)
        await producer.start()
        try:
            high = await produce_values(producer, k.input_topic, events)
        finally:
            await producer.stop()
        await run_until_caught_up(settings, high, len(events), progress=progress)
        topic = a.classifications_topic if analysis.classify else a.anomalies_topic
        messages = [json.loads(v) for v in await read_topic(stack.bootstrap, topic)]
    finally:
        await stack.stop()
    if incidents is not None:
        incidents += [m for m in messages if m.get("kind") == "incident"]
    by_row = {int(m["id"].removeprefix("row-")): m for m in messages if m.get("kind") != "incident"}
    missing = [r.index for r in rows if r.index not in by_row]
    if missing:
        raise RuntimeError(f"no result for {len(missing)} rows (first: row-{missing[0]})")
    return by_row


def render(report: Report) -> str:
    m = report.metrics
    lines = [
        f"{report.task} · {report.file} · {report.model}",
        f"rows {report.rows}; {report.split}; {report.seconds:.0f} s",
    ]
    if report.task == "classify":
        lines.append(f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}")
        for label, s in m["per_label"].items():
            lines.append(
                f"  {label:<16} P {s['precision']:.3f}  R {s['recall']:.3f}  "
                f"F1 {s['f1']:.3f}  n {s['support']}"
            )
        if "positive" in m:
            p = m["positive"]
            lines.append(
                f"positive {p['label']!r}: P {p['precision']:.4f}  R {p['recall']:.4f}  "
                f"F1 {p['f1']:.4f}"
            )
        lines.append(f"actions {m['actions']}")
    else:
        lines += [
            f"base rate {m['base_rate']:.4f}   PR-AUC {m['pr_auc']:.4f}   AUROC {m['auroc']:.4f}",
            f"AUROC over {m['first_occurrences']} first occurrences "
            f"{m['auroc_first_occurrences']:.4f}",
            f"at the learned threshold: {m['alerts']} alerts, P {m['precision']:.4f}  "
            f"R {m['recall']:.4f}  F1 {m['f1']:.4f}",
        ]
        i = m["incidents"]
        for name, what in (
            ("worker", "incidents (worker)"),
            ("fixed_quantile", "baseline: fixed quantile"),
            ("novelty_fixed_quantile", "baseline: novelty, fixed quantile"),
        ):
            s = i[name]
            lines.append(
                f"{what:<34} {s['incidents']:>4} incidents, {s['found']} of "
                f"{s['true_incidents']} true found (gap {i['gap']}): P {s['precision']:.4f}  "
                f"R {s['recall']:.4f}  F1 {s['f1']:.4f}  median delay "
                f"{s['median_delay_lines']} lines"
            )
    return "\n".join(lines)


def run_cli(base: Settings, args: Any) -> int:
    report = asyncio.run(
        evaluate(
            base,
            args.file,
            args.task,
            shots=args.shots,
            seed=args.seed,
            labels_file=args.labels,
            namespace=args.namespace,
            normal_label=args.normal,
            positive=args.positive,
            dedupe=args.dedupe,
            limit=args.limit,
            progress=not args.json,
        )
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0
