"""The analysis stage: between embedding and the Postgres write, for configured namespaces.

It runs in the writer, on each write batch in the order the writer received it, so that
anomaly scores see the namespace's history in stream order. Results are produced and
acknowledged before the transaction that stores the offsets; the anomaly state they were
computed from is updated in that same transaction. A crash in between replays the events
against the same committed state: the same results again, under the same keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from aiokafka import AIOKafkaProducer

from worker.analysis import anomaly, classify, decisions, incidents, scoring, state
from worker.analysis.config import NamespaceAnalysis
from worker.analysis.labels import Embed, LabelSet, sync
from worker.analysis.results import (
    CLOUDEVENTS_CONTENT_TYPE,
    AnomalyResult,
    ClassificationResult,
    IncidentResult,
    cloudevent,
)
from worker.config import AnalysisSettings
from worker.model import Change
from worker.sinks.postgres import Conn
from worker.sinks.publish import publish
from worker.sinks.store import RunPg

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

T = TypeVar("T")


@dataclass
class AnalysisStats:
    classified: Counter[str] = field(default_factory=Counter)  # by action
    scored: int = 0
    anomalies: int = 0
    incidents: int = 0  # opened


@dataclass
class Analysed:
    """One namespace's results for a batch, and what its transaction must add to the state."""

    classifications: list[ClassificationResult] = field(default_factory=list)
    anomalies: list[AnomalyResult] = field(default_factory=list)
    deltas: list[state.Delta] = field(default_factory=list)
    incident_results: list[IncidentResult] = field(default_factory=list)
    transitions: dict[str, incidents.Transitions] = field(default_factory=dict)

    async def apply(
        self, conn: Conn, model: str, history: dict[str, int], forgetting: dict[str, float]
    ) -> None:
        for delta in self.deltas:
            ns = delta.namespace
            await state.apply(conn, model, delta, history[ns], forgetting.get(ns, 1.0))
        for namespace, transitions in self.transitions.items():
            await incidents.apply(conn, namespace, model, transitions)


async def analyse(
    conn: Conn,
    namespace: str,
    spec: NamespaceAnalysis,
    labels: LabelSet | None,
    focus: np.ndarray | None,
    model: str,
    changes: Sequence[Change],
) -> Analysed:
    """Classify and score one namespace's events (stream order) against the committed state.
    Only anomaly scores read and grow that state (the history of points, the mean): a
    namespace that only classifies costs no query and no write here."""
    vectors = scoring.normalise(np.vstack([c.vector for c in changes if c.vector is not None]))
    out = Analysed()
    if labels is not None:
        for change, result in zip(changes, classify.classify_batch(labels, vectors), strict=True):
            out.classifications.append(classify.build(labels, model, change, result))
    if spec.anomaly is not None:
        current = await state.load(conn, namespace, model, vectors.shape[1])
        delta = state.Delta.empty(namespace, current.seen, vectors.shape[1])
        out.deltas.append(delta)
        a = spec.anomaly
        past = await anomaly.fetch_past(conn, a, namespace, model, vectors, current.seen)
        ids = [c.id for c in changes]
        scored = anomaly.score_batch(a, current, vectors, ids, past, delta, focus)
        out.anomalies = [
            anomaly.build(change, model, s, current.seen + i, a)
            for i, (change, s) in enumerate(zip(changes, scored, strict=True))
        ]
        events = [(incidents.event(r), r.anomaly, r.threshold) for r in out.anomalies]
        opened = await incidents.load(conn, namespace, model)
        transitions = incidents.group(a, namespace, model, opened, events)
        out.incident_results = transitions.messages
        out.transitions[namespace] = transitions
        delta.vector_sum += vectors.sum(axis=0)
        delta.ids = [c.id for c in changes]
        delta.vectors = list(vectors)
    return out


class AnalysisStage:
    def __init__(self, settings: AnalysisSettings, producer: AIOKafkaProducer, model: str) -> None:
        self.settings = settings
        self.namespaces: dict[str, NamespaceAnalysis] = dict(settings.spec.namespaces)
        self.producer = producer
        self.model = model
        self.labels: dict[str, LabelSet] = {}
        self.focus: dict[str, np.ndarray] = {}
        self.stats = AnalysisStats()
        # Per namespace, the decision version its label set was built with (worker.side.learn).
        self.decision_versions: dict[str, int] = {}
        self.tracing: Tracing | None = None

    async def prepare(self, pg: RunPg, embed: Embed) -> None:
        """Embed and store the label texts (once; later starts find them stored)."""
        if self.settings.decisions_topic is not None:
            # Read before the rows: a decision stored in between is loaded again, not missed.
            op_versions = partial(decisions.versions, model=self.model)
            self.decision_versions = await pg("decision versions", op_versions)
        for namespace, ns in self.namespaces.items():
            if ns.classify is None and (ns.anomaly is None or ns.anomaly.focus is None):
                continue
            op = partial(sync, embed=embed, model=self.model, namespace=namespace, spec=ns)
            synced = await pg("label sync", op)
            if synced.labels is not None:
                self.labels[namespace] = synced.labels
            if synced.focus is not None:
                self.focus[namespace] = synced.focus

    async def _publish(
        self,
        topic: str,
        results: Sequence[ClassificationResult | AnomalyResult | IncidentResult],
        changes: Sequence[Change],
    ) -> None:
        """With tracing on, a result carries its event's span (an incident, the produce's).
        As CloudEvents, the value is the envelope and a ``content-type`` header says so."""
        cloud = self.settings.results_format == "cloudevents"
        records = [
            (r.key.encode(), cloudevent(r) if cloud else r.model_dump_json().encode())
            for r in results
        ]
        base: list[tuple[str, bytes]] = (
            [("content-type", CLOUDEVENTS_CONTENT_TYPE)] if cloud else []
        )
        if self.tracing is None or not records:
            await publish(self.producer, topic, records, [base] * len(records) if cloud else None)
            return
        by_source = {(c.partition, c.offset): c.trace for c in changes}
        events = [
            None if isinstance(r, IncidentResult) else by_source.get(_position(r)) for r in results
        ]
        with self.tracing.producing(topic, events):
            headers = [base + self.tracing.headers(e) for e in events]
            await publish(self.producer, topic, records, headers)

    def history(self) -> dict[str, int]:
        return {n: ns.history for n, ns in self.namespaces.items()}

    def forgetting(self) -> dict[str, float]:
        return {
            n: anomaly.forgetting(ns.anomaly) for n, ns in self.namespaces.items() if ns.anomaly
        }

    async def run(self, pg: RunPg, changes: Sequence[Change]) -> Analysed:
        """Analyse the freshly embedded changes; publish (acknowledged); return the deltas."""
        by_namespace: dict[str, list[Change]] = {}
        for c in changes:
            if c.op == "upsert" and c.vector is not None and c.namespace in self.namespaces:
                by_namespace.setdefault(c.namespace, []).append(c)
        out = Analysed()
        for namespace, batch in by_namespace.items():
            op = partial(
                analyse,
                namespace=namespace,
                spec=self.namespaces[namespace],
                labels=self.labels.get(namespace),
                focus=self.focus.get(namespace),
                model=self.model,
                changes=batch,
            )
            part = await pg("analyse", op)
            out.classifications += part.classifications
            out.anomalies += part.anomalies
            out.deltas += part.deltas
            out.incident_results += part.incident_results
            out.transitions.update(part.transitions)
        emit_all = {
            n for n, ns in self.namespaces.items() if ns.anomaly and ns.anomaly.emit == "all"
        }
        messages: list[AnomalyResult | IncidentResult] = [
            *(a for a in out.anomalies if a.namespace in emit_all),
            *out.incident_results,
        ]
        await self._publish(self.settings.classifications_topic, out.classifications, changes)
        await self._publish(self.settings.anomalies_topic, messages, changes)
        for r in out.classifications:
            self.stats.classified[r.action.value] += 1
        self.stats.scored += len(out.anomalies)
        self.stats.anomalies += sum(a.anomaly for a in out.anomalies)
        self.stats.incidents += sum(m.status == "open" for m in out.incident_results)
        return out


def _position(result: ClassificationResult | AnomalyResult) -> tuple[int, int]:
    return result.source.partition, result.source.offset
