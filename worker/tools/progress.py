"""A progress bar with a rate and an ETA on stderr, for long commands (``reembed``).

A terminal gets one line redrawn in place at most every ``every_s``; anything else (a log
file, a pipe) gets a plain line at most every ``quiet_s``. Small enough not to need a
dependency.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


def eta(done: int, total: int, seconds: float) -> float | None:
    """Seconds left at the rate so far; None before any rate is known."""
    if done <= 0 or seconds <= 0:
        return None
    return max(0, total - done) * seconds / done


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def line(label: str, done: int, total: int, seconds: float, base: int = 0) -> str:
    """``label [######......]  45%  4,500/10,000  120/s  ETA 0:45``; the rate and the ETA
    count what was done in ``seconds``, not the ``base`` done before (a resumed run)."""
    share = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(share * WIDTH)
    rate = (done - base) / seconds if seconds > 0 else 0.0
    left = eta(done - base, total - base, seconds)
    return (
        f"{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%}  {done:,}/{total:,}  "
        f"{rate:,.0f}/s  ETA {clock(left)}"
    )


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        out: TextIO | None = None,
        every_s: float = 0.2,
        quiet_s: float = 10.0,
        base: int = 0,
    ) -> None:
        """``base``: done already when this run began (shown, not counted in the rate)."""
        self.label = label
        self.total = total
        self.done = self.base = base
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.every_s = every_s if self.tty else quiet_s
        self.began = time.monotonic()
        self._shown = 0.0

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self._shown >= self.every_s:
            self._shown = now
            self._show()

    def close(self) -> None:
        self._show()
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def _show(self) -> None:
        seconds = time.monotonic() - self.began
        text = line(self.label, self.done, self.total, seconds, self.base)
        self.out.write(f"\r{text}" if self.tty else f"{text}\n")
        self.out.flush()
