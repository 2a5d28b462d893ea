"""Incident-level quality for ``evaluate --task anomaly``: what an operator is paged for.

Ground truth and alerts are grouped the same way as the worker groups alerts: flagged
positions whose distance to the previous flagged one is at most ``gap`` form one span. A
predicted incident is right when its span overlaps a true one; a true incident is found
when a predicted span overlaps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Span = tuple[int, int]  # first and last position, inclusive


def spans(flags: Sequence[bool], gap: int) -> list[Span]:
    """Runs of flagged positions with at most ``gap`` between consecutive ones."""
    out: list[Span] = []
    for position, flagged in enumerate(flags):
        if not flagged:
            continue
        if out and position - out[-1][1] <= gap:
            out[-1] = (out[-1][0], position)
        else:
            out.append((position, position))
    return out


def _overlaps(a: Span, b: Span) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


@dataclass(frozen=True)
class IncidentPRF:
    incidents: int  # predicted
    true_incidents: int
    found: int  # true incidents overlapped by a prediction
    precision: float
    recall: float
    f1: float
    delay: float | None  # median lines from a found incident's first line to its first alert

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "incidents": self.incidents,
            "true_incidents": self.true_incidents,
            "found": self.found,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "median_delay_lines": self.delay,
        }


def incident_prf(truth: Sequence[Span], predicted: Sequence[Span]) -> IncidentPRF:
    right = sum(any(_overlaps(p, t) for t in truth) for p in predicted)
    delays = []
    for t in truth:
        starts = [max(p[0], t[0]) for p in predicted if _overlaps(p, t)]
        if starts:
            delays.append(min(starts) - t[0])
    precision = right / len(predicted) if predicted else 0.0
    recall = len(delays) / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    delay = float(np.median(delays)) if delays else None
    return IncidentPRF(len(predicted), len(truth), len(delays), precision, recall, f1, delay)
