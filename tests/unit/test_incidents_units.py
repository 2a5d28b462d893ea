"""Grouping alerts into incidents, and the incident-level metrics, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.analysis import incidents
from worker.analysis.config import Anomaly
from worker.analysis.incident_quality import incident_prf, spans
from worker.analysis.results import IncidentEvent
from worker.events import SourcePosition

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def event(position: int, score: float = 0.5, seconds: float | None = None) -> IncidentEvent:
    return IncidentEvent(
        id=f"e-{position}",
        key=f"ns/e-{position}#00@m",
        position=position,
        event_time=None if seconds is None else T0 + timedelta(seconds=seconds),
        score=score,
        source=SourcePosition(topic="t", partition=0, offset=position),
    )


Scored = list[tuple[IncidentEvent, bool, float | None]]


def stream(alerts: dict[int, float], end: int, start: int = 0) -> Scored:
    """Events ``start..end-1`` (threshold 0.3); those in ``alerts`` alert with that score."""
    return [(event(p, alerts.get(p, 0.1)), p in alerts, 0.3) for p in range(start, end)]


def group(
    spec: Anomaly, current: list[incidents.Incident], events: Scored
) -> incidents.Transitions:
    return incidents.group(spec, "ns", "m", current, events)


def test_alerts_within_the_gap_are_one_incident_and_a_longer_gap_opens_another() -> None:
    spec = Anomaly(incident_gap=3)
    # 10, 13 (gap 3: joins), 17 (gap 4: new incident).
    out = group(spec, [], stream({10: 0.5, 13: 0.9, 17: 0.6}, 30))
    kinds = [(m.status, m.first.position, m.last.position, m.count) for m in out.messages]
    assert kinds == [
        ("open", 10, 10, 1),
        ("closed", 10, 13, 2),  # closed by event 17 (17 - 13 > 3), before 17 opens its own
        ("open", 17, 17, 1),
        ("closed", 17, 17, 1),  # closed by event 21, no further alert needed
    ]
    closed = out.messages[1]
    assert closed.peak.position == 13 and closed.peak.score == 0.9
    assert closed.closed_by == "events" and closed.threshold == 0.3
    assert out.messages[0].key == closed.key == "ns/incident-10@m"
    assert out.closed == [10, 17] and out.open == []


def test_an_incident_stays_open_at_exactly_the_gap_and_closes_one_event_later() -> None:
    spec = Anomaly(incident_gap=5)
    at_gap = group(spec, [], stream({0: 0.5}, 6))  # event 5 is exactly 5 after the alert
    assert [m.status for m in at_gap.messages] == ["open"]
    assert [(i.first.position, added) for i, added in at_gap.open] == [(0, 1)]
    past = group(spec, [], stream({0: 0.5}, 7))
    assert [m.status for m in past.messages] == ["open", "closed"]


def test_an_incident_closes_on_idle_event_time_even_within_the_event_gap() -> None:
    spec = Anomaly(incident_gap=100, incident_gap_seconds=60)
    events: Scored = [
        (event(0, 0.8, seconds=0), True, 0.3),
        (event(1, 0.1, seconds=30), False, 0.3),
        (event(2, 0.7, seconds=100), True, 0.3),  # 100 s after the last alert
    ]
    out = group(spec, [], events)
    assert [(m.status, m.first.position, m.closed_by) for m in out.messages] == [
        ("open", 0, None),
        ("closed", 0, "seconds"),
        ("open", 2, None),
    ]
    # Without an event time only the event gap counts.
    untimed: Scored = [(event(0), True, 0.3), (event(1), True, 0.3)]
    assert [m.status for m in group(spec, [], untimed).messages] == ["open", "update"]
    no_seconds = Anomaly(incident_gap=100, incident_gap_seconds=0)
    assert [m.status for m in group(no_seconds, [], events).messages] == ["open", "update"]


def test_a_restart_mid_incident_continues_it_without_a_second_open() -> None:
    spec = Anomaly(incident_gap=4)
    first = group(spec, [], stream({20: 0.5, 22: 0.6}, 24))
    # Opened, then grew within the batch and stays open: one update with count 2.
    assert [(m.status, m.count) for m in first.messages] == [("open", 1), ("update", 2)]
    assert first.messages[1].last.position == 22
    # What the transaction stored is what the next batch (after a restart) loads.
    stored = [incident for incident, _ in first.open]
    assert [added for _, added in first.open] == [2]
    second = group(spec, stored, stream({25: 0.9, 27: 0.4}, 40, start=24))
    assert [(m.status, m.first.position, m.last.position, m.count) for m in second.messages] == [
        ("closed", 20, 27, 4)
    ]
    assert second.messages[0].peak.position == 25
    assert second.closed == [20]


def test_a_replayed_batch_gives_the_same_transitions() -> None:
    spec = Anomaly(incident_gap=2)
    events = stream({5: 0.5, 6: 0.7, 12: 0.4}, 20)
    a, b = group(spec, [], events), group(spec, [], events)
    strip = {"analysed_at"}
    assert [m.model_dump(exclude=strip) for m in a.messages] == [
        m.model_dump(exclude=strip) for m in b.messages
    ]


def test_spans_group_flags_with_the_same_gap_rule() -> None:
    flags = [False] * 30
    for p in (3, 5, 9, 20, 21):
        flags[p] = True
    assert spans(flags, 4) == [(3, 9), (20, 21)]
    assert spans(flags, 3) == [(3, 5), (9, 9), (20, 21)]
    assert spans([False] * 5, 3) == []


def test_incident_precision_recall_and_delay() -> None:
    truth = [(10, 20), (50, 60), (90, 95)]
    predicted = [(12, 14), (30, 31), (55, 70)]
    s = incident_prf(truth, predicted)
    assert (s.found, s.incidents, s.true_incidents) == (2, 3, 3)
    assert s.precision == 2 / 3 and s.recall == 2 / 3
    assert s.delay == 3.5  # 2 lines into the first, 5 into the second
    assert incident_prf(truth, []).f1 == 0.0
