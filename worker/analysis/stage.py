"""The analysis stage: between embedding and the Postgres write, for configured namespaces.

It runs in the writer, on each write batch in the order the writer received it, so that
anomaly scores see the namespace's history in stream order. Results are produced and
acknowledged before the transaction that stores the offsets; the anomaly state they were
computed from is updated in that same transaction. A crash in between replays the events
against the same committed state: the same results again, under the same keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

from aiokafka import AIOKafkaProducer

from worker.analysis import anomaly
from worker.analysis.classify import classify
from worker.analysis.config import NamespaceAnalysis
from worker.analysis.labels import Embed, LabelSet, sync
from worker.config import AnalysisSettings
from worker.decode import Change
from worker.publish import publish
from worker.store import Conn

T = TypeVar("T")


class RunPg(Protocol):
    """The pipeline's way to run a Postgres operation (it waits out outages)."""

    def __call__(self, what: str, op: Callable[[Conn], Awaitable[T]]) -> Awaitable[T]: ...


@dataclass
class AnalysisStats:
    classified: Counter[str] = field(default_factory=Counter)  # by action
    scored: int = 0
    anomalies: int = 0


@dataclass
class Analysed:
    """What a write batch must also store, in its own transaction."""

    deltas: list[anomaly.Delta] = field(default_factory=list)

    async def apply(self, conn: Conn, model: str, retain: dict[str, int]) -> None:
        for delta in self.deltas:
            await anomaly.apply(conn, model, delta, retain[delta.namespace])


class AnalysisStage:
    def __init__(self, settings: AnalysisSettings, producer: AIOKafkaProducer, model: str) -> None:
        self.settings = settings
        self.namespaces: dict[str, NamespaceAnalysis] = dict(settings.spec.namespaces)
        self.producer = producer
        self.model = model
        self.labels: dict[str, LabelSet] = {}
        self.stats = AnalysisStats()

    @property
    def enabled(self) -> bool:
        return bool(self.namespaces)

    async def prepare(self, pg: RunPg, embed: Embed) -> None:
        """Embed and store the label sets (once; later starts find them stored)."""
        for namespace, ns in self.namespaces.items():
            if ns.classify is not None:
                op = partial(
                    sync, embed=embed, model=self.model, namespace=namespace, spec=ns.classify
                )
                self.labels[namespace] = await pg("label sync", op)

    def retain(self) -> dict[str, int]:
        return {n: ns.anomaly.retain for n, ns in self.namespaces.items() if ns.anomaly}

    async def run(self, pg: RunPg, changes: Sequence[Change]) -> Analysed:
        """Classify and score the freshly embedded changes; publish; return the state delta."""
        out = Analysed()
        by_namespace: dict[str, list[Change]] = {}
        for c in changes:
            if c.op == "upsert" and c.vector is not None and c.namespace in self.namespaces:
                by_namespace.setdefault(c.namespace, []).append(c)
        classifications: list[tuple[bytes, bytes]] = []
        alerts: list[tuple[bytes, bytes]] = []
        for namespace, batch in by_namespace.items():
            ns = self.namespaces[namespace]
            labels = self.labels.get(namespace)
            if labels is not None:
                op = partial(classify, labels=labels, model=self.model, changes=batch)
                for r in await pg("classify", op):
                    classifications.append((r.key.encode(), r.model_dump_json().encode()))
                    self.stats.classified[r.action.value] += 1
            if ns.anomaly is not None:
                spec = ns.anomaly
                score = partial(
                    anomaly.score, spec=spec, namespace=namespace, model=self.model, changes=batch
                )
                scored, delta = await pg("anomaly score", score)
                out.deltas.append(delta)
                self.stats.scored += len(scored)
                for a in scored:
                    self.stats.anomalies += a.anomaly
                    if a.anomaly or spec.emit == "all":
                        alerts.append((a.key.encode(), a.model_dump_json().encode()))
        await publish(self.producer, self.settings.classifications_topic, classifications)
        await publish(self.producer, self.settings.anomalies_topic, alerts)
        return out
