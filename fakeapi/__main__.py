"""``python -m fakeapi``: serve the fake in the foreground, for benchmarks that want a subprocess.

Prints the base URL on the first line of stdout once the port is bound, then serves until
SIGINT/SIGTERM. Everything else is reachable at run time through ``POST /_fake/config``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from fakeapi.app import FakeApp, HttpServer
from fakeapi.config import FakeConfig


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fakeapi", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--key", default="test-key", help="expected API key")
    p.add_argument("--no-auth", action="store_true", help="accept any or no API key")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--latency-jitter-ms", type=float, default=0.0)
    p.add_argument("--max-texts", type=int, default=10)
    p.add_argument("--rpm", type=int, default=None)
    p.add_argument("--tpm", type=int, default=None)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    for rate in ("429", "500", "timeout", "reset"):
        p.add_argument(f"--rate-{rate}", type=float, default=0.0)
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    config = FakeConfig(
        api_key=None if args.no_auth else args.key,
        max_texts=args.max_texts,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        shuffle=args.shuffle,
        seed=args.seed,
        rpm=args.rpm,
        tpm=args.tpm,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_timeout=args.rate_timeout,
        rate_reset=args.rate_reset,
    )
    config.validate()
    http = HttpServer(FakeApp(config))
    port = await http.start(args.host, args.port)
    print(f"http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await http.close()


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
