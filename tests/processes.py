"""The worker as a real subprocess, for tests that kill it or measure it from outside."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

# A one-shot command that has not exited by then is hanging (a test failure, not a wait).
CLI_TIMEOUT_S = 120


class WorkerProcess:
    """``python -m worker run`` with the given settings as environment variables."""

    def __init__(self, settings_env: dict[str, str], log_path: Path) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_WORKER_")},
            **settings_env,
            "EMBEDDING_WORKER_LOG_FORMAT": "json",
        }
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", env=self.env, stdout=log, stderr=log
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as after an OOM kill or a node failure."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self, within_s: float = 60) -> int:
        """SIGTERM and the exit code of the graceful shutdown."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), within_s)

    def rss_mb(self) -> float:
        """Resident memory of the process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def command(
    *args: str, env: dict[str, str], quiet: bool = False
) -> asyncio.subprocess.Process:
    """``python -m worker ARGS`` started with only ``env`` as its settings (no
    ``EMBEDDING_WORKER_*`` or DashScope key of the test's own environment), its output piped
    (or discarded: ``quiet``), for a test that signals it or reads it as it runs."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_WORKER_")}
    environ.pop("DASHSCOPE_API_KEY", None)
    environ.update(env)
    output = asyncio.subprocess.DEVNULL if quiet else asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=environ, stdout=output, stderr=output
    )


async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    """``python -m worker ARGS`` with only ``env`` as its settings; (exit code, out, err)."""
    proc = await command(*args, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"still running after {CLI_TIMEOUT_S} s:\n{err.decode()}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
