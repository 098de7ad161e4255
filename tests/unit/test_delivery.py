"""Delivery state for people: ``qsmnode jobs`` and ``qsmnode retry`` on an outbox that the real
Dispatcher filled by talking to a real pynetdicom Storage SCP (which refuses some instances) and to
a port where nothing listens; the node's log while a destination is down."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt

from qsmnode.cli import main
from qsmnode.errors import ConfigError
from qsmnode.node.dispatch import Destination, Dispatcher
from qsmnode.node.index import Index
from qsmnode.node.serve import PynetdicomOnlyInDebug

REPO = Path(__file__).resolve().parents[2]


def _mr_files(outdir: Path, n: int, description: str) -> list[Path]:
    """``n`` small MR Image Storage files of one series."""
    outdir.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "MR", description, k + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
        paths.append(outdir / f"{description}{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _wait(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def pacs():
    """A real pynetdicom Storage SCP on a loopback port; answers 0xA700 for series "BROKEN" while
    ``pacs.refuse`` is set. ``pacs.stored``: SOP Instance UIDs it accepted."""

    class Pacs:
        refuse = True
        stored: set[str] = set()

    def on_store(event):
        ds = event.dataset
        if Pacs.refuse and ds.SeriesDescription == "BROKEN":
            return 0xA700
        Pacs.stored.add(ds.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    Pacs.port = server.server_address[1]
    yield Pacs
    server.shutdown()


def _done_job(index: Index, acq: int, destination: Destination, outputs: list[Path]) -> str:
    """A job that reconstruction finished, as the worker leaves it in the index."""
    job = index.create_job(acq, 1, rule="default", preset="auto",
                           destinations=[{"name": destination.name, "kind": "dimse", "ae_title": destination.ae_title,
                                          "host": destination.host, "port": destination.port}])
    assert index.claim_next_job()["id"] == job
    index.finish_job(job, "done", output_dir=str(outputs[0].parent), outputs=[str(p) for p in outputs])
    return job


def _jobs(capsys, storage: Path, *args: str) -> str:
    assert main(["jobs", "--storage", str(storage), *args]) == 0
    return capsys.readouterr().out


def test_jobs_shows_delivery_and_retry_redelivers_without_reconstructing(pacs, tmp_path, capsys):
    storage = tmp_path / "node"
    index = Index(storage / "index.sqlite")
    good = _mr_files(storage / "outputs" / "job-1-1", 3, "QSM")
    broken = _mr_files(storage / "outputs" / "job-1-1", 2, "BROKEN")
    down_files = _mr_files(storage / "outputs" / "job-2-1", 2, "QSM")
    to_pacs = Destination.parse_address(f"PACS@127.0.0.1:{pacs.port}", name="pacs")
    to_down = Destination.parse_address(f"DOWN@127.0.0.1:{_closed_port()}", name="down")
    job_a = _done_job(index, 1, to_pacs, good + broken)
    job_b = _done_job(index, 2, to_down, down_files)

    # the node's dispatcher: the PACS refuses two instances twice (given up), the other one is down
    finished = threading.Event()
    d1 = Dispatcher(index.path, "QSMNODE", base_delay_s=0.05, max_delay_s=0.2, max_refusals=2,
                    on_job_done=lambda job, state, reason: finished.set())
    d1.enqueue(job_a, to_pacs, good + broken)
    d1.enqueue(job_b, to_down, down_files)
    with d1:
        assert finished.wait(20)
        assert _wait(lambda: (d1.job_deliveries(job_b) or [None])[0].last_error is not None)
    assert d1.job_state(job_a) == "failed" and d1.job_state(job_b) == "pending"

    # `qsmnode jobs` reads the outbox offline: state, reason, and per destination sent / pending / failed
    out = _jobs(capsys, storage)
    line_a = next(line for line in out.splitlines() if line.startswith(job_a))
    assert "done" in line_a and "delivery failed" in line_a
    assert "pacs: " in line_a and "C-STORE status 0xA700 (out of resources)" in line_a and "gave up" in line_a
    assert "-> pacs" in out and "3 sent, 0 pending, 2 failed" in out
    line_b = next(line for line in out.splitlines() if line.startswith(job_b))
    assert "delivering" in line_b and "retrying: down: " in line_b and "Connection refused" in line_b
    assert "-> down" in out and "0 sent, 2 pending, 0 failed, next try" in out
    rows = {j["id"]: j for j in json.loads(_jobs(capsys, storage, "--json"))}
    assert rows[job_a]["delivery"]["state"] == "failed"
    assert rows[job_a]["delivery"]["destinations"] == [
        {"name": "pacs", "sent": 3, "pending": 0, "failed": 2, "failure": rows[job_a]["delivery"]["reason"][6:],
         "last_error": None, "next_attempt_at": None, "producing": False}]
    assert rows[job_b]["delivery"]["state"] == "delivering"
    assert rows[job_b]["delivery"]["destinations"][0]["pending"] == 2
    assert [j["id"] for j in json.loads(_jobs(capsys, storage, "--delivery", "failed", "--json"))] == [job_a]
    assert [j["id"] for j in json.loads(_jobs(capsys, storage, "--delivery", "delivering", "--json"))] == [job_b]

    # the PACS is fixed and the node restarted; `qsmnode retry` queues the two files again, the
    # running dispatcher picks them up by itself, and nothing is reconstructed
    pacs.refuse = False
    d2 = Dispatcher(index.path, "QSMNODE", base_delay_s=0.05, max_delay_s=0.2)
    d2.poll_s = 0.05
    with d2:
        assert main(["retry", "--storage", str(storage), job_a]) == 0
        assert "2 undelivered file(s) queued for delivery again" in capsys.readouterr().out
        assert _wait(lambda: d2.job_state(job_a) == "sent")
    out = _jobs(capsys, storage, "--state", "done")
    assert "delivered" in next(line for line in out.splitlines() if line.startswith(job_a))
    assert "5 sent, 0 pending, 0 failed" in out
    assert index.job(job_a)["state"] == "done" and index.job(job_a)["attempts"] == 1  # not run again
    assert len(pacs.stored) == 5

    # outputs gone: retry reconstructs the job instead; --reprocess asks for that outright
    down_files[0].unlink()
    assert main(["retry", "--storage", str(storage), job_b]) == 0
    out = capsys.readouterr().out
    assert "queued for reconstruction again" in out and "undelivered files are gone" in out
    assert index.job(job_b)["state"] == "queued"
    assert main(["retry", "--storage", str(storage), "--reprocess", job_a]) == 0
    assert "queued for reconstruction again" in capsys.readouterr().out
    assert index.job(job_a)["state"] == "queued"
    index.close()


def test_retry_of_a_waiting_delivery_makes_it_due_now(tmp_path, capsys):
    storage = tmp_path / "node"
    index = Index(storage / "index.sqlite")
    files = _mr_files(storage / "outputs" / "job-1-1", 2, "QSM")
    down = Destination.parse_address(f"DOWN@127.0.0.1:{_closed_port()}", name="down")
    job = _done_job(index, 1, down, files)
    d = Dispatcher(index.path, "QSMNODE", base_delay_s=30.0, max_delay_s=60.0)
    d.enqueue(job, down, files)
    with d:
        assert _wait(lambda: d.job_deliveries(job)[0].last_error is not None)
    (before,) = d.job_deliveries(job)
    assert before.next_attempt_at > time.time() + 10  # backing off
    assert main(["retry", "--storage", str(storage), job]) == 0
    assert "2 undelivered file(s) queued" in capsys.readouterr().out
    (after,) = d.job_deliveries(job)
    assert after.pending == 2 and after.next_attempt_at <= time.time()
    index.close()


def test_dispatcher_refuses_bad_settings_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="max_delay_s .* is below base_delay_s"):
        Dispatcher(tmp_path / "i.sqlite", "QSMNODE", base_delay_s=5, max_delay_s=1)
    with pytest.raises(ConfigError, match="associations must be between 1 and 32"):
        Dispatcher(tmp_path / "i.sqlite", "QSMNODE", associations=0)


_DOWN_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage
    from qsmnode.node.dispatch import Destination, Dispatcher
    from qsmnode.node.serve import setup_logging

    setup_logging(sys.argv[2])
    tmp = Path(sys.argv[1])
    ae = AE(ae_title="REALPACS")
    ae.require_called_aet = True
    ae.add_supported_context(MRImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    d = Dispatcher(tmp / "index.sqlite", "QSMNODE", base_delay_s=5, max_delay_s=10)
    d.enqueue("job-1-1", Destination.parse_address("PACS@127.0.0.1:" + sys.argv[3], name="down"), [tmp / "a.dcm"])
    d.enqueue("job-1-1", Destination.parse_address(f"WRONG@127.0.0.1:{server.server_address[1]}", name="picky"),
              [tmp / "a.dcm"])
    with d:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                not x.last_error for x in d.job_deliveries("job-1-1")):
            time.sleep(0.02)
    server.shutdown()
""")


@pytest.mark.parametrize("level", ["info", "debug"])
def test_log_while_a_destination_is_down_is_one_line_per_try(tmp_path, level):
    (src,) = _mr_files(tmp_path / "src", 1, "QSM")
    src.rename(tmp_path / "a.dcm")
    run = subprocess.run([sys.executable, "-c", _DOWN_SCRIPT, str(tmp_path), level, str(_closed_port())],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    down = [line for line in lines if "WARNING qsmnode.node.dispatch: dispatch to down" in line]
    assert len(down) == 1, run.stderr
    assert "failed (attempt 1, 1 file(s))" in down[0] and "[Errno 111] Connection refused" in down[0]
    assert "next try in " in down[0] and ", at " in down[0]
    (picky,) = [line for line in lines if "WARNING qsmnode.node.dispatch: dispatch to picky" in line]
    assert "rejected the association" in picky and "Called AE title not recognised" in picky
    pynetdicom_lines = [line for line in lines if " pynetdicom." in line]
    if level == "info":  # no pynetdicom ERROR lines, no tracebacks: our two warnings say it all
        assert not pynetdicom_lines and "Traceback" not in run.stderr, run.stderr
    else:
        assert any("TCP Initialisation Error" in line for line in pynetdicom_lines), run.stderr


def test_pynetdicom_filter_keeps_everything_else():
    f = PynetdicomOnlyInDebug()
    record = lambda name: logging.LogRecord(name, logging.ERROR, __file__, 1, "x", None, None)  # noqa: E731
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert f.filter(record("qsmnode.node.dispatch")) and f.filter(record("pynetdicomish"))
        assert not f.filter(record("pynetdicom.transport")) and not f.filter(record("pynetdicom"))
        root.setLevel(logging.DEBUG)
        assert f.filter(record("pynetdicom.transport"))
    finally:
        root.setLevel(level)


def test_serve_passes_the_dispatch_table_to_the_dispatcher(tmp_path):
    from qsmnode.config import config_from_dict
    from qsmnode.node.serve import Node

    cfg = config_from_dict({"node": {"storage": str(tmp_path), "port": 0}, "http": {"port": -1},
                            "dispatch": {"base_delay_s": 0.5, "max_delay_s": 30, "max_refusals": 2,
                                         "batch_size": 50, "associations": 1}})
    node = Node(cfg)  # built, not started
    try:
        d = node.dispatcher
        assert (d.base_delay_s, d.max_delay_s, d.max_refusals, d.batch_size, d.associations) == (0.5, 30.0, 2, 50, 1)
    finally:
        node.index.close()
        node.audit.close()


def test_a_job_handed_over_in_pieces_is_delivered_only_when_closed_and_all_sent(pacs, tmp_path, capsys):
    """The worker enqueues each series as it is written: sending the first piece must not make the
    job 'delivered'; only close_job (the job finished) with everything sent does, once."""
    pacs.refuse = False
    storage = tmp_path / "node"
    index = Index(storage / "index.sqlite")
    to_pacs = Destination.parse_address(f"PACS@127.0.0.1:{pacs.port}", name="pacs")
    qsm = _mr_files(storage / "outputs" / "job-1-1" / "QSM", 3, "QSM")
    swi = _mr_files(storage / "outputs" / "job-1-1" / "SWI", 2, "SWI")
    job = index.create_job(1, 1, rule="default", preset="auto",
                           destinations=[{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                                          "host": "127.0.0.1", "port": pacs.port}])
    assert index.claim_next_job()["id"] == job
    done: list[tuple] = []
    d = Dispatcher(index.path, "QSMNODE", base_delay_s=0.05, max_delay_s=0.2,
                   on_job_done=lambda *a: done.append(a))
    with d:
        d.open_job(job)
        assert d.job_state(job) == "unknown"  # nothing made yet
        d.enqueue(job, to_pacs, qsm)
        assert _wait(lambda: {p.name for p in qsm} <= _sent_names(d, job))
        time.sleep(0.3)  # the worker thread has settled the batch
        # the first piece is at the PACS, but the job is still making outputs
        assert d.job_state(job) == "pending" and not d.job_dispatched(job) and done == []
        (delivery,) = d.job_deliveries(job)
        assert delivery.sent == 3 and delivery.pending == 0 and delivery.producing
        out = _jobs(capsys, storage)
        assert "delivering" in next(line for line in out.splitlines() if line.startswith(job))
        assert "3 sent, 0 pending, 0 failed, more to come" in out
        d.enqueue(job, to_pacs, swi)
        assert _wait(lambda: d.job_deliveries(job)[0].sent == 5)
        time.sleep(0.3)
        assert d.job_state(job) == "pending" and done == []
        index.finish_job(job, "done", output_dir=str(storage / "outputs" / job))
        d.close_job(job)  # everything was sent already: the job's dispatch ends now
        assert d.job_state(job) == "sent" and d.job_dispatched(job)
        assert done == [(job, "sent", None)]
        d.close_job(job)  # said once
        assert done == [(job, "sent", None)]
        out = _jobs(capsys, storage)
        assert "delivered" in next(line for line in out.splitlines() if line.startswith(job))
        assert "5 sent, 0 pending, 0 failed" in out and "more to come" not in out

        # a re-run of the job starts over: what the earlier run enqueued is dropped, sent again
        d.open_job(job)
        assert d.job_state(job) == "unknown" and not d.job_dispatched(job)
        d.enqueue(job, to_pacs, qsm)
        d.close_job(job)  # this run failed after its first series: that series is its delivery
        assert _wait(lambda: d.job_state(job) == "sent")
        assert _wait(lambda: len(done) == 2) and done[-1] == (job, "sent", None)
        assert d.job_deliveries(job)[0].sent == 3
    assert len(pacs.stored) == 5  # the PACS keeps one copy of each SOP instance
    index.close()


def _sent_names(d: Dispatcher, job_id: str) -> set[str]:
    return {Path(p).name for (p,) in d._query("SELECT path FROM outbox WHERE job_id=? AND state='sent'", (job_id,))}


def test_a_response_that_pynetdicoms_reactor_takes_is_put_back_for_its_request():
    """pynetdicom 3.0's reactor can take a C-STORE response meant for send_c_store (a race; the
    C-STORE then waits 30 s and the association is aborted): the dispatcher puts it back."""
    import io
    import queue
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE

    from qsmnode.node.dispatch import _keep_responses

    served = []
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()),
                            _serve_request=lambda msg, cx: served.append((cx, msg)))
    _keep_responses(assoc)
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0x0000
    assoc._serve_request(rsp, 3)
    assert served == [] and assoc.dimse.msg_queue.get_nowait() == (3, rsp)
    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = 8, MRImageStorage, "1.2.3"
    req.Priority, req.DataSet = 2, io.BytesIO(b"")
    assoc._serve_request(req, 3)  # a request from the peer is served as before
    assert served == [(3, req)] and assoc.dimse.msg_queue.empty()
