"""What the dev stack needs from a broker backend (Tansu or Apache Kafka), and shared helpers."""

from __future__ import annotations

import abc
import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a broker's log, for start-up errors (the cause is nearly always there)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Broker(abc.ABC):
    """A broker on loopback, in the stack's temporary directory.

    ``client_settings`` is the one place where a backend's quirks reach the worker's settings:
    Apache Kafka needs none, so code written for it works on a real cluster as it is.
    """

    name: str = ""  # the value of EMBEDDING_WORKER_DEVSTACK_BROKER
    label: str = ""  # for people
    bootstrap: str = ""
    replication_factor: int = 1

    @abc.abstractmethod
    async def start(self, tmp: Path) -> None:
        """Start and return once a client can use the broker."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every process this backend started (idempotent)."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The broker processes (the benchmarks measure their CPU)."""

    def client_settings(self) -> dict[str, Any]:
        """The worker's ``kafka`` settings for this broker."""
        return {"bootstrap_servers": self.bootstrap}
