"""`make demo` (the README's first command) as a user runs it: the whole pipeline on the
embedded stack with the local model, on the broker the suite runs on."""

from __future__ import annotations

import re

import pytest

from tests.conftest import broker_kind
from tests.processes import cli
from worker.tools.devstack import BROKER_ENV


def _section(out: str, title: str) -> list[str]:
    """The hit ids listed under the line that starts with ``title``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    ids = []
    for line in lines[start + 1 :]:
        hit = re.match(r"^\s+[\d.]+\s+(\S+)\s", line)
        if hit is None:
            break
        ids.append(hit.group(1))
    return ids


@pytest.mark.devstack
async def test_demo_runs_the_whole_pipeline_and_stops_what_it_started() -> None:
    code, out, err = await cli("demo", **{BROKER_ENV: broker_kind()})
    assert code == 0, err
    assert "Traceback" not in out + err
    # Every event read; how many rows one batch stored varies with timing (an update of an
    # id in flight), not the dead letters.
    assert "327/327 events" in out and re.search(r"stored \d+, 5 deletes.*dead-lettered 11,", out)
    # The product code: dense ranks look-alikes first, lexical finds it, hybrid keeps it.
    sku = "hp-4471-b"
    dense = _section(out, "Search --mode dense")
    lexical = _section(out, "Search --mode lexical")
    hybrid = _section(out, "Search --mode hybrid")
    assert len(dense) == len(lexical) == len(hybrid) == 3, out
    assert dense[0] != sku and lexical[0] == sku and sku in hybrid, out
    recommended = _section(out, "Recommend --history")
    assert recommended[0] == "ck-knife" and not {"ck-skillet", "ck-dutch-oven"} & set(
        recommended
    ), out
    assert re.search(r"Classified \d+ support tickets", out), out
    assert "Dead-lettered: 11 events" in out
    assert out.rstrip().endswith("the embedded stack is stopped."), out
