"""``embedding-worker`` command line: run, migrate, search, produce, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaConnectionError

from worker.config import ConfigError, ProviderKind, Settings, load_settings
from worker.embedding.providers import create_embedder
from worker.embedding.providers.base import ConfigurationFault
from worker.events import Reason
from worker.kafka.clients import refusal
from worker.ops import logs
from worker.read import index
from worker.sinks import postgres as store
from worker.sinks.migrate import MigrationError, migrate
from worker.sinks.postgres import SchemaError, Unreachable

if TYPE_CHECKING:
    import asyncpg

EXIT_NOT_FOUND = 1
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_SCHEMA = 3
EXIT_PROVIDER = 4
EXIT_UNREACHABLE = 5


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, unless it has none (None, off, an empty list);
    descriptions and epilogs keep their line breaks (the input formats)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


WHERE_HELP = (
    "metadata filter, repeatable (all must match); VALUE is read as JSON when it is JSON "
    '(5, 2.5, true, null, "5" a string, ["a"] an array holding "a"), else as a string '
    "(lang=en)"
)
PRODUCE_FORMAT = """\
FILE is JSON Lines: one event per line, the input topic's format, e.g.
  {"id": "a-1", "text": "Hello", "namespace": "news", "metadata": {"lang": "en"}}
  {"id": "a-1", "op": "delete"}
or, with input.format set, structured CloudEvents or Debezium change events (README, Input
formats). Blank lines are skipped. Every line is checked as the worker would, with these
settings; if a line is not a valid event (not JSON, not an object, no id, empty text, ...),
nothing is produced and the lines are listed with their dead-letter reason (exit 2), unless
--allow-invalid. Each event's content id is its record key."""
RECOMMEND_FORMAT = """\
Rows of the namespace and the configured model only, ranked as `search` ranks (cosine,
through the HNSW index if there is one). An id of --history that is not stored, or a --user
without a profile, is an error (exit 1). The math: docs/recommend.md."""
EVALUATE_FORMAT = """\
FILE (and --train's) is JSON Lines, an object with `text` and `label` per line, e.g.
  {"text": "Buy cheap watches now!", "label": "spam"}
Rows with an empty text are skipped; a line that is not such an object is an error, and
so is a --positive, --normal or --unknown-label that no row has (exit 2). Progress goes to
stderr; stdout holds only the report."""

BACKFILL_EPILOG = """\
Each chunk of records is one batch job: the worker's decoder (bad records dead-lettered),
unchanged content skipped, lines of at most 10 texts uploaded (/files), run (/batches) and
polled; a line that failed for a transient cause (a 500, the job expired) is submitted
again (--rounds), a refused one, or one still failing, goes through the real-time path
(retries, bisection, provider_rejected dead letters). Rows, offsets and the job's status are
one transaction. A job that outlives the process is resumed by the next run (its ids are kept
in batch_jobs), never submitted twice. Exit 1 when the provider refused a job as a whole (it
is submitted again by the next run). See docs/backfill.md."""


REEMBED_EPILOG = """\
A target (a second provider configuration: model, dimension, instruct, ...) is filled
beside `embeddings` from the stored content, in its own table reembed_NAME, while the worker
keeps indexing into `embeddings` and search answers from it:
  start NAME --model M --dimension D   create the target and fill it (a killed or stopped
                                       start resumes after its last stored page); then one
                                       catch-up pass over what changed meanwhile
  status [NAME]                        rows done and left, passes, an ETA
  switch NAME                          catch up, then under a lock (writers wait, search goes
                                       on) embed the last changes and make the target
                                       `embeddings` in one transaction; then run the worker
                                       with the target's provider settings
  drop NAME                            after a switch: the table before it; before one: the
                                       abandoned target's table
Requests go through the worker's retries, bisection, breaker and its own RPM/TPM limits
(--rpm/--tpm: the quota's share left by the worker); a row refused for good is
dead-lettered (provider_rejected) and left out. `start --via batch` sends each page's
documents as one job of the batch interface (resumed after a restart, never submitted
twice). Exit 1: the target is busy (another process), the switch was refused (nothing
changed) or the provider refused a batch job as a whole. See docs/reembed.md."""


def _parser() -> argparse.ArgumentParser:
    # --config before or after the command: the sub-commands' copy has no default, so that
    # it only overrides the top-level one when given.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML settings file (environment variables override it)",
    )
    parser = argparse.ArgumentParser(
        prog="embedding-worker",
        description="Kafka content events -> embeddings -> Postgres/pgvector.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file (environment variables override it)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog,
            parents=[config],
            formatter_class=_HelpFormatter,
        )
        return parser

    command("run", "consume, embed and store until SIGTERM")
    command("migrate", "apply pending SQL migrations")
    search = command(
        "search",
        "search the stored rows: dense (vectors), sparse (token weights), lexical (full text) "
        "or hybrid; a chunked document (oversize_policy = chunk) is one hit, its best chunk's "
        "text the snippet",
    )
    search.add_argument(
        "query",
        help="the text to search for (with provider.kind dashscope-multimodal, through the "
        "model's text input: text-to-image and text-to-video search over that deployment's "
        "schema)",
    )
    search.add_argument("-k", type=_positive, default=5, help="number of results")
    search.add_argument("--namespace", help="only this namespace (default: all)")
    search.add_argument(
        "--mode",
        choices=("dense", "sparse", "lexical", "hybrid"),
        default="dense",
        help="dense: cosine over the vectors; sparse: inner product of the sparse vectors "
        "(provider.output_type = dense&sparse); lexical: Postgres full-text search over the "
        "stored content (any of the words); hybrid: dense and sparse (with sparse vectors) or "
        "dense and lexical, fused by reciprocal rank",
    )
    search.add_argument(
        "--rrf-k", type=_positive, help="hybrid: fusion constant (default: search.rrf_k, 60)"
    )
    search.add_argument(
        "--candidates",
        type=_positive,
        help="hybrid: hits taken from each list (default: search.candidates, 100)",
    )
    search.add_argument(
        "--where", action="append", type=_where, default=[], metavar="KEY=VALUE", help=WHERE_HELP
    )
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    similar = command("similar", "the stored rows nearest a stored row (same model)")
    similar.add_argument("id", help="the stored row's id")
    similar.add_argument("--namespace", help="the row's namespace (default: default_namespace)")
    similar.add_argument("-k", type=_positive, default=5, help="number of results")
    similar.add_argument(
        "--where", action="append", type=_where, default=[], metavar="KEY=VALUE", help=WHERE_HELP
    )
    similar.add_argument("--json", action="store_true", help="one JSON object per hit")
    recommend = command(
        "recommend",
        "the stored rows nearest a history's mean vector or a user's profile, unseen ones",
        RECOMMEND_FORMAT,
    )
    whose = recommend.add_mutually_exclusive_group(required=True)
    whose.add_argument(
        "--history",
        type=_ids,
        metavar="ID,ID,...",
        help="stored ids: the mean of their vectors is the query; they are left out",
    )
    whose.add_argument(
        "--user",
        help="a user's profile (recommend.interactions_topic) is the query; "
        "the items they interacted with are left out",
    )
    recommend.add_argument("-k", type=_positive, default=5, help="number of results")
    recommend.add_argument(
        "--namespace", help="the ids' or user's namespace (default: default_namespace)"
    )
    recommend.add_argument(
        "--where", action="append", type=_where, default=[], metavar="KEY=VALUE", help=WHERE_HELP
    )
    recommend.add_argument("--json", action="store_true", help="one JSON object per hit")
    cluster = command("cluster", "k-means over a namespace, with nearest members")
    cluster.add_argument("--namespace", help="default: default_namespace")
    cluster.add_argument("-k", type=_positive, default=8, help="number of clusters")
    cluster.add_argument(
        "--sample",
        type=_positive,
        default=10_000,
        help="rows to fit on (a seeded reservoir sample)",
    )
    cluster.add_argument("--seed", type=int, default=0, help="seed of the sample and the fit")
    cluster.add_argument("--members", type=_non_negative, default=3, help="rows shown per cluster")
    cluster.add_argument("--json", action="store_true", help="one JSON document")
    hnsw = command(
        "index",
        "create, inspect or drop the HNSW index of dense search (or the sparse HNSW, or the "
        "lexical GIN index)",
    )
    hnsw.add_argument("action", choices=("create", "status", "drop"), help="what to do")
    which = hnsw.add_mutually_exclusive_group()
    which.add_argument(
        "--lexical",
        action="store_true",
        help="the GIN index of lexical and hybrid search instead (docs/retrieval.md): "
        "faster keyword search on a large table, at a cost on every write",
    )
    which.add_argument(
        "--sparse",
        action="store_true",
        help="the HNSW index of sparse search (inner product) instead, for rows stored with "
        "provider.output_type dense&sparse (docs/retrieval.md); takes --m, --ef-construction",
    )
    hnsw.add_argument("--m", type=int, default=16, help="HNSW links per node")
    hnsw.add_argument("--ef-construction", type=int, default=64, help="HNSW build candidate list")
    hnsw.add_argument(
        "--maintenance-work-mem",
        help="memory for the build, e.g. 2GB (faster when it fits; default: the server's)",
    )
    produce = command(
        "produce", "produce a JSONL file of events to the input topic", PRODUCE_FORMAT
    )
    produce.add_argument("file", type=Path, help="JSON Lines file of events (format below)")
    produce.add_argument(
        "--allow-invalid",
        action="store_true",
        help="send the invalid lines too (the worker dead-letters them: for testing the DLQ)",
    )
    letters = command(
        "dead-letters", "list the dead letters, or replay the original events once fixed"
    )
    letters.add_argument(
        "--reason",
        action="append",
        default=[],
        choices=[r.value for r in Reason],
        help="only this reason (repeatable; default: all)",
    )
    letters.add_argument("--namespace", help="only this namespace")
    letters.add_argument(
        "--since",
        type=datetime.fromisoformat,
        help="only letters from this time, ISO 8601 (2026-05-01T12:00, UTC unless an offset)",
    )
    letters.add_argument(
        "--limit", type=_non_negative, default=20, help="latest letters listed (0: counts only)"
    )
    letters.add_argument("--json", action="store_true", help="every matching letter as JSON")
    letters.add_argument(
        "--replay",
        action="store_true",
        help="produce the matching original events to the input topic again",
    )
    backfill = command(
        "backfill",
        "embed a topic from an offset to its current end through the provider's batch "
        "interface (about half the real-time price); rows and offsets stored exactly once",
        BACKFILL_EPILOG,
    )
    backfill.add_argument("--topic", help="the topic to read (default: kafka.input_topic)")
    backfill.add_argument(
        "--from-offset",
        type=_non_negative,
        metavar="N",
        help="start every partition at offset N (default: the log's start); a partition "
        "whose offsets the group stored before continues from them",
    )
    backfill.add_argument(
        "--group",
        help="the group its offsets are stored under in consumer_offsets "
        "(default: <kafka.group_id>.backfill)",
    )
    backfill.add_argument(
        "--chunk",
        type=_positive,
        default=20_000,
        help="records per batch job (a job's lines hold at most 10 texts each)",
    )
    backfill.add_argument(
        "--rounds",
        type=_positive,
        default=3,
        help="submissions per job: lines failed for a transient cause (a 500, the job "
        "expired) go again in a batch of their own, up to this; then in real time",
    )
    backfill.add_argument(
        "--poll-initial",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds before the first look at a job; doubled per look",
    )
    backfill.add_argument(
        "--poll-max", type=float, default=300.0, metavar="S", help="most seconds between looks"
    )
    backfill.add_argument("--json", action="store_true", help="the report as JSON")
    _reembed_parser(command, config)
    evaluate = command(
        "evaluate",
        "classification or anomaly quality on a labeled JSONL file (embedded stack)",
        EVALUATE_FORMAT,
    )
    evaluate.add_argument("file", type=Path, help="JSONL with `text` and `label` per line")
    evaluate.add_argument(
        "--task", choices=("classify", "anomaly"), default="classify", help="what to measure"
    )
    evaluate.add_argument(
        "--labels",
        type=Path,
        help="analysis file (TOML) with the label set (descriptions, parameters)",
    )
    evaluate.add_argument("--namespace", help="which of the file's namespaces (default: first)")
    evaluate.add_argument(
        "--shots",
        type=_non_negative,
        default=0,
        help="labeled examples per label drawn from the file (from --train's with --train)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the example draw")
    evaluate.add_argument(
        "--train",
        type=Path,
        metavar="FILE",
        help="labeled examples from this JSONL file (all of it, or --shots per label); "
        "every row of FILE above is then a test row",
    )
    evaluate.add_argument(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="stream the test rows in an order shuffled with this seed (default: file order)",
    )
    evaluate.add_argument(
        "--unknown-label",
        metavar="LABEL",
        help="rows with this label are out of scope (never examples, not a class): report "
        "the AUROC of out_of_scope and the precision/recall of the policy's `unknown` rules",
    )
    evaluate.add_argument(
        "--rows",
        type=Path,
        metavar="OUT",
        help="write one JSON line per test row (label, prediction, probabilities, "
        "out_of_scope, action, rule; anomalies: score, alert) to OUT",
    )
    evaluate.add_argument("--positive", help="also report P/R/F1 of this label (e.g. spam)")
    evaluate.add_argument("--normal", default="normal", help="the label of normal rows (anomaly)")
    evaluate.add_argument("--dedupe", action="store_true", help="drop repeated texts")
    evaluate.add_argument("--limit", type=_positive, help="only the first N rows (default: all)")
    evaluate.add_argument("--json", action="store_true", help="the report as JSON")
    demo = command("demo", "the whole pipeline on the embedded stack")
    demo.add_argument("--keep-logs", action="store_true", help="show the worker's log lines")
    return parser


def _reembed_parser(
    command: Callable[[str, str, str], argparse.ArgumentParser], config: argparse.ArgumentParser
) -> None:
    reembed = command(
        "reembed",
        "re-embed the stored rows with another model or dimension beside the current ones, "
        "then switch search and the worker to them",
        REEMBED_EPILOG,
    )
    actions = reembed.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, parents=[config], formatter_class=_HelpFormatter
        )
        return parser

    start = action("start", "create a target (or resume it) and fill it")
    start.add_argument("name", help="the target's name: a-z, 0-9, _ (its table: reembed_NAME)")
    start.add_argument("--kind", choices=[k.value for k in ProviderKind], help="provider.kind")
    start.add_argument("--model", help="provider.model of the target")
    start.add_argument("--dimension", type=_positive, help="provider.dimension of the target")
    start.add_argument("--base-url", help="provider.base_url of the target")
    start.add_argument("--instruct", help="provider.instruct of the target (DashScope)")
    start.add_argument(
        "--output-type", choices=("dense", "dense&sparse"), help="provider.output_type"
    )
    start.add_argument("--rpm", type=_positive, help="requests per minute the re-embed may use")
    start.add_argument("--tpm", type=_positive, help="tokens per minute the re-embed may use")
    start.add_argument("--page", type=_positive, default=500, help="rows per transaction")
    start.add_argument(
        "--via",
        choices=("realtime", "batch"),
        default="realtime",
        help="batch: each page's documents as one job of the provider's batch interface "
        "(about half the price; a page of thousands of rows pays off), failed lines in real "
        "time",
    )
    start.add_argument(
        "--poll-initial",
        type=float,
        default=5.0,
        metavar="S",
        help="--via batch: seconds before the first look at a job; doubled per look",
    )
    start.add_argument(
        "--poll-max", type=float, default=300.0, metavar="S", help="most seconds between looks"
    )
    start.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    status = action("status", "each target's state, rows left and ETA")
    status.add_argument("name", nargs="?", help="only this target")
    status.add_argument("--json", action="store_true", help="one JSON object per target")
    switch = action("switch", "catch up and make the target `embeddings` in one transaction")
    switch.add_argument("name", help="the target")
    switch.add_argument(
        "--max-locked",
        type=_non_negative,
        default=1000,
        help="most rows to embed while writers wait; more than that left: refused (exit 1)",
    )
    switch.add_argument(
        "--lock-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the running writes before taking the table",
    )
    switch.add_argument("--page", type=_positive, default=500, help="rows per transaction")
    switch.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    drop = action("drop", "drop the table before a switch, or an abandoned target's table")
    drop.add_argument("name", help="the target")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from worker.tools.demo import run_demo

            return asyncio.run(run_demo(verbose=args.keep_logs))
        settings = load_settings(args.config)
        if args.command == "evaluate":
            from worker.tools.evaluate import run_cli

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
    except Unreachable as exc:  # `run` waits instead; a one-shot command says so and stops
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KafkaConnectionError as exc:  # the same for Kafka (`produce`, `dead-letters`)
        # Unless a broker answers and refuses the credentials or the TLS handshake: then it
        # is a configuration error, which waiting would not fix.
        why = asyncio.run(refusal(settings.kafka))
        if why is not None:
            print(f"embedding-worker: {why}", file=sys.stderr)
            return EXIT_CONFIG
        print(
            "embedding-worker: kafka.bootstrap_servers (EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS):"
            f" no broker answers: {exc}",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from worker.app import Worker

        await Worker(settings).run(handle_signals=True)
        return 0
    if args.command == "migrate":
        conn = await store.connect_unchecked(settings.postgres.dsn.get_secret_value())
        try:
            applied = await migrate(
                conn, settings.provider.dim, text_search_config=settings.search.text_search_config
            )
        finally:
            await conn.close()
        print("\n".join(f"applied {name}" for name in applied) or "up to date")
        return 0
    if args.command == "search":
        return await _search(args, settings)
    if args.command == "similar":
        return await _similar(args, settings)
    if args.command == "recommend":
        return await _recommend(args, settings)
    if args.command == "cluster":
        return await _cluster(args, settings)
    if args.command == "index":
        return await _index(args, settings)
    if args.command == "dead-letters":
        return await _dead_letters(args, settings)
    if args.command == "produce":
        return await _produce(args, settings)
    if args.command == "backfill":
        return await _backfill(args, settings)
    if args.command == "reembed":
        return await _reembed(args, settings)
    raise AssertionError(args.command)


def _where(pair: str) -> tuple[str, Any]:
    """KEY=VALUE, VALUE typed as JSON when it is JSON (a number, true, null, "a string",
    an array or object), else the text itself: `lang=en` and `year=2024` both do what they
    look like; `code="2024"` is the string. Matched by jsonb containment (`metadata @>`)."""
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
    try:
        typed = json.loads(value)
        json.dumps(typed, allow_nan=False)  # NaN, Infinity, 1e400: no JSON that jsonb takes
    except ValueError:
        return key, value
    return key, typed


def _filters(pairs: list[tuple[str, Any]]) -> dict[str, Any] | None:
    return dict(pairs) if pairs else None


async def _search(args: argparse.Namespace, settings: Settings) -> int:
    from worker.read.search import Mode, has_words, search, text_config

    mode = Mode(args.mode)
    if mode is Mode.SPARSE and not settings.provider.sparse:
        raise ConfigError(
            "search --mode sparse needs provider.output_type = 'dense&sparse' (DashScope's "
            "native API); this provider stores dense vectors only: use --mode lexical or hybrid"
        )
    # Hybrid fuses dense with sparse when the provider has sparse vectors, else with lexical.
    words = mode is Mode.LEXICAL or (mode is Mode.HYBRID and not settings.provider.sparse)
    dsn = settings.postgres.dsn.get_secret_value()
    # Lexical search needs no model: it is not loaded (nor an API called).
    embedder = None if mode is Mode.LEXICAL else create_embedder(settings.provider)
    try:
        conn = await store.connect(dsn, settings.provider.dim)
    except BaseException:
        if embedder is not None:
            await embedder.close()
        raise
    try:
        # Before 0006: a clear error (exit 3), not a missing function.
        config = await text_config(conn) if words else None
        if config is not None and not await has_words(conn, args.query):
            print(
                f"embedding-worker: the query has no words to match in text search configuration "
                f"{config!r}"
                + ("; hybrid ranks by the dense list alone" if mode is Mode.HYBRID else ""),
                file=sys.stderr,
            )
        hits = await search(
            conn,
            embedder,
            args.query,
            args.k,
            args.namespace,
            _filters(args.where),
            mode,
            model=settings.provider.model_name,
            rrf_k=args.rrf_k or settings.search.rrf_k,
            candidates=args.candidates or settings.search.candidates,
        )
    finally:
        await conn.close()
        if embedder is not None:
            await embedder.close()
    _print_hits(hits, args.json)
    return 0


def _whole(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def _positive(value: str) -> int:
    return _whole(value, 1)


def _non_negative(value: str) -> int:
    return _whole(value, 0)


async def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tools.produce import check_file, produce_file

    topic = settings.kafka.input_topic
    try:
        checked = check_file(args.file, settings)
    except OSError as exc:
        print(f"embedding-worker: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    bad = checked.invalid
    if bad and not args.allow_invalid:
        print(
            f"embedding-worker: {args.file}: {len(bad)} of {len(checked.values)} lines are not "
            "valid events; nothing produced (fix them, or --allow-invalid to send them to be "
            "dead-lettered):",
            file=sys.stderr,
        )
        for b in bad[:_LISTED]:
            print(f"  line {b.line}: {b.reason}: {_snippet(b.message, 100)}", file=sys.stderr)
        if len(bad) > _LISTED:
            print(f"  ... and {len(bad) - _LISTED} more", file=sys.stderr)
        return EXIT_CONFIG
    await produce_file(settings.kafka, topic, checked)
    print(
        f"produced {len(checked.values) - len(bad)} events to {topic}"
        + (f", and {len(bad)} invalid lines (the worker dead-letters them)" if bad else "")
    )
    return 0


_LISTED = 20  # invalid lines named in produce's refusal


async def _similar(args: argparse.Namespace, settings: Settings) -> int:
    from worker.read.search import UnknownId, similar

    namespace = args.namespace or settings.default_namespace
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        hits = await similar(conn, args.id, namespace, args.k, _filters(args.where))
    except UnknownId as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        await conn.close()
    _print_hits(hits, args.json)
    return 0


def _print_hits(hits: Sequence[Any], as_json: bool) -> None:
    for hit in hits:
        if as_json:
            print(json.dumps(hit.__dict__, ensure_ascii=False))
        else:
            chunk = f" [chunk {hit.chunk}]" if hit.chunk else ""
            print(f"{hit.score:.3f}  {hit.namespace}/{hit.id}{chunk}  {_snippet(hit.content)}")


def _ids(value: str) -> list[str]:
    ids = [i.strip() for i in value.split(",") if i.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"expected ID,ID,..., got {value!r}")
    return ids


async def _recommend(args: argparse.Namespace, settings: Settings) -> int:
    from worker.read.recommend import NoDirection, by_history, by_user
    from worker.read.search import UnknownId

    namespace = args.namespace or settings.default_namespace
    model = settings.provider.model_name
    where = _filters(args.where)
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        if args.history is not None:
            hits = await by_history(conn, args.history, namespace, model, args.k, where)
        else:
            hits = await by_user(conn, args.user, namespace, model, args.k, where)
    except (UnknownId, NoDirection) as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        await conn.close()
    _print_hits(hits, args.json)
    return 0


async def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from worker.read.search import cluster

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
        if args.lexical:
            return await _lexical_index(conn, args)
        if args.sparse:
            return await _sparse_index(conn, args)
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


async def _lexical_index(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from worker.read.search import text_config

    name = index.LEXICAL_NAME
    if args.action == "create":
        await text_config(conn)  # SchemaError before migration 0006: exit 3, named
        print(f"adding the stored words: {index.ADD_LEXICAL_COLUMN}")
        print(f"building: {index.LEXICAL_STATEMENT}")
        built, new = await index.create_lexical(conn, args.maintenance_work_mem)
        if not new:
            print("a valid lexical index exists already")
        print(_describe(built))
    elif args.action == "drop":
        dropped = await index.drop_lexical(conn)
        done = f"dropped {name} and {index.LEXICAL_COLUMN}"
        print(done if dropped else "no lexical index to drop")
    else:
        current = await index.state(conn, name)
        print(_describe(current) if current else f"no index {name}: lexical search scans")
    return 0


async def _sparse_index(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    name = index.SPARSE_NAME
    if args.action == "create":
        index.check(args.m, args.ef_construction, args.maintenance_work_mem)
        # store.connect refused a table without the sparse column (migration 0008).
        print(f"building: {index.sparse_statement(args.m, args.ef_construction)}")
        built, new = await index.create_sparse(
            conn, args.m, args.ef_construction, args.maintenance_work_mem
        )
        if not new:
            print("a valid sparse index exists already (drop it first to change its parameters)")
        print(_describe(built))
    elif args.action == "drop":
        print(f"dropped {name}" if await index.drop(conn, name) else "no sparse index to drop")
    else:
        current = await index.state(conn, name)
        print(_describe(current) if current else f"no index {name}: sparse search is exact")
    return 0


def _describe(built: index.Index) -> str:
    validity = (
        "valid" if built.valid else "INVALID (an interrupted build; `index create` replaces it)"
    )
    return f"{built.definition}\n{validity}, {built.size_bytes / 2**20:.1f} MiB"


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tools.replay import Filters, replay, scan

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


async def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from worker.embedding.providers.batch import BatchFailed
    from worker.sinks.batchjobs import JobTaken
    from worker.tools.backfill import Backfill

    if settings.provider.kind in (ProviderKind.LOCAL, ProviderKind.DASHSCOPE_MULTIMODAL):
        print(
            "embedding-worker: backfill needs a provider with a batch interface "
            "(provider.kind dashscope or openai; the batch interface embeds text only)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if settings.provider.sparse:
        print(
            "embedding-worker: backfill cannot store sparse vectors (provider.output_type "
            "dense&sparse): the batch interface returns dense vectors only; run the worker "
            "from the offset instead (docs/backfill.md)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    job = Backfill(
        settings,
        topic=args.topic or settings.kafka.input_topic,
        group_id=args.group or f"{settings.kafka.group_id}.backfill",
        start_offset=args.from_offset,
        chunk_records=args.chunk,
        poll_initial_s=args.poll_initial,
        poll_max_s=args.poll_max,
        rounds=args.rounds,
    )
    try:
        report = await job.run()
    except BatchFailed as exc:
        print(f"embedding-worker: {exc} (the next run submits it again)", file=sys.stderr)
        return EXIT_FAILED
    except JobTaken as exc:
        print(
            f"embedding-worker: {exc} (two backfills of one group ran at once); nothing was "
            "stored twice: run it again to go on",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    r = report
    saved = r.batch_tokens / 2  # the batch price is about half the real-time one
    print(
        f"{r.records} records read; {r.jobs} batch jobs ({r.resumed} resumed), {r.lines} lines\n"
        f"embedded: {r.batch_texts} texts by batch ({r.batch_tokens} tokens), "
        f"{r.realtime_texts} in real time (~{r.realtime_tokens} tokens)\n"
        f"unchanged: {r.unchanged}, deletes: {r.deletes}, dead letters: {r.dead_letters}\n"
        f"at the batch price (about half): ~{saved:.0f} tokens' worth saved "
        f"({saved / max(1, r.batch_tokens + r.realtime_tokens):.0%} of the real-time cost)"
    )
    return 0


async def _reembed(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    from dataclasses import asdict

    from worker.embedding.providers.batch import BatchFailed
    from worker.sinks.reembed import retired_of
    from worker.tools import reembed

    if args.action == "status":
        found = await reembed.status(settings, args.name)
        if args.json:
            for st in found:
                counts = None if st.counts is None else asdict(st.counts)
                print(json.dumps({**asdict(st.target), "counts": counts, "eta_s": st.eta_s}))
        else:
            print("\n".join(reembed.describe(found)) or "no re-embed targets")
        return 0
    multimodal = ProviderKind.DASHSCOPE_MULTIMODAL
    if args.action == "start" and multimodal in (settings.provider.kind, args.kind):
        print(
            "embedding-worker: reembed re-embeds the stored text; a multimodal table's images "
            "are not stored (data URIs by digest only): replay the topic into a new schema "
            "instead (docs/multimodal.md)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    job = reembed.Reembed(
        settings,
        args.name,
        config_file=args.config,
        page_rows=getattr(args, "page", 500),
        progress=not getattr(args, "no_progress", True),
        stop=stop,
        via=getattr(args, "via", "realtime"),
        poll_s=(getattr(args, "poll_initial", 5.0), getattr(args, "poll_max", 300.0)),
    )
    try:
        if args.action == "start":
            options = {k: getattr(args, k) for k in reembed.OPTIONS}
            r = await job.start(options)
            done = "stopped; `reembed start` resumes it" if stop.is_set() else "filled"
            print(
                f"{args.name}: {done}: {r.rows:,} rows read, {r.embedded:,} embedded "
                f"(~{r.tokens:,} tokens), {r.copied:,} copied, {r.refused:,} refused"
            )
        elif args.action == "switch":
            final = await job.switch(args.max_locked, args.lock_timeout)
            print(
                f"{args.name} is `embeddings` now ({final.target:,} rows); the table before "
                f"is {retired_of(args.name)}: run the worker with the target's "
                f"provider settings, then `reembed drop {args.name}`"
            )
        else:
            print(f"dropped {await job.drop()}")
    except (reembed.Busy, reembed.SwitchRefused) as exc:
        print(f"embedding-worker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BatchFailed as exc:
        print(f"embedding-worker: {exc} (the next start submits it again)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _snippet(text: str | None, width: int = 90) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
