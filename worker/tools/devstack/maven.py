"""What the Java parts of the dev stack (Apache Kafka, the schema registry) share: finding a
tool on PATH with a message that says what to install, and one Maven run with a time limit."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path


def require(tool: str, what: str, needed_by: str, hint: str = "") -> str:
    """The path of ``tool``, or a RuntimeError naming what needs it and how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{needed_by} needs {what} (`{tool}` is not on PATH); install it "
            f"(Debian/Ubuntu: apt-get install openjdk-17-jdk-headless maven){hint}"
        )
    return path


async def maven(
    pom: Path, *goals: str, doing: str, product: Path, timeout_s: float, needed_by: str
) -> None:
    """``mvn -q -B -f pom goals``: a RuntimeError saying what it could not ``doing`` (with the
    tail of Maven's output) unless it ends in time, succeeds and leaves ``product``."""
    proc = await asyncio.create_subprocess_exec(
        require("mvn", "Maven", needed_by),
        "-q",
        "-B",
        "-f",
        str(pom),
        *goals,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"Maven did not {doing} in {timeout_s:.0f} s") from None
    if proc.returncode != 0 or not await asyncio.to_thread(product.is_file):
        raise RuntimeError(f"Maven could not {doing}:\n" + output.decode(errors="replace")[-3000:])
