"""The receiver of a real ``qsmnode serve`` against DCMTK storescu/echoscu: durable, exact, stored once,
refusals with a specific status and a log line while the node keeps serving others."""

from __future__ import annotations

import subprocess
import threading

import numpy as np
import pydicom
import pytest
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)

from conftest import make_mr_instances, require_tools, storescu
from node_helpers import ECHOSCU_BIN, QSMNODE, NodeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path, free_port):
    require_tools(ECHOSCU_BIN, "/usr/bin/storescu")
    made = []

    def make(**kw):
        n = NodeProcess(tmp_path / f"node{len(made)}", free_port(), **kw).start()
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


def sop_uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def spool_files(node, count: int = 0) -> dict[str, bytes]:
    return {uid: f.read_bytes() for uid, f in node.spool_files(count).items()}


def test_instances_are_stored_exactly_once_and_indexed(node, tmp_path):
    n = node(http_port=0)
    paths = make_mr_instances(tmp_path / "in", 30, rows=32)
    first = storescu(paths, n.port)
    assert first.returncode == 0, first.stderr
    again = storescu(paths[:10], n.port)  # a sender that repeats itself
    assert again.returncode == 0, again.stderr
    stored = spool_files(n, 30)
    assert len(stored) == 30
    for p in paths:  # bytes as sent: file meta + data set
        original = pydicom.dcmread(p)
        kept = pydicom.dcmread(n.storage / "spool" / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm")
        assert kept.PixelData == original.PixelData and kept.SOPInstanceUID == original.SOPInstanceUID
    index = n.index()
    assert len(index.instance_paths()) == 30
    index.close()
    events = [e for e in n.audit() if e["event"] == "received"]
    assert sum(e["stored"] for e in events) == 30 and sum(e["duplicate"] for e in events) == 10
    assert "TEST^DISPATCH" not in (n.storage / "audit.log").read_text()  # no patient name in clear
    metrics = n.metrics_text()
    assert 'qsmnode_instances_received_total{outcome="stored"} 30.0' in metrics
    assert 'qsmnode_instances_received_total{outcome="duplicate"} 10.0' in metrics


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                                    JPEGLSLossless, JPEG2000Lossless])
def test_lossless_transfer_syntaxes_are_accepted_as_sent(node, tmp_path, syntax):
    n = node()
    (src,) = make_mr_instances(tmp_path / "in", 1, rows=32)
    ds = pydicom.dcmread(src)
    if syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.PixelRepresentation = 0
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (np.arange(32 * 32, dtype=np.uint16) % 4000).reshape(32, 32).tobytes()
        try:
            ds.compress(syntax)
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"no encoder for {syntax.name} here ({err})")
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    option = {ImplicitVRLittleEndian: "-xi", DeflatedExplicitVRLittleEndian: "-xd", RLELossless: "-xr",
              JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv"}[syntax]
    proc = storescu([path], n.port, extra_args=[option])
    assert proc.returncode == 0, proc.stderr
    (kept,) = n.spool_files(1).values()
    got = pydicom.dcmread(kept)
    assert got.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(got.pixel_array, pydicom.dcmread(path).pixel_array)


def test_refusals_have_specific_statuses_and_the_node_keeps_serving(node, tmp_path):
    n = node(allowed_calling_aets=["SCANNER"])
    good = make_mr_instances(tmp_path / "good", 3, rows=16)
    # corrupt: pixel data shorter than Rows x Columns says
    ds = pydicom.dcmread(make_mr_instances(tmp_path / "bad", 1, rows=16)[0])
    ds.PixelData = ds.PixelData[:100]
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)
    # not MR: a CT image
    ct = pydicom.dcmread(make_mr_instances(tmp_path / "ct", 1, rows=16)[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.Modality = "CT"
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)

    proc = storescu([good[0], corrupt, ct_path, good[1]], n.port, extra_args=["-v", "--no-halt"])
    out = proc.stdout + proc.stderr

    assert "datasetdoesnotmatchsopclass" in out.lower() and "sopclassnotsupported" in out.lower(), out
    assert set(spool_files(n, 2)) == {sop_uid(good[0]), sop_uid(good[1])}  # the others still went in
    log = n.log()
    assert "status 0xA900" in log and "truncated pixel data: 100 bytes" in log
    assert "status 0x0122" in log and "not an MR image" in log

    # an unknown calling AE title: association rejected, logged, audited
    rejected = storescu([good[2]], n.port, calling="INTRUDER")
    assert rejected.returncode != 0
    assert "calling AE title 'INTRUDER' is not in allowed_calling_aets" in n.log()
    assert any(e["event"] == "rejected" and e.get("what") == "association" for e in n.audit())
    # ... and the node still serves the known scanner
    assert n.echo().returncode == 0
    assert storescu([good[2]], n.port).returncode == 0
    assert len(spool_files(n, 3)) == 3
    reasons = [e["reason"] for e in n.audit() if e["event"] == "rejected"]
    assert any("pixel data" in r for r in reasons) and any("not an MR image" in r for r in reasons)


def test_disk_below_the_watermark_is_refused_with_out_of_resources(node, tmp_path):
    n = node(min_free_disk_mb=1e12)  # more than any disk: every instance is refused
    paths = make_mr_instances(tmp_path / "in", 2, rows=16)
    proc = storescu(paths, n.port, extra_args=["-v"])
    assert "refused: outofresources" in (proc.stdout + proc.stderr).lower()
    assert spool_files(n) == {}
    assert "below the node's watermark" in n.log()
    assert n.echo().returncode == 0


def test_several_scanners_at_once(node, tmp_path):
    n = node()
    batches = [make_mr_instances(tmp_path / f"s{k}", 40, rows=16) for k in range(3)]
    results = [None] * 3

    def send(k):
        results[k] = storescu(batches[k], n.port, calling=f"SCANNER{k}")

    threads = [threading.Thread(target=send, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert set(spool_files(n, sum(map(len, batches)))) == {sop_uid(p) for b in batches for p in b}


def test_incomplete_acquisition_fails_after_the_cap_naming_the_missing_slices(node, simulated_scan):
    n = node(quiet_seconds=1.0, incomplete_cap_seconds=3.0)
    scan = simulated_scan(vendor="siemens", matrix=(16, 16, 8), echo_times_ms=[5.0, 10.0])
    missing = {}
    for p in scan.paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.ImageType[2] == "P" and ds.InstanceNumber in (3, 4):
            missing[ds.InstanceNumber] = p
    proc = storescu([p for p in scan.paths if p not in missing.values()], n.port)
    assert proc.returncode == 0, proc.stderr
    (job,) = n.wait_for_jobs(1, timeout_s=60)
    assert job["state"] == "failed"
    assert "incomplete acquisition" in job["reason"] and "missing slices (InstanceNumber) 3-4" in job["reason"]
    assert "failed" in n.log() and "missing slices" in n.log()
    failed_cli = subprocess.run([*QSMNODE, "jobs", "--storage", str(n.storage), "--state", "failed"],
                                capture_output=True, text=True, timeout=60)
    assert job["id"] in failed_cli.stdout and "missing slices" in failed_cli.stdout


def test_quick_start_flags_and_the_echo_and_send_commands(tmp_path, free_port):
    require_tools(ECHOSCU_BIN)
    node = NodeProcess.from_flags(tmp_path / "quick", free_port(), aet="QUICK", http_port=-1,
                                  destinations=["PACS@127.0.0.1:4242"],
                                  extra_args=["--bind", "127.0.0.1", "--device", "cpu"])
    try:
        node.start(echo=False)
        text = node.log()
        assert "node QUICK ready" in text and "rules default" in text and "destinations PACS" in text
        echo = subprocess.run([*QSMNODE, "echo", f"QUICK@127.0.0.1:{node.port}"], capture_output=True, text=True,
                              timeout=60)
        assert echo.returncode == 0 and "success" in echo.stdout, echo.stderr
        paths = make_mr_instances(tmp_path / "in", 4, rows=16)
        sent = subprocess.run([*QSMNODE, "send", f"QUICK@127.0.0.1:{node.port}", str(tmp_path / "in")],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "sent 4 of 4" in sent.stdout, sent.stdout + sent.stderr
        assert set(node.spool_files(len(paths))) == {sop_uid(p) for p in paths}
        bad = subprocess.run([*QSMNODE, "echo", f"QUICK@127.0.0.1:{free_port()}", "--timeout", "5"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "could not be reached" in bad.stderr
    finally:
        assert node.stop() == 0
        assert "stopped" in node.log()


def test_peer_address_allow_list(node, tmp_path, free_port):
    blocked = NodeProcess(tmp_path / "blocked", free_port(), allowed_hosts=["10.99.0.0/16"]).start(echo=False)
    try:
        assert blocked.echo().returncode != 0
        assert "peer 127.0.0.1 is not in allowed_hosts" in blocked.log()
        assert any(e["event"] == "rejected" and e.get("what") == "connection" for e in blocked.audit())
    finally:
        blocked.stop()
    assert node(allowed_hosts=["127.0.0.0/8"]).echo().returncode == 0
