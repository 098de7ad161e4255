"""The node's HTTP endpoint for operations: ``GET /healthz`` (JSON) and ``GET /metrics`` (Prometheus).

Standard library only (``http.server``), one daemon thread per request. Bound to 127.0.0.1 by
default: exposing it elsewhere is an explicit choice of the admin (``bind``).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from qsmnode.node.metrics import CONTENT_TYPE, NodeMetrics

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpServer:
    """Serve ``/healthz`` and ``/metrics`` on ``bind:port`` (``port=0``: any free port, see :attr:`port`).

    ``health()`` returns a dict; the response is 200 when ``health()["healthy"]`` is true (or
    ``status`` is ``"ok"``), else 503. A ``health()`` that raises gives 503 with the error.
    """

    def __init__(self, bind: str = "127.0.0.1", port: int = 0, metrics: NodeMetrics | None = None,
                 health: Callable[[], dict] | None = None) -> None:
        self.bind = bind
        self._requested_port = int(port)
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.health = health if health is not None else (lambda: {"healthy": True})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (the requested one until :meth:`start`)."""
        return self._server.server_address[1] if self._server else self._requested_port

    def _health_response(self) -> tuple[int, dict[str, Any]]:
        try:
            body = dict(self.health())
        except Exception as err:  # a broken probe is itself unhealthy; say why
            log.exception("health check raised")
            return 503, {"healthy": False, "error": f"health check raised {type(err).__name__}: {err}"}
        healthy = bool(body.get("healthy", str(body.get("status", "")).lower() == "ok"))
        body.setdefault("healthy", healthy)
        return (200 if healthy else 503), body

    def _make_handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "qsmnode"

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if path == "/healthz":
                    code, body = outer._health_response()
                    self._send(code, (json.dumps(body, default=str) + "\n").encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE)
                else:
                    msg = {"error": f"no such endpoint {path!r}; use /healthz or /metrics"}
                    self._send(404, (json.dumps(msg) + "\n").encode(), "application/json")

            do_HEAD = do_GET

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http %s - %s", self.address_string(), fmt % args)

        return Handler

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises ``OSError`` when the port is taken."""
        if self._server is not None:
            return
        self._server = _Server((self.bind, self._requested_port), self._make_handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="qsmnode-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port (returns within about a quarter of a second)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HttpServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
