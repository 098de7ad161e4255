"""``qsmnode send`` against a real node: many instances over several associations from one
process, without the stalls of pynetdicom's lost-response race (its issue #875)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import make_mr_instances, require_tools
from node_helpers import ECHOSCU_BIN, NodeProcess

pytestmark = pytest.mark.integration

ASSOCIATIONS = 4
PER_ASSOCIATION = 150


def busy(stop: threading.Event) -> None:
    """Pure-Python work competing for the GIL, as a node's worker thread does beside its sender:
    it widens the window of the race."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


@pytest.fixture
def busy_node(tmp_path, free_port):
    """A real node, and a thread competing for the GIL in this (the sending) process."""
    require_tools(ECHOSCU_BIN)
    node = NodeProcess(tmp_path / "node", free_port()).start()
    stop = threading.Event()
    competitor = threading.Thread(target=busy, args=(stop,), daemon=True)
    competitor.start()
    try:
        yield node
    finally:
        stop.set()
        competitor.join()
        node.stop()


def test_send_many_instances_over_several_associations_without_stalls(busy_node, tmp_path, capsys):
    """Issue 13 item 14: without the dispatcher's workaround a C-STORE response that arrives very
    fast is taken and dropped by pynetdicom's reactor thread ("Received unexpected C-STORE service
    message") and `send` waits out the DIMSE timeout. Each association here must finish its
    instances at the receiver's pace, far below that timeout."""
    from qsmnode.cli import main

    node = busy_node
    slowest = 0.0
    for k in range(ASSOCIATIONS):
        folder = tmp_path / f"in{k}"
        make_mr_instances(folder, PER_ASSOCIATION, rows=8, series_number=900 + k)
        start = time.monotonic()
        status = main(["send", f"QSMNODE@127.0.0.1:{node.port}", str(folder), "--timeout", "60"])
        slowest = max(slowest, time.monotonic() - start)
        out = capsys.readouterr().out
        assert status == 0 and f"sent {PER_ASSOCIATION} of {PER_ASSOCIATION}" in out, out
    assert slowest < 20.0, f"one association took {slowest:.1f} s: a C-STORE response was lost"
    assert len(node.spool_files(ASSOCIATIONS * PER_ASSOCIATION)) == ASSOCIATIONS * PER_ASSOCIATION


def test_the_demo_sends_through_pynetdicom_without_stalls_when_storescu_is_absent(busy_node, tmp_path):
    from qsmnode.demo import send_files

    paths = make_mr_instances(tmp_path / "in", ASSOCIATIONS * PER_ASSOCIATION, rows=8)
    start = time.monotonic()
    send_files(paths, busy_node.port, "QSMNODE", storescu=tmp_path / "no-storescu")
    assert time.monotonic() - start < 20.0, "a C-STORE response was lost"
    assert len(busy_node.spool_files(len(paths))) == len(paths)
