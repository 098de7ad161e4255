"""The whole node with the PACS down: a scan sent with DCMTK storescu while Orthanc is stopped
is reconstructed, the dispatch is retried with back-off, and once Orthanc is back every output
arrives in the source study, once."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from conftest import storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVE = [sys.executable, "-c", "import sys; from qsmnode.cli import main; sys.exit(main())", "serve"]


def _serve_available() -> str | None:
    r = subprocess.run(SERVE + ["--help"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else "no output"
    return None


def _http(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(2))
    return total


class Node:
    """``qsmnode serve`` as a child process of the test."""

    def __init__(self, workdir: Path, port: int, http_port: int, destination: str):
        self.workdir, self.port, self.http_port = workdir, port, http_port
        self.storage = workdir / "storage"
        self.log = open(workdir / "serve.log", "wb")
        self.proc = subprocess.Popen(
            SERVE + ["--aet", "QSMNODE", "--port", str(port), "--storage", str(self.storage),
                     "--destination", destination, "--http-port", str(http_port)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join((self.workdir / "serve.log").read_text(errors="replace").splitlines()[-n:])

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"qsmnode serve exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                if _http(self.http_port, "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"qsmnode serve not healthy within {timeout_s} s:\n{self.log_tail()}")

    def metric(self, name: str) -> float:
        return _metric_sum(_http(self.http_port, "/metrics")[1].decode(), name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"qsmnode serve ignored SIGTERM for 30 s:\n{self.log_tail()}")
        self.log.close()
        return self.proc.returncode


def test_outputs_arrive_after_the_pacs_comes_back(orthanc, simulated_scan, free_port, tmp_path):
    why = _serve_available()
    if why:
        pytest.skip(f"`qsmnode serve` is not available yet: {why}")
    scan = simulated_scan(vendor="siemens", field_tesla=3.0, matrix=(64, 64, 40))
    first = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    study_uid = first.StudyInstanceUID
    n_slices = 40

    orthanc.stop()  # the PACS goes down before the scan arrives
    node = Node(tmp_path, free_port(), free_port(), f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    try:
        node.wait_healthy()
        sent = storescu([scan.dicom_dir], node.port, aet="QSMNODE", calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        assert node.metric("qsmnode_instances_received_total") >= len(scan.paths)

        # the node reconstructs, then fails to reach the PACS and backs off (twice, to see it)
        deadline = time.monotonic() + 300
        while node.metric("qsmnode_dispatch_retries_total") < 2:
            assert time.monotonic() < deadline, f"no dispatch retries within 300 s:\n{node.log_tail()}"
            assert node.proc.poll() is None, node.log_tail()
            time.sleep(0.5)

        orthanc.start()  # the PACS is back, on the same port and storage
        deadline = time.monotonic() + 120
        qsm = []
        while not qsm or qsm[0]["NumberOfInstances"] < n_slices:
            assert time.monotonic() < deadline, (
                f"QSM series not in Orthanc within 120 s of its return; study {study_uid} has "
                f"{[(s.get('SeriesDescription'), s['NumberOfInstances']) for s in orthanc.series_of_study(study_uid)]}"
                f", Orthanc holds {orthanc.instance_count()} instances:\n{node.log_tail()}")
            time.sleep(0.5)
            qsm = [s for s in orthanc.series_of_study(study_uid)
                   if s.get("SeriesDescription", "").split()[:1] == ["QSM"]]
        # wait for the node to have nothing left in its outbox, then check what arrived
        deadline = time.monotonic() + 60
        while node.metric("qsmnode_outbox_pending") > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert node.metric("qsmnode_outbox_pending") == 0
        series = orthanc.series_of_study(study_uid)
        kinds = {s.get("SeriesDescription", "").split()[0].upper() for s in series if s.get("SeriesDescription")}
        assert {"QSM", "SWI", "MINIP", "R2STAR"} <= kinds, series
        assert any(s.get("Modality") == "SR" for s in series), series
        assert len(qsm) == 1 and qsm[0]["NumberOfInstances"] == n_slices
        dispatched = node.metric("qsmnode_dispatched_instances_total")
        assert orthanc.instance_count() == dispatched  # everything sent arrived, nothing twice

        # every hop is in the audit log, with no patient identifier in clear
        audit = (node.storage / "audit.log").read_text()
        events = [json.loads(x)["event"] for x in audit.splitlines()]
        assert "dispatch_retry" in events and "sent" in events
        assert str(first.PatientID) not in audit and str(first.PatientName) not in audit
    finally:
        rc = node.stop()
    assert rc == 0, f"qsmnode serve exited with {rc} on SIGTERM:\n{node.log_tail()}"
