"""The whole node with the PACS down: a scan sent with DCMTK storescu while Orthanc is stopped
is reconstructed, the dispatch is retried with back-off, and once Orthanc is back every output
arrives in the source study, once."""

from __future__ import annotations

import json
import time

import pydicom
import pytest

from conftest import storescu
from node_helpers import NodeProcess, serve_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_outputs_arrive_after_the_pacs_comes_back(orthanc, simulated_scan, free_port, tmp_path):
    why = serve_unavailable()
    if why:
        pytest.skip(f"`qsmnode serve` is not available yet: {why}")
    scan = simulated_scan(vendor="siemens", field_tesla=3.0, matrix=(64, 64, 40))
    first = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    study_uid = first.StudyInstanceUID
    n_slices = 40

    orthanc.stop()  # the PACS goes down before the scan arrives
    # the quick-start flags (--aet --port --storage --destination), no configuration file
    node = NodeProcess.from_flags(tmp_path, free_port(), http_port=free_port(),
                                  destinations=[f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"])
    try:
        node.start(echo=False)  # ready: logged, and /healthz answers
        sent = storescu([scan.dicom_dir], node.port, aet="QSMNODE", calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        assert node.metric("qsmnode_instances_received_total") >= len(scan.paths)

        # the node reconstructs, then fails to reach the PACS and backs off (twice, to see it)
        node.wait_for(lambda: node.metric("qsmnode_dispatch_retries_total") >= 2, 300, "two dispatch retries")

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
