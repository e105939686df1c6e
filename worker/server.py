"""A small HTTP server per worker process: ``/metrics``, ``/healthz`` and ``/livez``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def serve(
    host: str,
    port: int,
    healthy: Callable[[], bool],
    alive: Callable[[], bool] = lambda: True,
    stuck: Callable[[], bool] = lambda: False,
) -> ThreadingHTTPServer:
    """Start serving on a daemon thread and return the server (``port`` 0 picks a free one).

    ``/healthz`` (readiness) is 200 while consuming and 503 while not, or while the compute
    lane is stuck on one job; ``/livez`` (liveness) while the consumer's loop turns, which
    includes waiting out a broker outage.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = healthy()
                why = b"compute lane stuck\n" if stuck() else b"not consuming\n"
                self._send(200 if ok else 503, b"consuming\n" if ok else why)
            elif self.path == "/livez":
                ok = alive()
                self._send(200 if ok else 503, b"alive\n" if ok else b"stuck\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the job logs

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
