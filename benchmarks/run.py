"""``python -m benchmarks.run [--smoke] [--runs N] [--only 1,3,7]``: every scenario, one run.

Starts one embedded stack (Tansu + Postgres/pgvector) and one fake provider subprocess, runs
the scenarios in turn on them, and writes ``results.json``, ``README.md`` and PNG plots to
``docs/benchmarks/`` (``--out``). ``--smoke`` uses tiny sizes (CI: the scripts never rot).

Scenarios (one module each): 1 ``overhead``, 2 ``naive``, 3 ``saturation``, 4 ``local_model``,
5 ``sink``, 6 ``memory``, 7 ``latency``; 1L ``slow_provider`` (scenario 1 at 100 ms).
Adding one: a module with ``async def run(ctx: Context) -> list[Figure]`` and a line in
``main_async``; the report needs nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    latency,
    local_model,
    memory,
    naive,
    overhead,
    report,
    saturation,
    sink,
    slow_provider,
)
from benchmarks.context import Context, Sizes
from benchmarks.harness import ROOT, FakeProvider, Figure, log
from worker.devstack import DevStack

Scenario = Callable[[Context], Awaitable[list[Figure]]]

ALL = ("1", "1L", "2", "3", "4", "5", "6", "7")


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sizes = Sizes.smoke_sizes() if args.smoke else Sizes.full()
    if args.no_profile:
        sizes = dataclasses.replace(sizes, profile=False)
    if args.events:
        sizes = dataclasses.replace(sizes, overhead_events=args.events)
    only = set(args.only.split(",")) if args.only else set(ALL)
    variants = {}
    for spec in args.variant:
        label, _, overrides = spec.partition("={")  # labels may hold "=" themselves
        variants[label] = json.loads("{" + overrides)
    work = Path(tempfile.mkdtemp(prefix="embedding-bench-"))
    figures: list[Figure] = []
    async with DevStack("tansu") as stack:  # the published figures are on Tansu
        fake = await FakeProvider().start()
        try:
            ctx = Context(stack, fake, sizes, args.runs, args.out, work, args.what_if, variants)
            args.out.mkdir(parents=True, exist_ok=True)
            ours: list[float] = []
            if "1" in only:
                got = await overhead.run(ctx)
                ours = got[0].runs
                ctx.shared["overhead_median"] = got[0].median
                figures += got
            if "1L" in only:
                figures += await slow_provider.run(ctx)
            if "2" in only:
                figures += await naive.run(ctx, ours)
            if "3" in only:
                figures += await saturation.run(ctx)
            if "4" in only:
                figures += await local_model.run(ctx)
            if "5" in only:
                figures += await sink.run(ctx)
            if "6" in only:
                figures += await memory.run(ctx)
            if "7" in only:
                figures += await latency.run(ctx)
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
    p.add_argument("--smoke", action="store_true", help="tiny sizes (~80 s), for CI")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 5, smoke 2)")
    p.add_argument(
        "--only", default="", help="comma-separated scenario numbers (default: all: 1, 1L, 2-7)"
    )
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
        args.runs = 2 if args.smoke else 5
    if args.out is None:
        args.out = ROOT / "docs" / "benchmarks" / ("smoke" if args.smoke else "")
    args.out = args.out.resolve()
    args.command = "python -m benchmarks.run " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
