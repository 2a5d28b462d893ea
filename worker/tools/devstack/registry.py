"""A real schema registry on loopback: Apicurio Registry, built from ``devstack/registry/``.

Maven builds the registry from its jars on Maven Central the first time (about a minute; the
jars then stay in the local Maven cache) and keeps the build in ``devstack/registry/target/``
until the project's files change; later starts need no network. The registry keeps its
schemas in memory (H2), so a restart forgets them. The tests speak to it through its
Confluent-compatible API, ``url`` (``/apis/ccompat/v7``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

import aiohttp

from worker import httpclient
from worker.tools.devstack.broker import free_port, log_tail
from worker.tools.devstack.maven import maven, require

PROJECT = Path(__file__).resolve().parents[3] / "devstack" / "registry"
RUNNER = PROJECT / "target" / "schema-registry-1-runner.jar"
VERSION = "2.4.2.Final"  # devstack/registry/pom.xml's apicurio.version
BUILD_TIMEOUT_S = 900.0
START_TIMEOUT_S = 120.0


NEEDED_BY = "the schema registry of the dev stack"


def _digest() -> str:
    """Of every file the build reads: a change to one builds again."""
    h = hashlib.sha256()
    for path in sorted([PROJECT / "pom.xml", *(PROJECT / "src").rglob("*")]):
        if path.is_file():
            h.update(str(path.relative_to(PROJECT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


async def build() -> Path:
    """The registry's runnable jar; Maven builds it the first time (needs Maven Central)."""
    stamp = PROJECT / "target" / f"built-{_digest()}"
    if stamp.is_file() and RUNNER.is_file():
        return RUNNER
    require("javac", "a Java 17 JDK", NEEDED_BY)
    await maven(
        PROJECT / "pom.xml",
        "package",
        doing=f"build the schema registry ({PROJECT})",
        product=RUNNER,
        timeout_s=BUILD_TIMEOUT_S,
        needed_by=NEEDED_BY,
    )
    stamp.touch()
    return RUNNER


class ApicurioRegistry:
    """One Apicurio Registry JVM on a free loopback port."""

    label = f"Apicurio Registry {VERSION} (Confluent-compatible API)"

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path()

    @property
    def url(self) -> str:
        """The Confluent-compatible API: what the worker's ``input.registry_url`` names."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    async def start(self, tmp: Path) -> None:
        java = require("java", "Java 17 or newer", NEEDED_BY)
        runner = await build()
        self.port = free_port()
        self._launch(java, runner, tmp)
        await self._wait_ready()

    def _launch(self, java: str, runner: Path, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "schema-registry.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    java,
                    "-Xmx256m",
                    "-XX:+UseSerialGC",
                    "-Dquarkus.http.host=127.0.0.1",
                    "-jar",
                    str(runner),
                ],
                # The app's configuration reads its port from HTTP_PORT.
                env={**os.environ, "HTTP_PORT": str(self.port)},
                cwd=tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        async with httpclient.session(httpclient.timeout(2.0)) as session:
            while loop.time() < deadline:
                if self.process is None or self.process.poll() is not None:
                    break
                try:
                    async with session.get(f"{self.url}/subjects") as response:
                        if response.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.2)
        await self.stop()
        raise RuntimeError(
            f"the schema registry did not start in {START_TIMEOUT_S:.0f} s:\n"
            + log_tail(self.log_path)
        )

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
