"""Prometheus metrics.

Counters are read from the pipeline's own ``Stats`` at scrape time (one source of truth, no
double bookkeeping), and so are the live gauges (lag, in-flight, AIMD limit, circuit state):
the pipeline hands a function that returns a ``PipelineSnapshot``, so this module needs
nothing of the pipeline but its counters' type.
Only distributions are observed as they happen: request latency, batch size, write latency
and end-to-end latency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker.analysis.stage import AnalysisStats
    from worker.pipeline.stats import Stats
    from worker.side.consumer import SideConsumer
    from worker.side.interactions import Profiler
    from worker.side.learn import Learner

PREFIX = "embedding_worker"
CIRCUIT_STATES = ("closed", "half_open", "open")


@dataclass(frozen=True)
class PipelineSnapshot:
    """The pipeline's state as one scrape sees it."""

    stats: Stats
    analysis: AnalysisStats | None
    in_flight: int
    paused_partitions: int
    concurrency_limit: int
    concurrency_ceiling: int
    requests_in_flight: int
    max_texts: int
    circuit_state: str
    auth_fault: bool
    postgres_up: bool
    schema_registry_up: bool
    ready: bool
    lag: dict[tuple[str, int], int]


class Metrics:
    """The registry of one worker (several can live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            f"{PREFIX}_api_request_seconds",
            "Embedding API request latency by outcome (HTTP status or transport failure).",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_texts",
            "Texts per embedding request.",
            buckets=(1, 2, 4, 8, 10, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.write_seconds = Histogram(
            f"{PREFIX}_db_write_seconds",
            "Duration of one Postgres transaction (rows + offsets).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            f"{PREFIX}_end_to_end_seconds",
            "Event time to stored (commit of its transaction).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=self.registry,
        )

    def request_seconds_observer(self, outcome: str, seconds: float) -> None:
        self.request_seconds.labels(outcome).observe(seconds)

    def bind(self, snapshot: Callable[[], PipelineSnapshot]) -> None:
        self.registry.register(PipelineCollector(snapshot))

    def bind_learner(self, learner: Learner) -> None:
        self.registry.register(LearnerCollector(learner))

    def bind_profiler(self, profiler: Profiler) -> None:
        self.registry.register(
            SideConsumerCollector(
                profiler, "interactions", "Interactions applied to user profiles."
            )
        )


class SideConsumerCollector(Collector):
    """A side consumer's counters (``worker.side.consumer``), read from its stats."""

    def __init__(self, side: SideConsumer, kind: str, applied: str) -> None:
        self.side = side
        self.kind = kind  # the metric names' part: fixed here, not read from the consumer
        self.applied = applied

    def collect(self) -> Iterator[Metric]:
        st, kind = self.side.stats, self.kind
        yield CounterMetricFamily(
            f"{PREFIX}_{kind}_consumed", f"Records read from the {kind} topic.", st.consumed
        )
        yield CounterMetricFamily(f"{PREFIX}_{kind}_applied", self.applied, st.applied)
        dead = CounterMetricFamily(
            f"{PREFIX}_{kind}_dead_lettered",
            f"Records sent to the {kind} dead-letter topic.",
            labels=["reason"],
        )
        for reason, count in sorted(st.dead_lettered.items()):
            dead.add_metric([reason], count)
        yield dead


class LearnerCollector(SideConsumerCollector):
    """The moderation decisions (``worker.side.learn``), and the rebuilds they cause."""

    def __init__(self, learner: Learner) -> None:
        super().__init__(
            learner,
            "decisions",
            "Decision examples stored (inserted, or replacing an earlier label).",
        )
        self.learner = learner

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        yield CounterMetricFamily(
            f"{PREFIX}_label_set_rebuilds",
            "Label sets rebuilt in memory after their decisions changed.",
            self.learner.stats.rebuilds,
        )


class PipelineCollector(Collector):
    def __init__(self, snapshot: Callable[[], PipelineSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        p = self.snapshot()
        st = p.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield counter("events_consumed", "Records read from the input topic.", st.consumed)
        yield counter("events_stored", "Rows inserted or re-embedded.", st.stored)
        yield counter("events_deleted", "Delete events applied.", st.deleted)
        yield counter(
            "events_unchanged", "Upserts whose content was already embedded.", st.unchanged
        )
        dead = CounterMetricFamily(
            f"{PREFIX}_events_dead_lettered",
            "Events sent to the dead-letter topic.",
            labels=["reason"],
        )
        for reason, count in sorted(st.dead_lettered.items()):
            dead.add_metric([reason], count)
        yield dead
        yield counter("batches", "Micro-batches embedded.", st.batches)
        yield counter("texts_embedded", "Texts embedded.", st.texts_embedded)
        yield counter(
            "documents_chunked", "Documents split into chunks (oversize_policy chunk).", st.chunked
        )
        yield counter("chunks", "Chunks of chunked documents (a text and a row each).", st.chunks)
        yield counter("tokens_estimated", "Tokens sent, as estimated.", st.tokens_estimated)
        yield counter("api_requests", "Embedding API requests sent.", st.requests)
        retries = CounterMetricFamily(
            f"{PREFIX}_api_retries", "Requests retried, by cause.", labels=["cause"]
        )
        for cause, count in sorted(st.retries_by_cause.items()):
            retries.add_metric([cause], count)
        yield retries
        yield counter("api_throttled", "429 answers.", st.throttled)
        if st.sparse_vectors:
            yield counter("sparse_vectors", "Sparse vectors received.", st.sparse_vectors)
            yield counter(
                "sparse_entries", "Non-zero entries of the sparse vectors.", st.sparse_entries
            )
            yield counter(
                "sparse_at_cap",
                "Sparse vectors cut to the 1,000 entries an index takes (lightest dropped).",
                st.sparse_at_cap,
            )
        yield counter("db_transactions", "Postgres transactions committed.", st.transactions)
        if st.dual_written or st.dual_requests or st.dual_left:
            yield from _dual_write(st)
        if p.analysis is not None:
            a = p.analysis
            classified = CounterMetricFamily(
                f"{PREFIX}_classifications",
                "Classification results produced, by moderation action.",
                labels=["action"],
            )
            for action, count in sorted(a.classified.items()):
                classified.add_metric([action], count)
            yield classified
            yield counter("anomaly_scored", "Events given an anomaly score.", a.scored)
            yield counter("anomalies", "Events that crossed the anomaly threshold.", a.anomalies)
            yield counter("anomaly_incidents", "Anomaly incidents opened.", a.incidents)

        yield gauge("in_flight_events", "Events fetched but not yet stored.", p.in_flight)
        yield gauge(
            "paused_partitions",
            "Partitions paused by backpressure.",
            p.paused_partitions,
        )
        yield gauge(
            "concurrency_limit",
            "Current AIMD limit of requests in flight.",
            p.concurrency_limit,
        )
        yield gauge(
            "concurrency_ceiling",
            "Most the AIMD limit may grow to now (max_concurrency, or what the quota can use).",
            p.concurrency_ceiling,
        )
        yield gauge("api_requests_in_flight", "Requests in flight.", p.requests_in_flight)
        yield gauge(
            "texts_per_request_limit",
            "Most texts per request (lowered when the provider refuses a batch's size).",
            p.max_texts,
        )
        circuit = GaugeMetricFamily(
            f"{PREFIX}_circuit_state",
            "1 for the circuit breaker's current state.",
            labels=["state"],
        )
        for state in CIRCUIT_STATES:
            circuit.add_metric([state], 1.0 if p.circuit_state == state else 0.0)
        yield circuit
        yield gauge(
            "auth_fault",
            "1 while the provider rejects the credentials.",
            float(p.auth_fault),
        )
        yield gauge("postgres_up", "0 while Postgres is unreachable.", float(p.postgres_up))
        yield gauge(
            "schema_registry_up",
            "0 while the schema registry cannot give a schema a fetch needs.",
            float(p.schema_registry_up),
        )
        yield gauge("ready", "1 when the readiness probe passes.", float(p.ready))
        lag = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag",
            "Records behind the partition's high-water mark.",
            labels=["topic", "partition"],
        )
        for (topic, partition), behind in sorted(p.lag.items()):
            lag.add_metric([topic, str(partition)], behind)
        yield lag


def _by_labels(
    name: str, doc: str, labels: list[str], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    """A counter with one sample per key of ``counts`` (a label value, or a tuple of them)."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


def _dual_write(st: Stats) -> Iterator[Metric]:
    """reembed.dual_write, per re-embed target (docs/reembed.md, Dual write)."""
    yield _by_labels(
        "reembed_dual_write_rows",
        "Rows written into a re-embed target beside embeddings (dual write).",
        ["target"],
        st.dual_written,
    )
    yield _by_labels(
        "reembed_dual_write_requests",
        "Embedding requests sent to a re-embed target's provider (dual write).",
        ["target"],
        st.dual_requests,
    )
    yield _by_labels(
        "reembed_dual_write_left",
        "Rows left to the re-embed's catch-up instead of written into its target, by reason.",
        ["target", "reason"],
        st.dual_left,
    )
