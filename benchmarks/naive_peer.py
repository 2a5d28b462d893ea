"""Scenario 2's peer: the vendor guide's pattern turned into a consumer.

One API call per event (``encoding_format=float``, as the guide's sample), one INSERT per row
(autocommit), and a Kafka offset commit per message -- aiokafka + httpx + asyncpg, the same
libraries the worker uses, on the same stack, data and fake provider. It writes into the
same ``embeddings`` table so the harness can watch the rows arrive.

``python -m benchmarks.naive_peer --bootstrap HOST:PORT --topic T --group G --dsn DSN
--url http://127.0.0.1:PORT/v1 --limit N`` stops after N events.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from datetime import UTC, datetime

import asyncpg
import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer
from pgvector.asyncpg import register_vector

INSERT = """
INSERT INTO embeddings (namespace, id, embedding, content, content_hash, text_type, model,
    dimension, metadata, source_topic, source_partition, source_offset, event_time)
VALUES ($1, $2, $3, $4, $5, 'document', $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (namespace, id, chunk) DO UPDATE SET embedding = EXCLUDED.embedding,
    content = EXCLUDED.content, content_hash = EXCLUDED.content_hash,
    metadata = EXCLUDED.metadata, source_offset = EXCLUDED.source_offset,
    event_time = EXCLUDED.event_time, updated_at = now()
"""


async def consume(args: argparse.Namespace) -> int:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    conn = await asyncpg.connect(args.dsn)
    await register_vector(conn)
    client = httpx.AsyncClient(base_url=args.url, headers={"Authorization": "Bearer naive"})
    await consumer.start()
    done = 0
    try:
        async for msg in consumer:
            event = json.loads(msg.value)
            response = await client.post(
                "/embeddings",
                json={
                    "model": args.model,
                    "input": event["text"],
                    "dimensions": args.dimension,
                    "encoding_format": "float",
                },
            )
            response.raise_for_status()
            vector = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
            await conn.execute(
                INSERT,
                event.get("namespace", "default"),
                event["id"],
                vector,
                event["text"],
                hashlib.sha256(event["text"].encode()).digest(),
                args.model,
                args.dimension,
                json.dumps(event.get("metadata") or {}),
                msg.topic,
                msg.partition,
                msg.offset,
                datetime.fromtimestamp(msg.timestamp / 1000, tz=UTC),
            )
            await consumer.commit()
            done += 1
            if done >= args.limit:
                break
    finally:
        await consumer.stop()
        await client.aclose()
        await conn.close()
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_peer", description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--url", required=True, help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--model", default="text-embedding-v4")
    p.add_argument("--dimension", type=int, default=1024)
    args = p.parse_args(argv)
    print(json.dumps({"events": asyncio.run(consume(args))}), flush=True)


if __name__ == "__main__":
    main()
