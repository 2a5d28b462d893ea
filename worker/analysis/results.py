"""What the results topics carry: one JSON object per message, keyed for de-duplication.

Results are at least once: after a crash between producing and storing the offsets the
same event is analysed again. Its message key (namespace, id, content hash, model) is the
same both times, so a consumer keeps the first or the last message per key and is done.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from worker.analysis.config import Action
from worker.events import SourcePosition
from worker.model import NO_TIME, Change

Method = Literal["zero-shot", "few-shot", "zero-shot+few-shot"]


def result_key(change: Change, model: str) -> str:
    """Deterministic per (content version, model); stable across replays and replicas."""
    return f"{change.namespace}/{change.id}#{change.content_hash.hex()}@{model}"


def origin(change: Change, model: str) -> dict[str, Any]:
    """The fields every result repeats from its event (see ResultBase)."""
    return {
        "key": result_key(change, model),
        "namespace": change.namespace,
        "id": change.id,
        "content_hash": change.content_hash.hex(),
        "model": model,
        "source": SourcePosition(
            topic=change.topic, partition=change.partition, offset=change.offset
        ),
        "event_time": None if change.event_time == NO_TIME else change.event_time,
    }


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability (top-k of the label set's distribution)")


class ResultBase(BaseModel):
    key: str = Field(description="the message key: namespace/id#content_hash@model")
    namespace: str
    id: str
    content_hash: str = Field(description="SHA-256 (hex) of what was embedded")
    model: str
    source: SourcePosition
    event_time: datetime | None
    analysed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ClassificationResult(ResultBase):
    """Top-k labels with probabilities, and the moderation action they lead to."""

    kind: Literal["classification"] = "classification"
    label: str = Field(description="the most probable label")
    labels: list[LabelScore]
    method: Method
    out_of_scope: float = Field(
        description="how likely the event belongs to none of the labels, in [0, 1]: the "
        "share of the labeled examples, each scored while held out, that looked more in "
        "scope than it (zero-shot: 1 - the top probability)"
    )
    action: Action
    # The policy rule that chose the action, as "label>=min_score" ("unknown>=0.5" for a
    # rule on out_of_scope); None for the default.
    rule: str | None = None


class Neighbour(BaseModel):
    id: str
    similarity: float


class AnomalyResult(ResultBase):
    """An anomaly score against the namespace's own history, and whether it alerts."""

    kind: Literal["anomaly"] = "anomaly"
    anomaly: bool = Field(description="score above threshold, after the warm-up")
    score: float
    threshold: float | None = Field(description="the learned threshold; None in warm-up")
    warm_up: bool
    method: str
    novelty: float = Field(description="the distances mixed; the score without a focus")
    focus: float | None = Field(
        description="P(alert) under the namespace's focus descriptions (score = novelty x "
        "focus); None without a focus"
    )
    # The parts of the novelty: distance to the centroid of normal content, k-NN distance.
    centroid_distance: float
    neighbour_distance: float
    neighbours: list[Neighbour]
    seen: int = Field(description="events of the namespace scored before this one")


class IncidentEvent(BaseModel):
    """One alert of an incident: which event, where in the namespace and the stream."""

    id: str
    key: str = Field(description="the alert's own result key")
    position: int = Field(description="the event's position in its namespace (`seen`)")
    event_time: datetime | None
    score: float
    source: SourcePosition


class IncidentResult(BaseModel):
    """Consecutive alerts of a namespace as one incident: sent when it opens, after a batch
    in which it grew, and when it closes, all under the incident's key (keep the last)."""

    kind: Literal["incident"] = "incident"
    key: str = Field(description="namespace/incident-<first alert's position>@model")
    namespace: str
    model: str
    status: Literal["open", "update", "closed"] = Field(
        description="open: the first alert (page on it); update: grew, still open; closed"
    )
    first: IncidentEvent
    last: IncidentEvent = Field(description="the latest alert (the first, when it opens)")
    peak: IncidentEvent = Field(description="the alert with the highest score")
    count: int = Field(description="alerts in the incident so far")
    threshold: float = Field(description="the threshold the first alert crossed")
    closed_by: Literal["events", "seconds"] | None = Field(
        default=None,
        description="closed because incident_gap events or incident_gap_seconds passed",
    )
    analysed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


Result = ClassificationResult | AnomalyResult | IncidentResult
CLOUDEVENTS_CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
CLOUDEVENTS_TYPE = "io.github.embedding-worker.{kind}.v1"


def cloudevent(result: Result) -> bytes:
    """A result as a CloudEvent in structured mode (CloudEvents 1.0, JSON format; Kafka
    binding: the ``content-type`` header says so). ``id`` is the same for the same result
    sent again after a crash (the result key; an incident's key with its status and count),
    so consumers de-duplicate by (``source``, ``id``) as the spec intends."""
    event_id = result.key
    if isinstance(result, IncidentResult):
        event_id = f"{result.key}/{result.status}/{result.count}"
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"/embedding-worker/{result.namespace}",
        "type": CLOUDEVENTS_TYPE.format(kind=result.kind),
        "subject": result.key if isinstance(result, IncidentResult) else result.id,
        "time": result.analysed_at.isoformat(),
        "datacontenttype": "application/json",
        "data": json.loads(result.model_dump_json()),
    }
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
