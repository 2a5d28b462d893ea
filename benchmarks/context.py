"""What every scenario gets: the shared stack and fake provider, sizes, and where to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import FakeProvider
from worker.tools.devstack import DevStack


@dataclass(frozen=True)
class Sizes:
    """Event and row counts; ``--smoke`` shrinks them so the whole run stays short (CI)."""

    overhead_events: int
    naive_events: int
    sink_rows: int
    profile: bool
    saturation_events: int = 12_000
    local_events: int = 1_500
    memory_events: int = 1_000_000
    memory_window_s: float = 45.0
    latency_rate: float = 2_000.0  # events/s when scenario 1 did not run
    latency_seconds: float = 20.0
    scaleout_events: int = 6_000
    smoke: bool = False

    @staticmethod
    def full() -> Sizes:
        return Sizes(overhead_events=60_000, naive_events=2_000, sink_rows=5_000, profile=True)

    @staticmethod
    def smoke_sizes() -> Sizes:
        return Sizes(
            overhead_events=1_500,
            naive_events=150,
            sink_rows=300,
            profile=False,
            saturation_events=400,
            local_events=128,
            memory_events=20_000,
            memory_window_s=3.0,
            latency_rate=300.0,
            latency_seconds=2.0,
            scaleout_events=600,
            smoke=True,
        )


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
    # Scenario 1 again, runs with tracing off and on in turn (``--tracing [RATIO]``): the
    # tracing.sample_ratio of the runs with tracing on.
    tracing: float | None = None
    # Shared between scenarios 1 and 2: one produced topic, read by several consumer groups.
    shared: dict[str, object] = field(default_factory=dict)

    @property
    def slow_runs(self) -> int:
        """Runs of the scenarios that last seconds each (3, 4, 6-9): one in smoke mode."""
        return 1 if self.sizes.smoke else self.runs
