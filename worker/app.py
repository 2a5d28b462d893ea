"""Start-up checks, client lifecycles and graceful shutdown around the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from worker import backoff
from worker.analysis.labels import Embed, LabelError
from worker.analysis.stage import AnalysisStage
from worker.config import ConfigError, Settings
from worker.embedding.providers import create_embedder
from worker.embedding.stage import EmbedStage, TextRefused
from worker.events import TextType
from worker.kafka.clients import make_consumer, make_producer, quiet_bootstrap, refusal
from worker.ops.metrics import Metrics
from worker.ops.probes import ProbeServer
from worker.pipeline.runner import Pipeline
from worker.side import interactions
from worker.side.learn import Learner, group_of
from worker.sinks import postgres as store
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.store import PostgresStore, ShuttingDown

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)


class Worker:
    """``run()`` until ``stop`` is set (or SIGTERM/SIGINT with ``handle_signals``)."""

    def __init__(self, settings: Settings, span_exporter: SpanExporter | None = None) -> None:
        """``span_exporter``: where spans go instead of OTLP (tests), if tracing is on."""
        self.settings = settings
        self.span_exporter = span_exporter
        self.pipeline: Pipeline | None = None
        self.learner: Learner | None = None
        self.profiler: interactions.Profiler | None = None
        self.metrics = Metrics()
        self.http_port: int | None = None
        # Until the pipeline runs: each service waited for, and whether it was reached.
        self._reached: dict[str, bool] = {}

    def checks(self) -> dict[str, bool]:
        if self.pipeline is None:
            return {"started": False, **self._reached}
        waiting = {name: False for name, reached in self._reached.items() if not reached}
        learning = self.learner.checks() if self.learner is not None else {}
        profiling = self.profiler.checks() if self.profiler is not None else {}
        return {**self.pipeline.checks(), **learning, **profiling, **waiting}

    async def run(self, stop: asyncio.Event | None = None, handle_signals: bool = False) -> None:
        stop = stop or asyncio.Event()
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        s = self.settings
        probes = ProbeServer(self.metrics.registry, self.checks)
        if s.http.enabled:
            try:
                self.http_port = await probes.start(s.http.host, s.http.port)
            except OSError as exc:  # in use, not an address of this host, a privileged port
                raise ConfigError(
                    f"http.host/http.port (EMBEDDING_WORKER_HTTP__HOST/__PORT): cannot listen "
                    f"on {s.http.host}:{s.http.port}: {exc.strerror or exc}"
                ) from None
        try:
            tracing = self._tracing()
            try:
                await self._run(stop, tracing)
            finally:
                if tracing is not None:  # exports what is left (off the event loop)
                    await asyncio.to_thread(tracing.close)
        finally:
            await probes.stop()

    def _tracing(self) -> Tracing | None:
        """With ``tracing.enabled`` but without the ``tracing`` extra: a configuration error."""
        s = self.settings
        if not s.tracing.enabled:
            return None
        try:
            from worker.ops.tracing import Tracing
        except ImportError as exc:
            raise ConfigError(
                f"tracing.enabled (EMBEDDING_WORKER_TRACING__ENABLED): needs the 'tracing' "
                f"extra (pip install 'embedding-worker[tracing]'): {exc}"
            ) from None
        if self.span_exporter is not None:
            return Tracing.exporting(self.span_exporter, s.tracing, s.kafka.group_id)
        return Tracing.start(s.tracing, s.kafka.group_id)

    async def _run(self, stop: asyncio.Event, tracing: Tracing | None) -> None:
        s = self.settings
        dsn = s.postgres.dsn.get_secret_value()
        # First: TLS files that are not PEM are a configuration error (exit 2).
        producer = make_producer(s.kafka)
        consumer = make_consumer(s.kafka)
        # Check the schema before the pool: its connections need the vector type. A wrong
        # schema or DSN raises with its reason, a stop returns: either way nothing started.
        started = False
        try:
            if not await self._wait_for_postgres(dsn, stop):
                return
            pool = await store.create_pool(dsn, s.postgres.pool_min_size, s.postgres.pool_max_size)
            started = True
        finally:
            if not started:
                # Never started, but aiokafka reports a client it did not stop as unclosed.
                await consumer.stop()
                await producer.stop()
        embedder = create_embedder(s.provider)
        learning: AIOKafkaConsumer | None = None  # the decisions' consumer, if configured
        profiling: AIOKafkaConsumer | None = None  # the interactions' consumer, if configured
        try:
            await embedder.start()
            if not await self._wait_for_kafka("producer", producer.start, stop):
                return
            analysis = (
                AnalysisStage(s.analysis, producer, embedder.model)
                if s.analysis.spec.namespaces
                else None
            )
            dead_letters = DeadLetterSink(producer, s.kafka.dlq_topic)
            if analysis is not None:
                analysis.tracing = tracing
            dead_letters.tracing = tracing
            postgres = PostgresStore(pool, stop)
            pipeline = Pipeline(
                s, consumer, dead_letters, postgres, embedder, self.metrics, analysis, tracing
            )
            self.pipeline = pipeline
            if analysis is not None:
                # Embeds the label sets: held, like any request, while the key is refused.
                prepared = analysis.prepare(postgres.run, label_embedder(pipeline.stage))
                try:
                    if not await _unless_stopped(prepared, stop):
                        return
                except ShuttingDown:
                    return
            consumer.subscribe([s.kafka.input_topic], listener=pipeline)
            if not await self._wait_for_kafka("consumer", consumer.start, stop):
                return
            if analysis is not None and s.analysis.decisions_topic is not None:
                learning = make_consumer(s.kafka.model_copy(update={"group_id": group_of(s)}))
                self.learner = self._learner(pipeline, postgres, analysis, learning, producer)
                self.learner.tracing = tracing
                learning.subscribe([s.analysis.decisions_topic], listener=self.learner)
                if not await self._wait_for_kafka("decisions consumer", learning.start, stop):
                    return
            if s.recommend.interactions_topic is not None:
                group = interactions.group_of(s)
                profiling = make_consumer(s.kafka.model_copy(update={"group_id": group}))
                sink = DeadLetterSink(producer, s.recommend.interactions_dlq_topic)
                self.profiler = interactions.Profiler(
                    s, profiling, sink, postgres.run, embedder.model
                )
                self.profiler.tracing = tracing
                self.metrics.bind_profiler(self.profiler)
                profiling.subscribe([s.recommend.interactions_topic], listener=self.profiler)
                if not await self._wait_for_kafka("interactions consumer", profiling.start, stop):
                    return
            log.info(
                "worker started",
                topic=s.kafka.input_topic,
                group=s.kafka.group_id,
                provider=s.provider.kind.value,
                model=embedder.model,
                dimension=embedder.dimension,
            )
            await self._run_all(pipeline, stop)
            log.info("worker stopped", **_summary(pipeline))
        finally:
            for side in (learning, profiling):
                if side is not None:
                    with contextlib.suppress(Exception):
                        await side.stop()
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await embedder.close()
            await pool.close()

    def _learner(
        self,
        pipeline: Pipeline,
        postgres: PostgresStore,
        analysis: AnalysisStage,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
    ) -> Learner:
        s = self.settings
        embed = label_embedder(pipeline.stage)
        sink = DeadLetterSink(producer, s.analysis.decisions_dlq_topic)
        learner = Learner(s, consumer, sink, postgres.run, analysis, embed)
        self.metrics.bind_learner(learner)
        return learner

    async def _run_all(self, pipeline: Pipeline, stop: asyncio.Event) -> None:
        """The pipeline and, if configured, the decisions and interactions loops: any
        failing stops them all."""
        loops = {"decisions": self.learner, "interactions": self.profiler}
        inner = asyncio.Event()
        sides = [
            asyncio.create_task(loop.run(inner), name=name)
            for name, loop in loops.items()
            if loop is not None
        ]

        def failed(task: asyncio.Task[None]) -> None:
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, ShuttingDown):
                pipeline.fatal = error

        for side in sides:
            side.add_done_callback(failed)
        try:
            await pipeline.run(stop)
        finally:
            inner.set()
            for side in sides:
                with contextlib.suppress(Exception):
                    await side

    async def _wait_for_postgres(self, dsn: str, stop: asyncio.Event) -> bool:
        """Start even if Postgres is not up yet: wait (not ready) instead of crash-looping.

        A wrong schema or dimension is not waited out: it stops the worker with its reason.
        Returns False when asked to stop while waiting.
        """
        self._reached["postgres"] = False
        attempt = 0
        while not stop.is_set():
            try:
                await (await store.connect(dsn, self.settings.provider.dim)).close()
                self._reached["postgres"] = True
                return True
            except (store.Unreachable, *store.PG_UNAVAILABLE) as exc:
                delay = backoff.capped(attempt, 0.2, 10.0)
                attempt += 1
                log.warning("waiting for postgres", error=repr(exc.__cause__ or exc), delay_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _wait_for_kafka(
        self, client: str, start: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> bool:
        """Start a Kafka client even if no broker answers yet: wait (not ready), as for Postgres.

        aiokafka's ``start()`` raises ``KafkaConnectionError`` when no bootstrap server
        answers, and may simply be called again. A stop request ends the wait at once, even
        in the middle of an attempt. Returns False when asked to stop while waiting.

        A broker that answers and refuses the credentials or the TLS handshake raises the
        same error: then the cause is found (``kafka.refusal``), logged as an error naming
        the settings, and readiness says ``"kafka_credentials": false``. Waited out too, not
        a crash loop: credentials or a certificate may be fixed on the broker's side.
        """
        self._reached["kafka"] = False
        attempt = 0
        refused: str | None = None
        with quiet_bootstrap():
            while not stop.is_set():
                try:
                    if await _unless_stopped(start(), stop):
                        self._reached["kafka"] = True
                        self._reached.pop("kafka_credentials", None)
                        return True
                    return False
                except KafkaConnectionError as exc:
                    delay = backoff.capped(attempt, 0.2, 10.0)
                    attempt += 1
                    why = await refusal(self.settings.kafka)
                    if why is not None:
                        self._reached["kafka_credentials"] = False
                        # An error the first time (and when the cause changes), then warnings.
                        (log.warning if why == refused else log.error)(
                            "kafka refuses the worker: fix the settings",
                            client=client,
                            cause=why,
                            delay_s=delay,
                        )
                        refused = why
                    else:
                        self._reached.pop("kafka_credentials", None)
                        log.warning(
                            "waiting for kafka",
                            client=client,
                            bootstrap_servers=self.settings.kafka.bootstrap_servers,
                            error=str(exc),
                            delay_s=delay,
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            return False


def label_embedder(stage: EmbedStage) -> Embed:
    """The analysis' embedding function: the pipeline's stage (same limits, retries and
    quotas); a label text the provider refuses is the analysis file's error."""

    async def embed(texts: list[str], text_type: TextType) -> np.ndarray:
        try:
            return await stage.texts(texts, text_type)
        except TextRefused as exc:
            raise LabelError(
                f"the provider refuses label text {exc.text[:80]!r}: {exc.error}"
            ) from None

    return embed


async def _unless_stopped(operation: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``operation`` unless ``stop`` is set first (then cancel it): True if it ran."""
    task = asyncio.ensure_future(operation)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (stopped, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.cancelled():
        return False
    task.result()  # raises what the operation raised
    return True


def _summary(pipeline: Pipeline) -> dict[str, object]:
    st = pipeline.stats
    return {
        "consumed": st.consumed,
        "stored": st.stored,
        "unchanged": st.unchanged,
        "deleted": st.deleted,
        "dead_lettered": sum(st.dead_lettered.values()),
    }
