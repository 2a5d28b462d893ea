"""``embedding-worker`` command line: run, migrate, search, produce, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from worker import logs, store
from worker.config import ConfigError, Settings, load_settings
from worker.embedders import create_embedder
from worker.embedders.base import ConfigurationFault
from worker.migrate import MigrationError, migrate
from worker.store import SchemaError

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
    produce = sub.add_parser("produce", help="produce a JSONL file of events to the input topic")
    produce.add_argument("file", type=Path)
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


def _snippet(text: str | None, width: int = 90) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
