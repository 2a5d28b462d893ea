"""The record-size limits of the broker the tests run on, asked of the broker itself.

Apache Kafka answers DescribeConfigs with the topic's ``max.message.bytes`` (by default the
broker's ``message.max.bytes``, 1,048,588: a record batch up to that size is accepted). Tansu
0.6 answers with the configs a topic was created with (none, for the tests' topics) and
enforces no limit at all, not even one it reports (measured: it accepted a 150 MB record, and
30 kB in a topic created with ``max.message.bytes=20000``). There the only limit is the
producer's ``max_request_size`` (aiokafka: 1 MiB), and a record "over the limit" is one over
the producer's, which only a producer configured for more can send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.kafka.clients import AIOKAFKA_MAX_REQUEST_SIZE

# What a test sends as "over the producer's limit" when the broker names none (Tansu).
UNLIMITED_BROKER_OVER_BYTES = 2 * AIOKAFKA_MAX_REQUEST_SIZE

Headers = list[tuple[str, bytes | None]]
Parts = tuple[bytes | None, bytes | None, Headers]


async def topic_max_message_bytes(bootstrap: str, topic: str) -> int | None:
    """The topic's ``max.message.bytes``, or None if the broker does not say (Tansu)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=None)
        responses = await asyncio.wait_for(admin.describe_configs([resource]), 10)
    except Exception:
        return None
    finally:
        await admin.close()
    for response in responses:
        for res in response.resources:
            for entry in res[4]:
                if entry[0] == "max.message.bytes" and entry[1]:
                    return int(entry[1])
    return None


def record_size(parts: Parts) -> int:
    """The size aiokafka checks against ``max_request_size`` (an upper bound of the batch)."""
    key, value, headers = parts
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def sized(target: int, build: Callable[[int], Parts]) -> Parts:
    """``build(n)`` with n chosen so that the record is at most ``target`` bytes, within 16."""
    n = target
    for _ in range(50):
        parts = build(n)
        size = record_size(parts)
        if target - 16 < size <= target:
            return parts
        n += target - size if size > target else max(1, (target - size) // 2)
    raise AssertionError(f"no record of {target} bytes from {build}")
