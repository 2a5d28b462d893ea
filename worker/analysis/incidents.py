"""Anomaly incidents: consecutive alerts of a namespace grouped into one thing to act on.

An alert joins the namespace's open incident when it comes within ``incident_gap`` events
(and, when both carry an event time, ``incident_gap_seconds``) of the incident's last
alert; otherwise the open incident closes and the alert opens a new one. An incident also
closes as soon as a later event, alert or not, shows the gap has passed, so a close does not
wait for the next alert. The anomalies topic gets one ``open`` message when an incident
opens (the page), at most one ``update`` per batch in which it grew and stays open, and one
``closed`` message (first and last alert, count, peak) when it closes, all under the
incident's key: a consumer pages on ``open`` and keeps the last message per key, which ends
with the closed one; a replay sends the same messages under the same keys.

The open incidents live in Postgres (``anomaly_incidents``), read with the rest of the
namespace state and written in the transaction that stores the batch's offsets: a restart
mid-incident continues it, and a crash before that commit replays the same transitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from worker.analysis.config import Anomaly
from worker.analysis.results import AnomalyResult, IncidentEvent, IncidentResult
from worker.sinks.postgres import Conn

Status = Literal["open", "update", "closed"]

LOAD = """
SELECT first, last, peak, count, threshold FROM anomaly_incidents
WHERE namespace = $1 AND model = $2 ORDER BY first_position
"""

# The count is added to and `last`/`peak` keep the furthest/highest, so two replicas that
# extend the same incident add up instead of overwriting each other.
UPSERT = """
INSERT INTO anomaly_incidents AS s
    (namespace, model, first_position, first, last_position, last, peak_score, peak,
     count, threshold)
VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8::jsonb, $9, $10)
ON CONFLICT (namespace, model, first_position) DO UPDATE SET
    last = CASE WHEN EXCLUDED.last_position > s.last_position THEN EXCLUDED.last ELSE s.last END,
    last_position = greatest(s.last_position, EXCLUDED.last_position),
    peak = CASE WHEN EXCLUDED.peak_score > s.peak_score THEN EXCLUDED.peak ELSE s.peak END,
    peak_score = greatest(s.peak_score, EXCLUDED.peak_score),
    count = s.count + EXCLUDED.count,
    updated_at = now()
"""

DELETE = """
DELETE FROM anomaly_incidents WHERE namespace = $1 AND model = $2 AND first_position = $3
"""


@dataclass(frozen=True)
class Incident:
    first: IncidentEvent
    last: IncidentEvent
    peak: IncidentEvent
    count: int
    threshold: float  # the threshold the first alert crossed


@dataclass
class Transitions:
    """What a batch did to a namespace's incidents: messages to send, rows to write."""

    messages: list[IncidentResult] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # first positions of incidents closed
    # Incidents still open after the batch, with the alerts the batch added to each.
    open: list[tuple[Incident, int]] = field(default_factory=list)


def incident_key(namespace: str, model: str, first_position: int) -> str:
    return f"{namespace}/incident-{first_position}@{model}"


def event(result: AnomalyResult) -> IncidentEvent:
    return IncidentEvent(
        id=result.id,
        key=result.key,
        position=result.seen,
        event_time=result.event_time,
        score=result.score,
        source=result.source,
    )


def idle(spec: Anomaly, incident: Incident, event: IncidentEvent) -> bool:
    """Whether ``event`` comes after the gap that closes ``incident``."""
    if event.position - incident.last.position > spec.incident_gap:
        return True
    a, b = incident.last.event_time, event.event_time
    seconds = spec.incident_gap_seconds
    return seconds > 0 and a is not None and b is not None and _gap(a, b) > seconds


def _gap(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def message(
    namespace: str,
    model: str,
    incident: Incident,
    status: Status,
    closed_by: Literal["events", "seconds"] | None = None,
) -> IncidentResult:
    return IncidentResult(
        key=incident_key(namespace, model, incident.first.position),
        namespace=namespace,
        model=model,
        status=status,
        first=incident.first,
        last=incident.last,
        peak=incident.peak,
        count=incident.count,
        threshold=incident.threshold,
        closed_by=closed_by,
    )


def group(
    spec: Anomaly,
    namespace: str,
    model: str,
    current: Sequence[Incident],
    events: Sequence[tuple[IncidentEvent, bool, float | None]],
) -> Transitions:
    """Group a batch's scored events ``(event, alert, threshold)``, in stream order, into
    the namespace's incidents; ``current`` are the ones open before the batch."""
    out = Transitions()
    live: list[Incident] = list(current)
    added: dict[int, int] = {i.first.position: 0 for i in live}
    for event, alert, threshold in events:
        still: list[Incident] = []
        for incident in live:
            if idle(spec, incident, event):
                by: Literal["events", "seconds"] = (
                    "events"
                    if event.position - incident.last.position > spec.incident_gap
                    else "seconds"
                )
                out.messages.append(message(namespace, model, incident, "closed", by))
                out.closed.append(incident.first.position)
            else:
                still.append(incident)
        live = still
        if not alert:
            continue
        if live:  # the newest open incident takes the alert
            latest = live[-1]
            peak = event if event.score > latest.peak.score else latest.peak
            live[-1] = replace(latest, last=event, peak=peak, count=latest.count + 1)
            added[latest.first.position] += 1
        else:
            assert threshold is not None  # alerts happen only after the warm-up
            opened = Incident(event, event, event, 1, threshold)
            live.append(opened)
            added[event.position] = 1
            out.messages.append(message(namespace, model, opened, "open"))
    # An incident that grew in this batch and stays open: one update with its state so far.
    told = {m.first.position: m.count for m in out.messages}
    for incident in live:
        if added[incident.first.position] and told.get(incident.first.position) != incident.count:
            out.messages.append(message(namespace, model, incident, "update"))
    out.open = [(i, added[i.first.position]) for i in live]
    return out


async def load(conn: Conn, namespace: str, model: str) -> list[Incident]:
    return [
        Incident(
            IncidentEvent.model_validate_json(r["first"]),
            IncidentEvent.model_validate_json(r["last"]),
            IncidentEvent.model_validate_json(r["peak"]),
            int(r["count"]),
            float(r["threshold"]),
        )
        for r in await conn.fetch(LOAD, namespace, model)
    ]


async def apply(conn: Conn, namespace: str, model: str, transitions: Transitions) -> None:
    for position in transitions.closed:
        await conn.execute(DELETE, namespace, model, position)
    for incident, added in transitions.open:
        await conn.execute(
            UPSERT,
            namespace,
            model,
            incident.first.position,
            incident.first.model_dump_json(),
            incident.last.position,
            incident.last.model_dump_json(),
            incident.peak.score,
            incident.peak.model_dump_json(),
            added,
            incident.threshold,
        )
