"""Run the fake in a background thread so sync and async tests can both use it.

The server owns its own event loop: a test's loop (or a blocking sync test) never starves it, and
it behaves like the remote service it stands in for.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any, Self

from fakeapi.app import NATIVE_PATH, FakeApp, HttpServer
from fakeapi.config import FakeConfig


class FakeEmbeddingServer:
    """A running fake DashScope on ``host`` (a free port unless given); start/stop or ``with``."""

    def __init__(
        self, config: FakeConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._app = FakeApp(config)
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> Self:
        """Start serving; returns once the port is bound (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("FakeEmbeddingServer already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="fakeapi-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fake embedding server did not start in time")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fake embedding server failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection (pending timeout faults included)."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start(); a thread has nowhere else to put it
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        http = HttpServer(self._app)
        self._port = await http.start(self._host, self._port)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await http.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        return f"http://{self._host}:{self._port}"

    @property
    def native_url(self) -> str:
        """Full URL of the DashScope native embedding endpoint."""
        return self.url + NATIVE_PATH

    @property
    def openai_url(self) -> str:
        """Base URL for OpenAI-style clients (they append ``/embeddings``)."""
        return self.url + "/compatible-mode/v1"

    @property
    def config(self) -> FakeConfig:
        """The live config: a field set here applies from the next request."""
        return self._app.config

    def configure(self, **changes: Any) -> None:
        """Validated, all-or-nothing config update (same rules as ``POST /_fake/config``)."""
        self._app.config.update(changes)
        if "seed" in changes:
            self._app.reseed(self._app.config.seed)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see FakeStats.snapshot)."""
        return self._app.stats.snapshot()

    def batch_stats(self) -> dict[str, int]:
        """Batches created, lines answered and the tokens they billed (fakeapi/batches.py)."""
        return self._app.batches.snapshot()

    def multimodal_requests(self) -> list[list[tuple[str, str]]]:
        """The (kind, value) parts of each multimodal request received, oldest first."""
        return list(self._app.multimodal_requests)

    def reset_stats(self) -> None:
        self._app.stats.reset()
        self._app.batches.reset()
        self._app.multimodal_requests.clear()
