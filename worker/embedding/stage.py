"""Call the provider for one micro-batch: retry what is transient, isolate what is not.

A permanent refusal (HTTP 400) of a batch is split in halves until the refused items are
alone, so one bad text costs a few extra requests instead of failing its batch-mates. A
refusal of the number of texts ("too many inputs") is the worker's batch size, not the data:
the size is lowered for the rest of the run (to the number the server states, else halved),
once, with one log line, and the texts are sent again in batches of the new size.

Every request passes, in order: a held auth fault (wait for the key to work again), the
circuit breaker (wait while the provider is down), the adaptive concurrency gate (in-flight
requests), and the RPM/TPM limiter (as late as possible, so the send time is the time the
quota was taken). One stage is shared by all of the pipeline's embedding tasks, so these
gates see the whole worker's traffic.

The stage embeds anything with a text (``Embeddable``): the pipeline's changes, and free
texts (``texts``: label descriptions, examples, moderators' decisions), so the analysis
gets an embedding function and never needs the pipeline's types.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import structlog
from pgvector import SparseVector

from worker import backoff
from worker.config import INITIAL_CONCURRENCY, ProviderSettings
from worker.embedding.breaker import CircuitBreaker
from worker.embedding.concurrency import AdaptiveConcurrency, quota_ceiling
from worker.embedding.providers.base import (
    CONFIG_CODES,
    ConfigurationFault,
    Embedder,
    EmbeddingError,
    Embeddings,
    PermanentError,
    TooManyInputs,
    TransientError,
)
from worker.embedding.ratelimit import RateLimiter
from worker.events import TextType
from worker.tokens import estimate_tokens, recut_to_fit, truncate_to_tokens

log = structlog.get_logger(__name__)

# worker.embedding.providers.http words every HTTP error as "HTTP <status> <code>: <message>".
_AUTH_STATUSES = {"401", "403"}
_NUMBER = re.compile(r"\d+")
# A refusal of one text for its length: DashScope ("Range of input length should be [1,
# 8192]"), OpenAI and vLLM ("maximum context length is ... tokens"), TEI ("must have less
# than 512 tokens").
_TOO_LONG = re.compile(
    r"input length|context length|too long|less than \d+ tokens|maximum .*tokens", re.IGNORECASE
)
# Weight of the newest request in the moving averages of latency and tokens per request.
_EWMA = 0.2


class Embeddable(Protocol):
    """What the stage embeds: a change of the pipeline, or a free text (``Text``)."""

    text: str
    text_type: TextType
    tokens: int
    vector: np.ndarray | None
    sparse: SparseVector | None
    truncated: bool
    # A change may also carry ``media`` (its images and video, for a multimodal provider);
    # what has none (a free text, a re-embed's row) embeds its text alone.


E = TypeVar("E", bound=Embeddable)


@dataclass(slots=True)
class Text:
    text: str
    text_type: TextType
    tokens: int
    vector: np.ndarray | None = None
    sparse: SparseVector | None = None
    truncated: bool = False


class TextRefused(Exception):
    """The provider refuses a free text for good (``EmbedStage.texts``)."""

    def __init__(self, text: str, error: PermanentError) -> None:
        super().__init__(f"the provider refuses {text[:80]!r}: {error}")
        self.text = text
        self.error = error


@dataclass
class BatchOutcome(Generic[E]):
    embedded: list[E] = field(default_factory=list)
    refused: list[tuple[E, PermanentError]] = field(default_factory=list)
    requests: int = 0
    # Requests sent again; ``retries_by_cause`` splits them ("429", "500", "Timeout", ...).
    retries: int = 0
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    # 429 answers received (each one also lowers the adaptive concurrency).
    throttled: int = 0


def stated_limit(message: str, sent: int) -> int | None:
    """The texts-per-request limit a "too many inputs" refusal states: the largest number in
    it below the number sent ("... larger than 10", "64 > maximum allowed batch size 32"),
    read after the "HTTP <status> <code>: " that worker.embedding.providers.http puts first."""
    _, sep, said = message.partition(": ")
    numbers = [n for n in map(int, _NUMBER.findall(said if sep else message)) if 0 < n < sent]
    return max(numbers) if numbers else None


def chunks(items: list[E], size: int) -> list[list[E]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def cause_of(exc: EmbeddingError) -> str:
    """What failed, for logs and metrics: the HTTP status when there was an answer ("429",
    "503"), else the transport failure ("Timeout", "ConnectionError")."""
    if exc.status is not None:
        return str(exc.status)
    return exc.code or "InvalidResponse"


def is_auth_fault(exc: ConfigurationFault) -> bool:
    """A rejected key or account, which can be fixed outside the worker (as opposed to a wrong
    model or dimension, which only a new configuration and a restart can fix)."""
    return exc.code in CONFIG_CODES or cause_of(exc) in _AUTH_STATUSES


class EmbedStage:
    def __init__(
        self,
        embedder: Embedder,
        settings: ProviderSettings,
        on_request: Callable[[str, float], None] | None = None,
        *,
        recut: bool = True,
    ) -> None:
        self.embedder = embedder
        self.settings = settings
        # Cut again a text refused as too long (oversize_policy truncate or chunk), rather
        # than refuse it: its estimate, not the data, was wrong (``_recut``).
        self.recut = recut
        # Called with (outcome, seconds) for every request: "ok" or the failure's cause.
        self.on_request = on_request
        self.limiter = RateLimiter(settings.rpm, settings.tpm)
        self.concurrency = AdaptiveConcurrency(
            settings.min_concurrency, settings.concurrency_ceiling, initial=INITIAL_CONCURRENCY
        )
        # Texts per request: the embedder's, until the server says it takes fewer.
        self.max_texts = embedder.max_texts
        # Told the new size when it is lowered (the pipeline's batcher).
        self.on_max_texts: Callable[[int], None] | None = None
        # Told (cause, attempt, delay in seconds) of each request sent again (worker.ops.tracing).
        self.on_retry: Callable[[str, int, float], None] | None = None
        # Moving averages of successful requests, for the quota's concurrency ceiling.
        self._latency_s: float | None = None
        self._tokens_per_request: float | None = None
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
        # Set while the provider rejects the credentials (on_auth_fault="wait"); for readiness.
        self.fault: ConfigurationFault | None = None
        self._fault_owner: object | None = None  # the one call that re-tries meanwhile
        self._fault_changed = asyncio.Event()

    async def run(self, items: Sequence[E]) -> BatchOutcome[E]:
        outcome: BatchOutcome[E] = BatchOutcome()
        for chunk in chunks(list(items), self.max_texts):  # batched before a lowering
            await self._embed(chunk, outcome)
        return outcome

    async def texts(self, texts: list[str], text_type: TextType) -> np.ndarray:
        """Embed free texts through the same gates, retries and quotas as events (each cut
        to ``max_tokens_per_text``); raises ``TextRefused`` for one the provider refuses."""
        cap = self.settings.max_tokens_per_text
        items = [
            Text(t, text_type, estimate_tokens(t))
            for t in (truncate_to_tokens(s, cap) for s in texts)
        ]
        outcome = await self.run(items)
        if outcome.refused:
            item, error = outcome.refused[0]
            raise TextRefused(item.text, error)
        return np.vstack([i.vector for i in items if i.vector is not None]).astype(np.float32)

    async def _embed(self, items: list[E], outcome: BatchOutcome[E]) -> None:
        try:
            result = await self._call(items, outcome)
        except TooManyInputs as exc:
            if len(items) == 1:  # no batch size is smaller: the text's own refusal
                outcome.refused.append((items[0], exc))
                return
            self._lower_max_texts(len(items), exc)
            for chunk in chunks(items, self.max_texts):
                await self._embed(chunk, outcome)
            return
        except PermanentError as exc:
            if len(items) == 1:
                if self.recut and self._recut(items[0], exc):
                    await self._embed(items, outcome)
                    return
                outcome.refused.append((items[0], exc))
                return
            middle = len(items) // 2
            log.info("batch refused, splitting", size=len(items), code=exc.code)
            await self._embed(items[:middle], outcome)
            await self._embed(items[middle:], outcome)
            return
        sparse: Sequence[SparseVector | None] = result.sparse or [None] * len(items)
        for change, vector, lexical in zip(items, result.vectors, sparse, strict=True):
            change.vector = vector
            change.sparse = lexical
        outcome.embedded.extend(items)

    def _recut(self, item: E, exc: PermanentError) -> bool:
        """Cut a text the provider refuses as too long though its estimate fit: first to half
        the estimate's budget (the estimate is rarely under by more than 1.5x), then to what
        cannot be over (``recut_to_fit``). False when there is nothing shorter to try."""
        if not _TOO_LONG.search(exc.message):
            return False
        limit = self.settings.max_tokens_per_text
        for cut in (
            truncate_to_tokens(item.text, min(limit, item.tokens) // 2),
            recut_to_fit(item.text, limit),
        ):
            if cut.strip() and len(cut) < len(item.text):
                log.warning(
                    "provider refused a text as too long; embedding a shorter prefix",
                    tokens_estimated=item.tokens,
                    chars=len(item.text),
                    cut_to_chars=len(cut),
                    error=exc.message,
                )
                item.text = cut
                item.tokens = estimate_tokens(cut)
                item.truncated = True
                return True
        return False

    def _lower_max_texts(self, sent: int, exc: TooManyInputs) -> None:
        """Once per size: the refusals of other requests of the same size change nothing."""
        stated = stated_limit(exc.message, sent)
        new = stated if stated is not None else max(1, sent // 2)
        if new >= self.max_texts:
            return
        log.warning(
            "provider takes fewer texts per request; lowering the batch size for this run",
            max_texts=new,
            was=self.max_texts,
            error=exc.message,
        )
        self.max_texts = new
        self.embedder.max_texts = new
        if self.on_max_texts is not None:
            self.on_max_texts(new)

    async def _call(self, items: list[E], outcome: BatchOutcome[E]) -> Embeddings:
        texts = [c.text for c in items]
        parts = [getattr(c, "media", ()) for c in items]
        media = parts if any(parts) else None
        text_type = items[0].text_type
        estimate = sum(c.tokens or estimate_tokens(c.text) for c in items)
        me = object()
        attempt = 0
        try:
            while True:
                await self._wait_out_fault(me)
                try:
                    return await self._request(texts, text_type, estimate, outcome, media)
                except TransientError as exc:
                    limit = self.settings.max_retries
                    if limit is not None and attempt >= limit:
                        raise
                    delay = backoff.jittered(
                        attempt,
                        self.settings.backoff_initial_s,
                        self.settings.backoff_max_s,
                        exc.retry_after,
                    )
                    log.warning(
                        "embedding request failed, retrying",
                        cause=cause_of(exc),
                        code=exc.code,
                        error=exc.message,
                        attempt=attempt + 1,
                        delay_s=round(delay, 3),
                    )
                    self._count_retry(exc, outcome)
                    attempt += 1
                    if self.on_retry is not None:
                        self.on_retry(cause_of(exc), attempt, delay)
                    await asyncio.sleep(delay)
                except ConfigurationFault as exc:
                    if self.settings.on_auth_fault == "exit" or not is_auth_fault(exc):
                        raise
                    self._count_retry(exc, outcome)
                    if self._fault_owner not in (None, me):
                        continue  # another call is already re-trying for everyone
                    self._hold_fault(exc, me)
                    await asyncio.sleep(self.settings.auth_retry_s)
        finally:
            if self._fault_owner is me:  # cancelled while re-trying: let another call take over
                self._fault_owner = None
                self._notify_fault()

    async def _request(
        self,
        texts: list[str],
        text_type: TextType,
        estimate: int,
        outcome: BatchOutcome[Any],
        media: list[tuple[tuple[str, str], ...]] | None = None,
    ) -> Embeddings:
        """One HTTP request through the breaker, the concurrency gate and the limiter."""
        probe = await self.breaker.acquire()
        try:
            sent_at = await self.concurrency.acquire()
            began = time.monotonic()
            try:
                await self.limiter.acquire(estimate)
                outcome.requests += 1
                began = time.monotonic()
                result = await (
                    self.embedder.embed(texts, text_type)
                    if media is None
                    else self.embedder.embed_media(texts, media, text_type)
                )
                self._timed("ok", began)
                self.concurrency.observe(time.monotonic() - began)
                self._observe_success(time.monotonic() - began, estimate)
            except EmbeddingError as exc:
                self._timed(cause_of(exc), began)
                self._observe(exc, sent_at, outcome)
                raise
            finally:
                self.concurrency.release()
        except BaseException:
            if probe:
                self.breaker.cancel_probe()  # no-op once an outcome was recorded
            raise
        self.breaker.record_success()
        self.concurrency.on_success()
        self.limiter.correct(estimate, result.tokens)
        self._clear_fault()
        return result

    def _observe_success(self, seconds: float, tokens: int) -> None:
        """With a quota, cap the concurrency at what it can keep busy at this latency."""
        if self.limiter.unlimited:
            return
        if self._latency_s is None or self._tokens_per_request is None:
            self._latency_s, self._tokens_per_request = seconds, float(tokens)
        else:
            self._latency_s += _EWMA * (seconds - self._latency_s)
            self._tokens_per_request += _EWMA * (tokens - self._tokens_per_request)
        s = self.settings
        self.concurrency.set_ceiling(
            quota_ceiling(s.rpm, s.tpm, self._tokens_per_request, self._latency_s)
        )

    def _timed(self, outcome: str, began: float) -> None:
        if self.on_request is not None:
            self.on_request(outcome, time.monotonic() - began)

    def _observe(self, exc: EmbeddingError, sent_at: float, outcome: BatchOutcome[Any]) -> None:
        """Feed a failed request to the breaker and the adaptive concurrency."""
        if not isinstance(exc, TransientError):
            self.breaker.record_success()  # a 400/401 is an answer: the provider is up
            return
        cause = cause_of(exc)
        if cause == "429":
            outcome.throttled += 1
            self.breaker.record_success()
            if exc.retry_after is not None:
                self.limiter.hold(exc.retry_after)
        else:
            self.breaker.record_failure()
        if cause in ("429", "Timeout"):
            self.concurrency.on_throttle(sent_at)

    @staticmethod
    def _count_retry(exc: EmbeddingError, outcome: BatchOutcome[Any]) -> None:
        outcome.retries += 1
        outcome.retries_by_cause[cause_of(exc)] += 1

    # ---- held configuration fault -----------------------------------------------------

    async def _wait_out_fault(self, me: object) -> None:
        while self.fault is not None and self._fault_owner not in (None, me):
            changed = self._fault_changed
            await changed.wait()

    def _hold_fault(self, exc: ConfigurationFault, me: object) -> None:
        if self.fault is None:
            log.error(
                "provider refuses the credentials; holding all requests",
                code=exc.code,
                error=exc.message,
                retry_every_s=self.settings.auth_retry_s,
            )
        else:
            log.warning("provider still refuses the credentials", code=exc.code)
        self.fault = exc
        self._fault_owner = me

    def _clear_fault(self) -> None:
        if self.fault is None:
            return
        log.info("provider accepts the credentials again")
        self.fault = None
        self._fault_owner = None
        self._notify_fault()

    def _notify_fault(self) -> None:
        self._fault_changed.set()
        self._fault_changed = asyncio.Event()
