"""``python -m benchmarks.run [--smoke] [--runs N] [--only 1,3,7] [--broker kafka]``.

Starts one dev stack (the broker chosen by ``--broker`` or ``EMBEDDING_WORKER_DEVSTACK_BROKER``,
Tansu by default; Postgres/pgvector) and one fake provider subprocess, runs the scenarios in
turn on them, and writes ``results.json`` (with the broker), ``README.md`` and PNG plots to
``docs/benchmarks/`` (``--out``). ``--smoke`` uses tiny sizes (CI: the scripts never rot).
``--tracing [RATIO]`` adds scenario 1 with OpenTelemetry tracing off vs on.

Scenarios (one module each): 1 ``overhead``, 2 ``naive``, 3 ``saturation``, 4 ``local_model``,
5 ``sink``, 6 ``memory``, 7 ``latency``, 8 ``scaleout``, 9 ``replicated`` (starts its own
3-broker Apache Kafka); 1L ``slow_provider`` (scenario 1 at 100 ms). Adding one: a module
with ``async def run(ctx: Context) -> list[Figure]`` and a line in ``main_async``; the report
needs nothing else.
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
    replicated,
    report,
    saturation,
    scaleout,
    sink,
    slow_provider,
)
from benchmarks.context import Context, Sizes
from benchmarks.harness import ROOT, FakeProvider, Figure, log
from worker.tools.devstack import BROKER_ENV, BROKERS, DevStack, make_broker

Scenario = Callable[[Context], Awaitable[list[Figure]]]

ALL = ("1", "1L", "2", "3", "4", "5", "6", "7", "8", "9")


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sizes = Sizes.smoke_sizes() if args.smoke else Sizes.full()
    if args.no_profile:
        sizes = dataclasses.replace(sizes, profile=False)
    if args.events:
        sizes = dataclasses.replace(sizes, overhead_events=args.events)
    if args.latency_rate:
        sizes = dataclasses.replace(sizes, latency_rate=args.latency_rate)
    only = set(args.only.split(",")) if args.only else set(ALL)
    variants = {}
    for spec in args.variant:
        label, _, overrides = spec.partition("={")  # labels may hold "=" themselves
        variants[label] = json.loads("{" + overrides)
    work = Path(tempfile.mkdtemp(prefix="embedding-bench-"))
    figures: list[Figure] = []
    broker = make_broker(args.broker)
    log(f"broker: {broker.label}")

    def write(done: list[str]) -> dict[str, Any]:
        """The report so far: rewritten after each scenario, so a run cut short keeps what it
        measured (``not_run`` lists what it did not get to)."""
        result: dict[str, Any] = {
            "command": args.command,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": args.smoke,
            "broker": {"name": broker.name, "label": broker.label},
            "runs": args.runs,
            "elapsed_s": round(time.monotonic() - started, 1),
            "sizes": sizes.__dict__,
            "machine": report.machine(),
            "figures": [f.to_json() for f in figures],
            "worker_logs": str(work),
        }
        if out := [n for n in ALL if n not in only]:
            result["left_out"] = out
        if left := [n for n in ALL if n in only and n not in done]:
            result["not_run"] = left
        analysis = args.out / "analysis.md"
        if analysis.exists() and not args.smoke:
            result["analysis"] = analysis.read_text().strip()
        report.write(result, args.out)
        return result

    async with DevStack(broker) as stack:
        fake = await FakeProvider().start()
        try:
            ctx = Context(
                stack,
                fake,
                sizes,
                args.runs,
                args.out,
                work,
                args.what_if,
                variants,
                tracing=args.tracing,
            )
            args.out.mkdir(parents=True, exist_ok=True)
            ours: list[float] = []
            scenarios: dict[str, Scenario] = {
                "1L": slow_provider.run,
                "2": lambda c: naive.run(c, ours),
                "3": saturation.run,
                "4": local_model.run,
                "5": sink.run,
                "6": memory.run,
                "7": latency.run,
                "8": scaleout.run,
                "9": replicated.run,
            }
            done: list[str] = []
            if "1" in only:
                got = await overhead.run(ctx)
                ours = got[0].runs
                ctx.shared["overhead_median"] = got[0].median
                figures += got
                done.append("1")
                write(done)
            for number, scenario in scenarios.items():
                if number in only:
                    figures += await scenario(ctx)
                    done.append(number)
                    write(done)
        finally:
            await fake.stop()
    result = write(done)
    log(f"wrote {args.out}/results.json and README.md in {result['elapsed_s']} s")
    for f in figures:
        j = f.to_json()
        log(f"{f.scenario} | {f.name}: median {j['median']} ({j['min']}–{j['max']}) {f.unit}")
    # Counts that must be 0 in every run (events lost) fail the command, smoke sizes included:
    # they are correctness, not speed, so CI's bench-smoke checks the harness's loss counting.
    lost = [f for f in figures if f.limit == 0.0 and not f.higher_is_better and any(f.runs)]
    for f in lost:
        log(f"FAILED: {f.scenario} | {f.name}: {f.runs} (must be 0 in every run)")
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 5, smoke 2)")
    p.add_argument(
        "--only", default="", help="comma-separated scenario numbers (default: all: 1, 1L, 2-9)"
    )
    p.add_argument(
        "--broker",
        choices=BROKERS,
        default=None,
        help=f"the dev stack's broker (default: ${BROKER_ENV}, else tansu); the run of "
        "record uses kafka (one Apache Kafka node)",
    )
    p.add_argument("--events", type=int, default=0, help="events for scenario 1")
    p.add_argument(
        "--latency-rate",
        type=float,
        default=0.0,
        help="scenario 7's events/s when scenario 1 does not run (default 2,000)",
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--what-if", action="store_true", help="scenario 1 with settings variants")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help='with --what-if: LABEL={"section": {"setting": value}} (repeatable)',
    )
    p.add_argument(
        "--tracing",
        nargs="?",
        type=float,
        const=1.0,
        default=None,
        metavar="RATIO",
        help="scenario 1 again, tracing off and on in turn, on with tracing.sample_ratio RATIO "
        "(default 1: every span), exported over OTLP to a loopback endpoint that discards them",
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
