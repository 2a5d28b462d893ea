"""OpenTelemetry traces (``tracing.enabled``), exported over OTLP/HTTP.

Imported only when tracing is on: the worker runs without the ``tracing`` extra, and with
tracing off nothing here is called (the stages hold ``None`` instead of a ``Tracing``).

An event's ``traceparent`` header is continued by a short span per event; the work done
for many events at once (a provider request, a Postgres transaction) cannot have them all
as parents, so its span links them. What the worker produces for an event (a dead letter,
a result) carries that event's span in its headers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from itertools import islice
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext, SpanKind

from worker.config import TracingSettings

SERVICE_NAME = "embedding-worker"
Headers = Sequence[tuple[str, bytes | None]]


class _RecordHeaders(Getter[Headers]):
    """Kafka record headers (name, bytes) as the propagators' carrier."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == key and v is not None]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


class _NewHeaders(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier.append((key, value.encode("latin-1")))


_GETTER = _RecordHeaders()
_SETTER = _NewHeaders()


class Tracing:
    """The worker's spans; ``provider`` is shut down (its spans flushed) by ``close``."""

    def __init__(self, provider: TracerProvider, group: str) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("worker")
        self.group = group
        # The SDK keeps this many links of a span (OTEL_LINK_COUNT_LIMIT, default 128): the
        # rest are not even made.
        self.max_links = SpanLimits().max_links

    @classmethod
    def start(cls, settings: TracingSettings, group: str) -> Tracing:
        """OTLP/HTTP to ``settings.endpoint`` (else the ``OTEL_EXPORTER_OTLP_*`` variables)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls.exporting(OTLPSpanExporter(endpoint=settings.endpoint), settings, group)

    @classmethod
    def exporting(cls, exporter: SpanExporter, settings: TracingSettings, group: str) -> Tracing:
        sampler = None  # the SDK's: OTEL_TRACES_SAMPLER, else parent-based always-on
        if settings.sample_ratio is not None:
            sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(sampler=sampler, resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, group)

    def close(self) -> None:
        self.provider.shutdown()

    # ---- spans ---------------------------------------------------------------------------

    def received(
        self,
        topic: str,
        partition: int,
        offset: int,
        headers: Headers,
        group: str | None = None,
    ) -> SpanContext | None:
        """One event's span, child of its ``traceparent`` (if any), ended at once: what the
        event becomes later links it (a batch) or carries it (a dead letter, a result).
        ``group``: a side consumer's own group (else the pipeline's)."""
        parent = propagate.extract(headers, getter=_GETTER) if headers else None
        span = self.tracer.start_span(
            f"{topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(partition),
                "messaging.kafka.offset": offset,
                "messaging.consumer.group.name": group or self.group,
            },
        )
        span.end()
        context = span.get_span_context()
        return context if context.is_valid else None

    @contextmanager
    def span(
        self,
        name: str,
        events: Sequence[SpanContext | None] = (),
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[Span]:
        """A span (current inside the block) linking the spans of the ``events`` it serves.

        Links are added once the span is known to be sampled (the ratio sampler does not look
        at them), and only to sampled spans (no other is exported): in a profile at
        ``sample_ratio=0.1``, links made for unsampled batches were a quarter of the cost."""
        with self.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            if span.is_recording():
                unique = {c.span_id: c for c in events if c is not None and c.trace_flags.sampled}
                for context in islice(unique.values(), self.max_links):
                    span.add_link(context)
            yield span

    def embedding(
        self, events: Sequence[SpanContext | None], model: str
    ) -> AbstractContextManager[Span]:
        """The span of one micro-batch at the provider (its requests, retries as events)."""
        return self.span(
            "embed",
            events,
            SpanKind.CLIENT,
            {
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": model,
                "embedding_worker.texts": len(events),
            },
        )

    def transaction(self, events: Sequence[SpanContext | None]) -> AbstractContextManager[Span]:
        """The span of one Postgres transaction (rows and offsets, retried while it is down)."""
        return self.span(
            "postgres transaction",
            events,
            SpanKind.CLIENT,
            {
                "db.system.name": "postgresql",
                "db.operation.name": "write",
                "embedding_worker.events": len(events),
            },
        )

    def applying(
        self, kind: str, topic: str, events: Sequence[SpanContext | None]
    ) -> AbstractContextManager[Span]:
        """The span of one fetch of a side consumer (decisions, interactions) applied: its
        look-ups, its transaction with the offsets, its dead letters."""
        return self.span(
            f"{kind} apply",
            events,
            SpanKind.CONSUMER,
            {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.batch.message_count": len(events),
            },
        )

    def producing(
        self, topic: str, events: Sequence[SpanContext | None]
    ) -> AbstractContextManager[Span]:
        """The span of one produce (acknowledged) of records made for ``events``."""
        return self.span(
            f"{topic} publish",
            events,
            SpanKind.PRODUCER,
            {
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "messaging.batch.message_count": len(events),
            },
        )

    @staticmethod
    def retried(cause: str, attempt: int, delay_s: float) -> None:
        """A provider request sent again: an event of the current (batch) span."""
        trace.get_current_span().add_event(
            "retry", {"cause": cause, "attempt": attempt, "delay_s": delay_s}
        )

    @staticmethod
    def headers(event: SpanContext | None) -> list[tuple[str, bytes]]:
        """Headers carrying ``event``'s span (else the current span) to whoever reads on."""
        context: Context | None = None
        if event is not None:
            context = trace.set_span_in_context(trace.NonRecordingSpan(event))
        out: list[tuple[str, bytes]] = []
        propagate.inject(out, context=context, setter=_SETTER)
        return out
