"""What every scenario gets: the shared stack and fake provider, sizes, and where to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import FakeProvider
from worker.devstack import DevStack


@dataclass(frozen=True)
class Sizes:
    """Event and row counts; ``--smoke`` shrinks them so the whole run stays under a minute."""

    overhead_events: int
    naive_events: int
    sink_rows: int
    profile: bool

    @staticmethod
    def full() -> Sizes:
        return Sizes(overhead_events=60_000, naive_events=2_000, sink_rows=5_000, profile=True)

    @staticmethod
    def smoke() -> Sizes:
        return Sizes(overhead_events=1_500, naive_events=150, sink_rows=300, profile=False)


@dataclass
class Context:
    stack: DevStack
    fake: FakeProvider
    sizes: Sizes
    runs: int
    out: Path
    work: Path
    # Scenario 1 again with settings-only variants (``--what-if``).
    what_if: bool = False
    # Replaces overhead.WHAT_IF: label -> settings overrides by section.
    variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # Shared between scenarios 1 and 2: one produced topic, read by several consumer groups.
    shared: dict[str, object] = field(default_factory=dict)
