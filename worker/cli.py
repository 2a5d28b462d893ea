"""``embedding-worker`` command line: run, migrate, search, produce, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from worker import index, logs, store
from worker.config import ConfigError, Settings, load_settings
from worker.embedders import create_embedder
from worker.embedders.base import ConfigurationFault
from worker.events import Reason
from worker.migrate import MigrationError, migrate
from worker.store import SchemaError

EXIT_NOT_FOUND = 1
EXIT_CONFIG = 2
EXIT_SCHEMA = 3
EXIT_PROVIDER = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-worker",
        description="Kafka content events -> embeddings -> Postgres/pgvector.",
    )
    parser.add_argument("--config", help="TOML settings file (env vars override it)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume, embed and store until SIGTERM")
    sub.add_parser("migrate", help="apply pending SQL migrations")
    search = sub.add_parser("search", help="semantic search over the stored vectors")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="number of results")
    search.add_argument("--namespace")
    search.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter"
    )
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    similar = sub.add_parser("similar", help="the stored rows nearest a stored row (same model)")
    similar.add_argument("id")
    similar.add_argument("--namespace", help="the row's namespace (default: default_namespace)")
    similar.add_argument("-k", type=_positive, default=5, help="number of results")
    similar.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter"
    )
    similar.add_argument("--json", action="store_true", help="one JSON object per hit")
    cluster = sub.add_parser("cluster", help="k-means over a namespace, with nearest members")
    cluster.add_argument("--namespace", help="default: default_namespace")
    cluster.add_argument("-k", type=_positive, default=8, help="number of clusters (8)")
    cluster.add_argument(
        "--sample",
        type=_positive,
        default=10_000,
        help="rows to fit on (a seeded reservoir sample)",
    )
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--members", type=int, default=3, help="rows shown per cluster (3)")
    cluster.add_argument("--json", action="store_true", help="one JSON document")
    hnsw = sub.add_parser("index", help="create, inspect or drop the HNSW index search uses")
    hnsw.add_argument("action", choices=("create", "status", "drop"))
    hnsw.add_argument("--m", type=int, default=16, help="HNSW links per node (16)")
    hnsw.add_argument(
        "--ef-construction", type=int, default=64, help="HNSW build candidate list (64)"
    )
    hnsw.add_argument(
        "--maintenance-work-mem", help="memory for the build, e.g. 2GB (faster when it fits)"
    )
    produce = sub.add_parser("produce", help="produce a JSONL file of events to the input topic")
    produce.add_argument("file", type=Path)
    letters = sub.add_parser(
        "dead-letters", help="list the dead letters, or replay the original events once fixed"
    )
    letters.add_argument(
        "--reason",
        action="append",
        default=[],
        choices=[r.value for r in Reason],
        help="only this reason (repeatable)",
    )
    letters.add_argument("--namespace", help="only this namespace")
    letters.add_argument(
        "--since", type=datetime.fromisoformat, help="only letters from this time (ISO 8601)"
    )
    letters.add_argument("--limit", type=int, default=20, help="letters listed (20, latest)")
    letters.add_argument("--json", action="store_true", help="every matching letter as JSON")
    letters.add_argument(
        "--replay",
        action="store_true",
        help="produce the matching original events to the input topic again",
    )
    evaluate = sub.add_parser(
        "evaluate",
        help="classification or anomaly quality on a labeled JSONL file (embedded stack)",
    )
    evaluate.add_argument("file", type=Path, help="JSONL with `text` and `label` per line")
    evaluate.add_argument("--task", choices=("classify", "anomaly"), default="classify")
    evaluate.add_argument(
        "--labels", type=Path, help="analysis file with the label set (descriptions, parameters)"
    )
    evaluate.add_argument("--namespace", help="which of the file's namespaces (default: first)")
    evaluate.add_argument(
        "--shots", type=int, default=0, help="labeled examples per label taken from the file"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the example draw (0)")
    evaluate.add_argument("--positive", help="also report P/R/F1 of this label (e.g. spam)")
    evaluate.add_argument("--normal", default="normal", help="the label of normal rows (anomaly)")
    evaluate.add_argument("--dedupe", action="store_true", help="drop repeated texts")
    evaluate.add_argument("--limit", type=int, help="only the first N rows")
    evaluate.add_argument("--json", action="store_true", help="the report as JSON")
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded stack")
    demo.add_argument("--keep-logs", action="store_true", help="show the worker's log lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from worker.demo import run_demo

            return asyncio.run(run_demo(verbose=args.keep_logs))
        settings = load_settings(args.config)
        if args.command == "evaluate":
            from worker.evaluate import run_cli

            logs.configure("error", settings.log_format)
            return run_cli(settings, args)
        logs.configure(settings.log_level, settings.log_format)
        return asyncio.run(_dispatch(args, settings))
    except ConfigError as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (SchemaError, MigrationError) as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_SCHEMA
    except ConfigurationFault as exc:
        print(f"embedding-worker: provider configuration fault: {exc}", file=sys.stderr)
        return EXIT_PROVIDER
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from worker.app import Worker

        await Worker(settings).run(handle_signals=True)
        return 0
    if args.command == "migrate":
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            applied = await migrate(conn, settings.provider.dim)
        finally:
            await conn.close()
        print("\n".join(f"applied {name}" for name in applied) or "up to date")
        return 0
    if args.command == "search":
        return await _search(args, settings)
    if args.command == "similar":
        return await _similar(args, settings)
    if args.command == "cluster":
        return await _cluster(args, settings)
    if args.command == "index":
        return await _index(args, settings)
    if args.command == "dead-letters":
        return await _dead_letters(args, settings)
    if args.command == "produce":
        from worker.produce import produce_file

        count = await produce_file(settings.kafka, settings.kafka.input_topic, args.file)
        print(f"produced {count} events to {settings.kafka.input_topic}")
        return 0
    raise AssertionError(args.command)


def _filters(pairs: list[str]) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--where takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


async def _search(args: argparse.Namespace, settings: Settings) -> int:
    from worker.search import search

    embedder = create_embedder(settings.provider)
    try:
        conn = await store.connect(settings.postgres.dsn.get_secret_value(), embedder.dimension)
    except BaseException:
        await embedder.aclose()
        raise
    try:
        hits = await search(
            conn, embedder, args.query, args.k, args.namespace, _filters(args.where)
        )
    finally:
        await conn.close()
        await embedder.aclose()
    for hit in hits:
        if args.json:
            print(json.dumps(hit.__dict__, ensure_ascii=False))
        else:
            print(f"{hit.score:.3f}  {hit.namespace}/{hit.id}  {_snippet(hit.content)}")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


async def _similar(args: argparse.Namespace, settings: Settings) -> int:
    from worker.search import UnknownId, similar

    namespace = args.namespace or settings.default_namespace
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        hits = await similar(conn, args.id, namespace, args.k, _filters(args.where))
    except UnknownId as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        await conn.close()
    for hit in hits:
        if args.json:
            print(json.dumps(hit.__dict__, ensure_ascii=False))
        else:
            print(f"{hit.score:.3f}  {hit.namespace}/{hit.id}  {_snippet(hit.content)}")
    return 0


async def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from worker.search import cluster

    if args.members < 0:
        raise ConfigError(f"--members must be 0 or more, got {args.members}")
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        namespace = args.namespace or settings.default_namespace
        model = settings.provider.model_name
        result = await cluster(conn, namespace, model, args.k, args.sample, args.seed, args.members)
    finally:
        await conn.close()
    if args.json:
        print(json.dumps({**asdict(result), "k": args.k, "seed": args.seed}, ensure_ascii=False))
        return 0
    print(
        f"{result.namespace} ({result.model}): {result.rows} rows, {len(result.clusters)} "
        f"clusters (k={args.k}, fitted on {result.fitted_on} rows, seed {args.seed})"
    )
    for number, c in enumerate(result.clusters, 1):
        print(f"cluster {number}: {c.size} rows, cohesion {c.cohesion:.3f}")
        for m in c.members:
            print(f"  {m.similarity:.3f}  {m.id}  {_snippet(m.content)}")
    return 0


async def _index(args: argparse.Namespace, settings: Settings) -> int:
    dimension = settings.provider.dim
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), dimension)
    try:
        if args.action == "create":
            index.check(args.m, args.ef_construction, args.maintenance_work_mem)
            print(f"building: {index.statement(dimension, args.m, args.ef_construction)}")
            built, new = await index.create(
                conn, dimension, args.m, args.ef_construction, args.maintenance_work_mem
            )
            if not new:
                print("a valid index exists already (drop it first to change its parameters)")
            print(_describe(built))
        elif args.action == "drop":
            print(f"dropped {index.NAME}" if await index.drop(conn) else "no index to drop")
        else:
            current = await index.state(conn)
            print(_describe(current) if current else f"no index {index.NAME}: search is exact")
            building = await index.progress(conn)
            if building is not None:
                print(f"a build is running: {building.phase}, {building.done}/{building.total}")
    finally:
        await conn.close()
    return 0


def _describe(built: index.Index) -> str:
    validity = (
        "valid" if built.valid else "INVALID (an interrupted build; `index create` replaces it)"
    )
    return f"{built.definition}\n{validity}, {built.size_bytes / 2**20:.1f} MiB"


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from worker.replay import Filters, replay, scan

    since = args.since
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    filters = Filters(frozenset(Reason(r) for r in args.reason), args.namespace, since)
    k = settings.kafka
    found = await scan(k, filters)
    if args.json:
        for f in found.letters:
            record = {"dlq_partition": f.partition, "dlq_offset": f.offset}
            print(json.dumps({**record, **f.letter.model_dump(mode="json")}, ensure_ascii=False))
    else:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(found.by_reason.items()))
        print(
            f"{found.topic}: {found.total} letters, {len(found.letters)} matching"
            + (f" ({reasons})" if reasons else "")
            + (f"; {found.unreadable} not dead letters of this worker" if found.unreadable else "")
        )
        for f in found.letters[-args.limit :] if args.limit > 0 else []:
            letter, source = f.letter, f.letter.source
            print(
                f"  {letter.failed_at:%Y-%m-%d %H:%M:%S}  {letter.reason.value:<18} "
                f"{source.topic}/{source.partition}/{source.offset}  "
                f"{letter.namespace or '-'}/{letter.id or '-'}  {_snippet(letter.message, 60)}"
            )
    if args.replay:
        done = await replay(k, found.letters, found.topic)
        why = ", ".join(f"{reason}: {n}" for reason, n in sorted(done.skipped.items()))
        print(
            f"replayed {done.events} events to {k.input_topic}"
            + (
                f" ({done.from_source} read again from their source offset)"
                if done.from_source
                else ""
            )
            + (f"; {done.skipped.total()} could not be ({why})" if why else ""),
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _snippet(text: str | None, width: int = 90) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
