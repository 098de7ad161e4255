"""HttpServer: /healthz 200/503 with JSON, /metrics in Prometheus text, 404 otherwise, loopback only."""

import json
import urllib.error
import urllib.request

from qsmnode.node.http import HttpServer
from qsmnode.node.metrics import NodeMetrics


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


def test_healthz_and_metrics():
    metrics = NodeMetrics()
    metrics.instances_received.labels(outcome="stored").inc(12)
    state = {"healthy": True, "queue_depth": 3}
    srv = HttpServer("127.0.0.1", 0, metrics, lambda: dict(state))
    srv.start()
    try:
        assert srv.port > 0
        assert srv._server.server_address[0] == "127.0.0.1"
        code, ctype, body = _get(srv.port, "/healthz")
        assert code == 200 and ctype == "application/json"
        assert json.loads(body) == {"healthy": True, "queue_depth": 3}
        state["healthy"] = False
        state["reason"] = "spool disk full"
        code, _, body = _get(srv.port, "/healthz")
        assert code == 503 and json.loads(body)["reason"] == "spool disk full"
        code, ctype, body = _get(srv.port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        assert b'qsmnode_instances_received_total{outcome="stored"} 12.0' in body
        code, _, body = _get(srv.port, "/nope")
        assert code == 404 and b"/healthz" in body
    finally:
        srv.stop()


def test_health_probe_that_raises_is_unhealthy_with_the_reason():
    def broken():
        raise RuntimeError("index database is locked")

    with HttpServer("127.0.0.1", 0, NodeMetrics(), broken) as srv:
        code, _, body = _get(srv.port, "/healthz")
    assert code == 503
    body = json.loads(body)
    assert body["healthy"] is False and "index database is locked" in body["error"]


def test_stop_releases_the_port():
    srv = HttpServer("127.0.0.1", 0, NodeMetrics(), lambda: {"healthy": True})
    srv.start()
    port = srv.port
    srv.stop()
    again = HttpServer("127.0.0.1", port, NodeMetrics(), lambda: {"healthy": True})
    again.start()  # would raise OSError if the first still held it
    assert again.port == port
    again.stop()
