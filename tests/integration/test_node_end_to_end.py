"""The whole node: simulated Siemens and GE scans sent with DCMTK storescu to ``qsmnode serve`` come back
to a real Orthanc as QSM, SWI, minIP, R2*, Parametric Map and SR series in the source study, each
valid per dciodvfy, once."""

from __future__ import annotations

import io

import pydicom
import pytest

from conftest import require_tools, storescu
from node_helpers import ECHOSCU_BIN, NodeProcess, http_get

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def kind_of(ds) -> str:
    if ds.SOPClassUID == PARAMETRIC_MAP:
        return "PARAMETRIC_MAP"
    if ds.SOPClassUID == COMPREHENSIVE_3D_SR:
        return "SR"
    image_type = list(ds.get("ImageType", []))
    return image_type[2] if len(image_type) > 2 else str(ds.get("SeriesDescription", "")).split(" ")[0]


def test_siemens_and_ge_scans_come_back_to_pacs_as_qsm_outputs(tmp_path, free_port, orthanc, simulated_scan):
    require_tools(ECHOSCU_BIN)
    from tests.dciodvfy import assert_valid

    scans = {v: simulated_scan(vendor=v, matrix=(48, 48, 32)) for v in ("siemens", "ge")}
    node = NodeProcess(tmp_path / "node", free_port(), http_port=0, quiet_seconds=5.0, incomplete_cap_seconds=30.0,
                       destinations=[{"name": "pacs", "address": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"}])
    with node:
        for vendor, scan in scans.items():
            sent = storescu([scan.dicom_dir], node.port, calling=f"MR_{vendor.upper()}", env={"TCP_NODELAY": "1"})
            assert sent.returncode == 0, sent.stderr
        jobs = node.wait_for_jobs(2, timeout_s=300)
        assert all(j["state"] == "done" for j in jobs), [(j["id"], j["reason"]) for j in jobs]
        n_outputs = sum(len(j["outputs"]) for j in jobs)
        assert orthanc.wait_for_instances(n_outputs, timeout_s=120) == n_outputs

        assert http_get(node.bound_http_port(), "/healthz")[0] == 200
        metrics = node.metrics_text()
        assert 'qsmnode_stage_seconds_count{stage="job"} 2.0' in metrics

        events = {e["event"] for e in node.audit()}
        assert {"received", "completed", "started", "processed"} <= events

    for vendor, scan in scans.items():
        source = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
        series = orthanc.series_of_study(str(source.StudyInstanceUID))
        kinds = {}
        for s in series:
            first = orthanc.instances_of_series(s["SeriesInstanceUID"])[0]
            data = orthanc.download_instance(first["ID"])
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
            kinds[kind_of(ds)] = s
            path = tmp_path / f"{vendor}-{kind_of(ds)}.dcm"
            path.write_bytes(data)
            assert_valid(path)
        assert {"QSM", "SWI", "MINIP", "R2STAR", "PARAMETRIC_MAP", "SR"} <= set(kinds), (vendor, sorted(kinds))
        assert kinds["QSM"]["NumberOfInstances"] == 32
    # every output exactly once: what the jobs wrote is what Orthanc holds
    assert orthanc.instance_count() == n_outputs
