"""What the results topics carry: one JSON object per message, keyed for de-duplication.

Results are at least once: after a crash between producing and storing the offsets the
same event is analysed again. Its message key (namespace, id, content hash, model) is the
same both times, so a consumer keeps the first or the last message per key and is done.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from worker.analysis.config import Action
from worker.decode import NO_TIME, Change
from worker.events import SourcePosition

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
        description="how likely the event belongs to none of the labels, in [0, 1] "
        "(today 1 - the top probability)"
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
