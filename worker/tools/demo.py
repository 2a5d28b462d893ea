"""``embedding-worker demo``: the whole pipeline on the embedded stack, in about a minute.

Starts Tansu and PostgreSQL, migrates, produces the bundled sample events (several
languages, a few deliberately malformed), runs the worker with the local model until every
event is stored or dead-lettered, then searches and stops everything it started.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from worker.app import Worker
from worker.config import Settings, load_settings
from worker.embedding.providers import create_embedder
from worker.kafka.clients import make_producer, read_topic
from worker.ops import logs
from worker.read.recommend import by_history
from worker.read.search import Mode, search
from worker.sinks import postgres as store
from worker.sinks.migrate import migrate
from worker.tools.devstack import DevStack
from worker.tools.produce import produce_values, read_lines

QUERIES = (
    ("rocket launch to the moon", None),
    ("wie backt man Brot", None),  # German: how do you bake bread
    ("interest rates and inflation", "news"),
)


def data_file(name: str) -> Path:
    return Path(str(resources.files("worker") / "data" / name))


# A shop whose headphones differ only by product code: what dense search blurs.
SKU_QUERY = "headphones XK-4471-B"
VIEWED = ["ck-skillet", "ck-dutch-oven"]  # a shopper's history, for a recommendation


def sample_events() -> list[bytes]:
    return read_lines(data_file("sample_events.jsonl")) + read_lines(data_file("sample_shop.jsonl"))


def _say(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stdout, flush=True)


class Progress:
    """A one-line bar in a terminal; a line per quarter when the output is a file or pipe."""

    def __init__(self, total: int, width: int = 32, stream: TextIO | None = None) -> None:
        self.total, self.width = total, width
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.shown = -1
        self.tty = self.stream.isatty()

    def update(self, done: int) -> None:
        if done == self.shown:
            return
        if (
            not self.tty
            and done != self.total
            and done * 4 // self.total == self.shown * 4 // self.total
        ):
            return
        self.shown = done
        filled = self.width * done // max(1, self.total)
        rate = done / max(1e-6, time.monotonic() - self.started)
        line = f"  [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} events"
        line += f"  {rate:5.0f}/s"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


async def run_demo(verbose: bool = False) -> int:
    """Run the demo; Ctrl-C or SIGTERM still stops the broker and Postgres it started."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await _demo(verbose)
    except asyncio.CancelledError:
        print("\ninterrupted; the embedded stack is stopped", file=sys.stderr)
        return 130


async def _demo(verbose: bool) -> int:
    started = time.monotonic()
    logs.configure("info" if verbose else "error", "console")
    stack = DevStack()
    _say(f"Starting the embedded stack ({stack.broker.label} + PostgreSQL 18 with pgvector)...")
    try:
        await stack.start()
        settings = load_settings(
            kafka={
                **stack.kafka_settings(),
                "group_id": "demo",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 500,
            },
            postgres={"dsn": stack.dsn()},
            provider={"kind": "local"},
            http={"enabled": False},
            analysis={"file": str(data_file("demo_analysis.toml"))},
        )
        a = settings.analysis
        await stack.create_topics([settings.kafka.input_topic], partitions=4)
        await stack.create_topics(
            [settings.kafka.dlq_topic, a.classifications_topic, a.anomalies_topic], partitions=1
        )
        conn = await store.connect_unchecked(settings.postgres.dsn.get_secret_value())
        try:
            applied = await migrate(
                conn, settings.provider.dim, text_search_config=settings.search.text_search_config
            )
        finally:
            await conn.close()
        _say(f"  broker {stack.bootstrap}, postgres ready, migrations: {', '.join(applied)}")

        values: list[bytes | None] = list(sample_events())
        values.append(b'{"id": "bad-utf8", "text": "caf\xe9"}')  # Latin-1, not UTF-8
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            high = await produce_values(producer, settings.kafka.input_topic, values)
        finally:
            await producer.stop()
        _say(f"Produced {len(values)} events to {settings.kafka.input_topic} (4 partitions).")

        _say(f"Running the worker with the local model ({settings.provider.model_name}):")
        await run_until_caught_up(settings, high, len(values))
        await _show_results(settings)
        await _show_shop(settings)
        await _show_analysis(settings)
        letters = await _dead_letters(settings)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(letters.items()))
        _say(f"\nDead-lettered: {sum(letters.values())} events ({reasons})")
        _say(f"Done in {time.monotonic() - started:.0f} s; the embedded stack is stopped.")
        return 0
    finally:
        await stack.stop()


async def run_until_caught_up(
    settings: Settings,
    high: dict[int, int],
    total: int,
    progress: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Run a worker until Postgres stores an offset past ``high`` on every partition;
    the progress goes to ``stream`` (default stdout)."""
    worker = Worker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    bar = Progress(total, stream=stream) if progress else None
    conn = await store.connect_unchecked(settings.postgres.dsn.get_secret_value())
    try:
        while True:
            if task.done():
                await task  # raises what stopped the worker
                raise RuntimeError("the worker stopped before it caught up")
            stored = await store.load_offsets(
                conn, settings.kafka.group_id, settings.kafka.input_topic
            )
            if bar is not None:
                bar.update(sum(min(stored.get(p, 0), h + 1) for p, h in high.items()))
            if all(stored.get(p, 0) > h for p, h in high.items()):
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
        stop.set()
        await asyncio.wait_for(task, timeout=60)
        if bar is not None:
            bar.close()
    if worker.pipeline is not None and bar is not None:
        st = worker.pipeline.stats
        _say(
            f"  stored {st.stored}, {st.deleted} deletes, {st.unchanged} unchanged, "
            f"dead-lettered {sum(st.dead_lettered.values())}, "
            f"{st.batches} model batches, {st.transactions} Postgres transactions",
            stream,
        )


async def _show_results(settings: Settings) -> None:
    embedder = create_embedder(settings.provider)
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        for query, namespace in QUERIES:
            where = f" (namespace {namespace})" if namespace else ""
            _say(f'\nSearch: "{query}"{where}')
            for hit in await search(conn, embedder, query, k=3, namespace=namespace):
                text = _clip(hit.content, 80)
                lang = hit.metadata.get("lang", "?")
                _say(f"  {hit.score:.3f}  {hit.id:<16} [{lang}] {text}")
    finally:
        await conn.close()
        await embedder.close()


async def _show_shop(settings: Settings) -> None:
    """A product code that dense search ranks below look-alikes and lexical search finds
    first, the two fused (hybrid); then the items nearest a shopper's history
    (`recommend --history`)."""
    embedder = create_embedder(settings.provider)
    conn = await store.connect(settings.postgres.dsn.get_secret_value(), settings.provider.dim)
    try:
        # The local model has no sparse vectors: its lexical side is full-text search.
        for mode in (Mode.DENSE, Mode.LEXICAL, Mode.HYBRID):
            _say(f'\nSearch --mode {mode.value}: "{SKU_QUERY}" (namespace shop)')
            for hit in await search(conn, embedder, SKU_QUERY, 3, "shop", mode=mode):
                _say(f"  {hit.score:.3f}  {hit.id:<14} {_clip(hit.content, 60)}")
        model = embedder.model
        _say(f"\nRecommend --history {','.join(VIEWED)} (namespace shop)")
        for hit in await by_history(conn, VIEWED, "shop", model, 3):
            _say(f"  {hit.score:.3f}  {hit.id:<14} {_clip(hit.content, 60)}")
    finally:
        await conn.close()
        await embedder.close()


async def _show_analysis(settings: Settings) -> None:
    """Read the results topics back, as a downstream consumer would."""
    bootstrap, a = settings.kafka.bootstrap_servers, settings.analysis
    classified = [json.loads(v) for v in await read_topic(bootstrap, a.classifications_topic)]
    labels = Counter(c["label"] for c in classified)
    actions = Counter(c["action"] for c in classified)
    _say(
        f"\nClassified {len(classified)} support tickets ({a.classifications_topic}): "
        + ", ".join(f"{k} {v}" for k, v in labels.most_common())
        + "; actions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(actions.items()))
    )
    texts = await _texts(settings, [c["id"] for c in classified])
    shown = [c for c in classified if c["action"] != "allow"][:2] + classified[:3]
    for c in shown:
        score, text = c["labels"][0]["score"], _clip(texts.get(c["id"]), 58)
        _say(f"  {score:.2f} {c['label']:<9} {c['action']:<7} {text}")
    incidents: dict[str, Any] = {}  # the last message per key: closed, or still open
    for v in await read_topic(bootstrap, a.anomalies_topic):
        m = json.loads(v)
        incidents[m["key"]] = m
    alerts = sum(i["count"] for i in incidents.values())
    _say(
        f"\nAnomaly incidents in the news stream ({a.anomalies_topic}): {len(incidents)} "
        f"({alerts} alerts after the warm-up)"
    )
    texts = await _texts(settings, [i["peak"]["id"] for i in incidents.values()])
    for i in sorted(incidents.values(), key=lambda i: -i["peak"]["score"])[:3]:
        peak = i["peak"]
        _say(
            f"  {peak['score']:.3f} > {i['threshold']:.3f}  {i['count']} alert(s), "
            f"{'closed' if i['status'] == 'closed' else 'open'}  "
            f"{_clip(texts.get(peak['id']), 46)}"
        )


async def _texts(settings: Settings, ids: list[str]) -> dict[str, str]:
    conn = await store.connect_unchecked(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            "SELECT id, content FROM embeddings WHERE id = ANY($1) AND chunk = 0", ids
        )
    finally:
        await conn.close()
    return {r["id"]: r["content"] or "" for r in rows}


def _clip(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


async def _dead_letters(settings: Settings) -> Counter[str]:
    """Read the dead-letter topic back, as an operator would."""
    values = await read_topic(settings.kafka.bootstrap_servers, settings.kafka.dlq_topic)
    return Counter(json.loads(v)["reason"] for v in values)
