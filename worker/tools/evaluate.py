"""``embedding-worker evaluate``: measure classification or anomaly quality on labeled JSONL.

The rows go through the real pipeline (embedded Tansu + PostgreSQL, the configured
provider, the analysis stage) and the results are read back from the results topics, so the
figures describe what the worker emits, not a side computation. The run is deterministic
for a file and a seed: the split is drawn with numpy's seeded generator, the input topic has
one partition and one embedding request is in flight at a time, so the analysis sees the
rows in stream order (the file's, or shuffled with ``--shuffle``'s seed).

Split (classification): for each label in sorted order, ``default_rng(seed).choice`` draws
``shots`` of its rows (without replacement) as labeled examples; every other row, in file
order, is a test row. With ``--train FILE`` the examples come from that file instead (all
of it, or ``shots`` per label drawn the same way) and every row of the data is a test row.
Rows labeled ``--unknown-label`` are out of scope: never examples, not a class, always
tested. Anomalies: no split; every row is streamed and scored, the label only says which
rows an operator would want alerted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from worker.analysis import incident_quality, quality
from worker.analysis.config import (
    UNKNOWN,
    AnalysisFile,
    AnalysisFileError,
    Anomaly,
    Classification,
    Label,
    NamespaceAnalysis,
    load_analysis,
)
from worker.config import ConfigError, Settings, load_settings
from worker.kafka.clients import make_producer, read_topic
from worker.sinks import postgres as store
from worker.sinks.migrate import migrate
from worker.tools.demo import run_until_caught_up
from worker.tools.devstack import DevStack
from worker.tools.produce import produce_values

NAMESPACE = "evaluate"
Task = Literal["classify", "anomaly"]


@dataclass(frozen=True)
class Row:
    index: int
    text: str
    label: str
    line: int = 0  # 1-based line of the file it was read from


@dataclass
class Report:
    task: Task
    file: str
    model: str
    rows: int
    split: str
    examples: int = 0
    test_rows: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "file": self.file,
            "model": self.model,
            "rows": self.rows,
            "split": self.split,
            "examples": self.examples,
            "test_rows": self.test_rows,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 1),
        }


def read_rows(
    path: Path, text_field: str = "text", label_field: str = "label", dedupe: bool = False
) -> list[Row]:
    """Rows with a non-empty text and a label; with ``dedupe`` the first of equal texts."""
    rows: list[Row] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(lines, 1):
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
        rows.append(Row(len(rows), text, str(label), number))
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


def shuffled(rows: Sequence[Row], seed: int) -> list[Row]:
    """The rows in the order of ``default_rng(seed).permutation`` (``--shuffle``)."""
    return [rows[int(i)] for i in np.random.default_rng(seed).permutation(len(rows))]


def _analysis(path: Path) -> AnalysisFile:
    """The analysis file, its own message as a configuration error (exit 2)."""
    try:
        return load_analysis(path)
    except AnalysisFileError as exc:
        raise ConfigError(str(exc)) from None


def _names(labels: Iterable[str]) -> str:
    names = sorted(set(labels))
    shown = ", ".join(repr(n) for n in names[:12])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def label_set(
    rows: Sequence[Row], examples: Sequence[Row], labels_file: Path | None, namespace: str | None
) -> Classification:
    """The label set to evaluate: the file's (descriptions, parameters) plus the examples;
    without a file, the labels of ``rows`` and ``examples``."""
    names = sorted({r.label for r in rows} | {r.label for r in examples})
    if UNKNOWN in names:
        raise ConfigError(
            f"rows are labeled {UNKNOWN!r}, a name reserved for out of scope (the policy's "
            f"none-of-these); pass --unknown-label {UNKNOWN} if they are out of scope"
        )
    if labels_file is None:
        if not examples:
            raise ConfigError("zero-shot needs label descriptions: pass --labels FILE")
        try:
            spec = Classification(labels=[Label(name=n) for n in names])
        except ValidationError as exc:
            raise ConfigError(f"the labels of the data ({_names(names)}): {exc}") from None
    else:
        namespaces = _analysis(labels_file).namespaces
        chosen = namespace or next(
            (n for n, ns in namespaces.items() if ns.classify is not None), None
        )
        if chosen is None or chosen not in namespaces or namespaces[chosen].classify is None:
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
    namespaces = _analysis(labels_file).namespaces
    chosen = namespace or next((n for n, ns in namespaces.items() if ns.anomaly), None)
    if chosen is None or chosen not in namespaces or namespaces[chosen].anomaly is None:
        raise ConfigError(f"{labels_file} has no anomaly rules to evaluate")
    configured = namespaces[chosen].anomaly
    assert configured is not None
    return configured.model_copy(update={"emit": "all"})


@dataclass
class Plan:
    """What a classification run streams: the label set (examples folded in), the test rows
    in file order, and a true sentence about where the examples came from."""

    spec: Classification
    test: list[Row]
    examples: int
    how: str


def plan_classification(
    rows: Sequence[Row],
    *,
    shots: int,
    seed: int,
    labels_file: Path | None,
    namespace: str | None,
    train: Path | None,
    unknown_label: str | None,
) -> Plan:
    in_scope = [r for r in rows if r.label != unknown_label]
    if train is not None:
        pool = [r for r in read_rows(train) if r.label != unknown_label]
        if not pool:
            raise ConfigError(f"{train} has no labeled example in scope")
        drawn = split(pool, shots, seed)[0] if shots else pool
        test = list(rows)
        source = f"{len(drawn)} examples from {train}"
        if shots:
            source = (
                f"seed {seed}: {shots} examples per label drawn with numpy "
                f"default_rng({seed}) from {train}"
            )
    else:
        drawn, _ = split(in_scope, shots, seed)
        chosen = {r.index for r in drawn}
        test = [r for r in rows if r.index not in chosen]
        source = (
            f"seed {seed}: {shots} examples per label drawn with numpy default_rng({seed})"
            if shots
            else ""
        )
    spec = label_set(in_scope, drawn, labels_file, namespace)
    if unknown_label is not None and unknown_label in spec.names:
        raise ConfigError(
            f"--unknown-label {unknown_label!r} is a label of {labels_file}'s set: out-of-scope "
            "rows cannot also be a class"
        )
    bare = [label.name for label in spec.labels if not label.descriptions and not label.examples]
    if bare:
        raise ConfigError(
            f"labels with neither a description nor examples: {_names(bare)} "
            "(give them descriptions with --labels, or examples)"
        )
    examples = sum(len(label.examples) for label in spec.labels)
    sources = [source] if source else []
    if examples > len(drawn):
        sources.append(f"{examples - len(drawn)} examples in {labels_file}")
    if not any(r.label != unknown_label for r in test):
        raise ConfigError("no in-scope test rows are left: every row is an example")
    texts = {text for label in spec.labels for text in label.examples}
    leaked = sum(r.text in texts for r in test)
    how = " + ".join(sources) or "zero-shot: no examples"
    how += f", {len(test)} test rows"
    if unknown_label is not None:
        outside = sum(r.label == unknown_label for r in test)
        how += f" ({outside} of them out of scope, {unknown_label!r})"
    if leaked:
        how += f"; {leaked} of them with the text of an example"
    return Plan(spec, test, examples, how)


def check_labels(
    rows: Sequence[Row],
    path: Path,
    task: Task,
    *,
    positive: str | None,
    normal_label: str,
    unknown_label: str | None,
    train: Path | None,
) -> None:
    """Options that name a label must name one of the data: else the figures would be a
    silent 0 or NaN."""
    present = {r.label for r in rows}
    if not rows:
        raise ConfigError(f"{path} has no row with a text and a label")
    if task == "anomaly":
        for option, given in (
            ("--positive", positive),
            ("--unknown-label", unknown_label),
            ("--train", train),
        ):
            if given is not None:
                raise ConfigError(f"{option} is for --task classify")
        if normal_label not in present:
            raise ConfigError(
                f"--normal {normal_label!r} is not a label of {path} (its labels: "
                f"{_names(present)})"
            )
        if present == {normal_label}:
            raise ConfigError(f"every row of {path} is {normal_label!r}: nothing to detect")
        return
    for option, given in (("--positive", positive), ("--unknown-label", unknown_label)):
        if given is not None and given not in present:
            raise ConfigError(
                f"{option} {given!r} is not a label of {path} (its labels: {_names(present)})"
            )
    if positive is not None and positive == unknown_label:
        raise ConfigError(f"--positive {positive!r} is the out-of-scope label, not a class")


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
    train: Path | None = None,
    shuffle: int | None = None,
    unknown_label: str | None = None,
    rows_out: Path | None = None,
    progress: bool = True,
) -> Report:
    started = time.monotonic()
    rows = read_rows(path, dedupe=dedupe)
    if limit is not None:
        rows = rows[:limit]
    check_labels(
        rows,
        path,
        task,
        positive=positive,
        normal_label=normal_label,
        unknown_label=unknown_label,
        train=train,
    )
    if rows_out is not None:  # fail before the run, not after it
        try:
            rows_out.open("w").close()
        except OSError as exc:
            raise ConfigError(f"--rows {rows_out}: {exc.strerror or exc}") from None
    order = "in file order" if shuffle is None else f"shuffled with numpy default_rng({shuffle})"
    if task == "classify":
        plan = plan_classification(
            rows,
            shots=shots,
            seed=seed,
            labels_file=labels_file,
            namespace=namespace,
            train=train,
            unknown_label=unknown_label,
        )
        # Every label's probability in each result, for --rows (it changes no prediction).
        plan.spec.top_k = len(plan.spec.labels)
        ns = NamespaceAnalysis(classify=plan.spec)
        test, examples, how = plan.test, plan.examples, f"{plan.how}, streamed {order}"
    else:
        test, examples = list(rows), 0
        ns = NamespaceAnalysis(anomaly=anomaly_spec(labels_file, namespace))
        how = f"unsupervised: all {len(rows)} rows streamed {order}"
    if shuffle is not None:
        test = shuffled(test, shuffle)
    incidents: list[dict[str, Any]] = []
    results = await _run(base, ns, test, progress, incidents)
    report = Report(task, str(path), base.provider.model_name, len(rows), how, examples, len(test))
    if task == "classify":
        report.metrics = classification_metrics(test, results, positive, unknown_label, ns.classify)
    else:
        assert ns.anomaly is not None
        report.metrics = anomaly_metrics(test, results, normal_label)
        report.metrics["incidents"] = incident_metrics(
            test, results, normal_label, ns.anomaly, incidents
        )
    if rows_out is not None:
        write_rows(rows_out, task, test, results, unknown_label)
    report.seconds = time.monotonic() - started
    return report


def flagged_unknown(rule: str | None) -> bool:
    """Whether the policy rule that chose the action (``label>=min_score``) is on ``unknown``."""
    return rule is not None and rule.rsplit(">=", 1)[0] == UNKNOWN


def _prf(s: quality.PRF) -> dict[str, float]:
    return {"precision": round(s.precision, 4), "recall": round(s.recall, 4), "f1": round(s.f1, 4)}


def classification_metrics(
    test: Sequence[Row],
    results: dict[int, dict[str, Any]],
    positive: str | None,
    unknown_label: str | None = None,
    spec: Classification | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per label over the in-scope test rows; with ``unknown_label``
    also how well ``out_of_scope`` and the policy's ``unknown`` rules find the others."""
    known = [r for r in test if r.label != unknown_label]
    truth = [r.label for r in known]
    predicted = [results[r.index]["label"] for r in known]
    out: dict[str, Any] = {
        "accuracy": round(quality.accuracy(truth, predicted), 4),
        "macro_f1": round(quality.macro_f1(truth, predicted), 4),
        "per_label": {
            label: {**_prf(s), "support": s.support}
            for label, s in quality.per_class(truth, predicted).items()
        },
        "actions": dict(Counter(results[r.index]["action"] for r in test)),
    }
    if positive is not None:
        s = quality.prf([t == positive for t in truth], [p == positive for p in predicted])
        out["positive"] = {"label": positive, **_prf(s)}
    if unknown_label is not None:
        outside = [r.label == unknown_label for r in test]
        scores = [float(results[r.index]["out_of_scope"]) for r in test]
        rules = [] if spec is None else [r for r in spec.policy if r.label == UNKNOWN]
        out["out_of_scope"] = {
            "label": unknown_label,
            "rows": sum(outside),
            "in_scope_rows": len(known),
            "auroc": round(quality.auroc(outside, scores), 4),
            # A row is flagged when the rule that chose its action is on `unknown`.
            "policy": None
            if not rules
            else {
                "rules": [f"{r.label}>={r.min_score}:{r.action.value}" for r in rules],
                "flagged": sum(flagged_unknown(results[r.index]["rule"]) for r in test),
                **_prf(
                    quality.prf(outside, [flagged_unknown(results[r.index]["rule"]) for r in test])
                ),
            },
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
        **_prf(at_threshold),
    }


def write_rows(
    path: Path,
    task: Task,
    test: Sequence[Row],
    results: dict[int, dict[str, Any]],
    unknown_label: str | None,
) -> None:
    """One JSON line per test row, in stream order: the row and what the worker said."""
    with path.open("w", encoding="utf-8") as out:
        for r in test:
            got = results[r.index]
            line: dict[str, Any] = {"line": r.line, "text": r.text, "label": r.label}
            if task == "classify":
                if unknown_label is not None:
                    line["in_scope"] = r.label != unknown_label
                line |= {
                    "predicted": got["label"],
                    "probabilities": {s["label"]: s["score"] for s in got["labels"]},
                    "out_of_scope": got["out_of_scope"],
                    "action": got["action"],
                    "rule": got["rule"],
                }
            else:
                line |= {
                    k: got[k]
                    for k in ("score", "anomaly", "threshold", "warm_up", "novelty", "focus")
                }
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


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
            await migrate(
                conn, settings.provider.dim, text_search_config=settings.search.text_search_config
            )
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
        # Progress on stderr: stdout holds only the report (pure JSON with --json).
        await run_until_caught_up(settings, high, len(events), progress=progress, stream=sys.stderr)
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
        scope = " (in-scope rows)" if "out_of_scope" in m else ""
        lines.append(f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}{scope}")
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
        if "out_of_scope" in m:
            o = m["out_of_scope"]
            lines.append(
                f"out of scope {o['label']!r}: {o['rows']} rows against {o['in_scope_rows']} "
                f"in scope; AUROC of out_of_scope {o['auroc']:.4f}"
            )
            p = o["policy"]
            lines.append(
                "  policy: no rule on `unknown`"
                if p is None
                else f"  policy {', '.join(p['rules'])}: {p['flagged']} flagged, "
                f"P {p['precision']:.4f}  R {p['recall']:.4f}  F1 {p['f1']:.4f}"
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
            train=args.train,
            shuffle=args.shuffle,
            unknown_label=args.unknown_label,
            rows_out=args.rows,
        )
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0
