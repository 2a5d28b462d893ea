"""A loopback OTLP/HTTP traces endpoint that accepts and discards: the worker's exporter does
its whole job (encode, POST), and the collector's cost stays out of the worker's figures."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Discard(BaseHTTPRequestHandler):
    sink: OtlpSink

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.sink.payloads += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OtlpSink:
    """``with OtlpSink() as sink:`` then ``sink.url`` (POST /v1/traces); counts payloads."""

    def __init__(self) -> None:
        self.payloads = 0
        handler = type("Handler", (_Discard,), {"sink": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def __enter__(self) -> OtlpSink:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
