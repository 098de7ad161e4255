"""Dispatcher against a real Orthanc: DIMSE and STOW-RS delivery, back-off while the PACS is
down, persistence across a Dispatcher restart, bounded retries of refused instances."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from qsmnode.errors import ConfigError
from qsmnode.node.audit import AuditLog
from qsmnode.node.dispatch import Destination, Dispatcher, backoff_delay_s
from qsmnode.node.metrics import NodeMetrics

from conftest import dicomweb_plugin


def _wait(predicate, timeout_s: float = 30.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def _events(path: Path, event: str) -> list[dict]:
    return [x for x in map(json.loads, path.read_text().splitlines()) if x["event"] == event]


def _metric(metrics: NodeMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------ no network needed
def test_destination_parsing_and_clear_config_errors(tmp_path):
    d = Destination.parse_address("PACS@10.1.2.3:104")
    assert (d.name, d.kind, d.ae_title, d.host, d.port) == ("PACS", "dimse", "PACS", "10.1.2.3", 104)
    w = Destination.parse_address("https://pacs.example.org/dicom-web/")
    assert (w.kind, w.url, w.name) == ("dicomweb", "https://pacs.example.org/dicom-web", "pacs.example.org")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    t = Destination.from_config({"name": "main", "address": "PACS@pacs:11112", "tls": {"ca_file": str(ca)}})
    assert t.tls and t.tls_ca_file == str(ca) and t.port == 11112 and t.name == "main"
    c = Destination.from_config({"name": "x", "aet": "A", "host": "h", "port": "4242"})
    assert c.ae_title == "A" and c.port == 4242
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        Destination.parse_address("PACS-10.1.2.3-104")
    with pytest.raises(ConfigError, match="unknown option"):
        Destination.from_config({"name": "x", "adress": "A@h:1"})
    with pytest.raises(ConfigError, match="not a readable file"):
        Destination.from_config({"name": "x", "address": "A@h:1", "tls": {"ca_file": "/nonexistent.pem"}})
    with pytest.raises(ConfigError, match="AE title"):
        Destination.parse_address("WAY_TOO_LONG_AE_TITLE@h:104")


def test_backoff_is_exponential_with_jitter_and_capped():
    rng = random.Random(1)
    for attempt in range(1, 12):
        d = min(60.0, 2.0 * 2 ** (attempt - 1))
        for _ in range(50):
            x = backoff_delay_s(attempt, 2.0, 60.0, rng)
            assert d / 2 <= x <= d
    xs = [backoff_delay_s(3, 2.0, 60.0, rng) for _ in range(200)]
    assert max(xs) - min(xs) > 1.0  # jitter spreads retries of many nodes


def test_enqueue_refuses_non_dicom_with_the_file_named(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not DICOM")
    d = Dispatcher(tmp_path / "index.sqlite", "QSMNODE")
    with pytest.raises(ValueError, match="notes.txt"):
        d.enqueue("j", Destination.parse_address("A@127.0.0.1:1"), [bad])
    assert d.pending() == 0


# ------------------------------------------------------------------ against Orthanc
@pytest.mark.integration
def test_dimse_delivery_idempotent_with_metrics_and_audit(orthanc, make_mr_instances, tmp_path):
    paths = make_mr_instances(tmp_path / "out", 40)
    metrics, audit_path = NodeMetrics(), tmp_path / "audit.jsonl"
    done = []
    d = Dispatcher(tmp_path / "index.sqlite", "QSMNODE", metrics, AuditLog(audit_path),
                   on_job_done=lambda *a: done.append(a))
    dest = Destination.parse_address(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", name="pacs")
    with d:
        d.enqueue("job-1", dest, paths)
        d.enqueue("job-1", dest, paths)  # idempotent: still 40 rows
        assert _wait(lambda: d.job_dispatched("job-1"))
        assert d.pending() == 0 and d.job_state("job-1") == "sent"
        assert d.job_dispatched("no-such-job") is False
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert orthanc.sop_instance_uids() == uids
    series = orthanc.series_of_study(pydicom.dcmread(paths[0]).StudyInstanceUID)
    assert len(series) == 1 and series[0]["NumberOfInstances"] == 40
    inst = orthanc.instances_of_series(series[0]["SeriesInstanceUID"])
    first = next(i for i in inst if i["SOPInstanceUID"] == pydicom.dcmread(paths[0]).SOPInstanceUID)
    stored = pydicom.dcmread(__import__("io").BytesIO(orthanc.download_instance(first["ID"])))
    assert stored.PixelData == pydicom.dcmread(paths[0]).PixelData
    assert _metric(metrics, "qsmnode_dispatched_instances_total", destination="pacs", outcome="sent") == 40
    assert _metric(metrics, "qsmnode_outbox_pending") == 0
    (sent,) = _events(audit_path, "sent")
    assert sent["job_id"] == "job-1" and sent["instances"] == 40 and sent["destination"] == "pacs"
    assert "TEST^DISPATCH" not in audit_path.read_text()
    assert done == [("job-1", "sent", None)]


@pytest.mark.integration
def test_stow_rs_delivery(orthanc, make_mr_instances, tmp_path):
    if not dicomweb_plugin():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    paths = make_mr_instances(tmp_path / "out", 60)  # > one STOW-RS request of 50
    metrics = NodeMetrics()
    d = Dispatcher(tmp_path / "index.sqlite", "QSMNODE", metrics)
    with d:
        d.enqueue("job-web", Destination.parse_address(orthanc.dicomweb_url, name="web"), paths)
        assert _wait(lambda: d.job_state("job-web") != "pending")
    assert d.job_state("job-web") == "sent", d.job_failures("job-web")
    assert orthanc.instance_count() == 60
    assert _metric(metrics, "qsmnode_dispatched_instances_total", destination="web", outcome="sent") == 60


@pytest.mark.integration
def test_pacs_down_retries_with_backoff_and_survives_dispatcher_restart(orthanc, make_mr_instances, tmp_path):
    paths = make_mr_instances(tmp_path / "out", 25)
    dest = Destination.parse_address(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", name="pacs")
    db, audit_path = tmp_path / "index.sqlite", tmp_path / "audit.jsonl"
    orthanc.stop()  # the PACS is down
    metrics = NodeMetrics()
    d1 = Dispatcher(db, "QSMNODE", metrics, AuditLog(audit_path), base_delay_s=0.1, max_delay_s=0.8)
    d1.start()
    d1.enqueue("job-down", dest, paths)
    assert _wait(lambda: _metric(metrics, "qsmnode_dispatch_retries_total", destination="pacs") >= 4, 20)
    t0 = time.monotonic()
    d1.stop()  # the node restarts while the PACS is still down
    assert time.monotonic() - t0 < 3.0
    assert d1.pending() == 25 and not d1.job_dispatched("job-down")
    h = d1.health()["destinations"]["pacs"]
    assert h["pending"] == 25 and h["failed_attempts"] >= 4 and "pacs" in h["last_error"]
    retries = _events(audit_path, "dispatch_retry")
    assert all("pacs" in r["reason"] and r["destination"] == "pacs" for r in retries)
    delays = [r["retry_in_s"] for r in retries]
    for r in retries:  # equal jitter: in [d/2, d], d = min(max, base * 2**(n-1))
        cap = min(0.8, 0.1 * 2 ** (r["attempt"] - 1))
        assert cap / 2 - 1e-3 <= r["retry_in_s"] <= cap + 1e-3
    assert max(delays) > 0.35  # it did back off
    assert orthanc.proc is None

    orthanc.start()  # the PACS is back; a new Dispatcher on the same index finds the outbox
    d2 = Dispatcher(db, "QSMNODE", NodeMetrics(), AuditLog(audit_path), base_delay_s=0.1, max_delay_s=0.8)
    with d2:
        assert _wait(lambda: d2.job_dispatched("job-down"), 30)
    assert orthanc.instance_count() == 25
    assert _events(audit_path, "sent")[-1]["job_id"] == "job-down"


@pytest.mark.integration
def test_refused_instances_are_retried_a_bounded_number_of_times(orthanc_factory, make_mr_instances, tmp_path):
    # Orthanc answers C-STORE 0xA700 for an instance it cannot index (no SeriesInstanceUID)
    orthanc = orthanc_factory()
    good = make_mr_instances(tmp_path / "good", 3)
    bad = make_mr_instances(tmp_path / "bad", 2, series_description="BROKEN")
    for p in bad:
        ds = pydicom.dcmread(p)
        del ds.SeriesInstanceUID
        ds.save_as(p)
    metrics, audit_path = NodeMetrics(), tmp_path / "audit.jsonl"
    finished = threading.Event()
    outcome = []
    d = Dispatcher(tmp_path / "index.sqlite", "QSMNODE", metrics, AuditLog(audit_path),
                   base_delay_s=0.05, max_delay_s=0.2, max_refusals=3,
                   on_job_done=lambda *a: (outcome.append(a), finished.set()))
    dest = Destination.parse_address(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", name="pacs")
    with d:
        d.enqueue("job-r", dest, good + bad)
        assert finished.wait(30)
    assert d.job_state("job-r") == "failed" and not d.job_dispatched("job-r")
    failures = d.job_failures("job-r")
    assert len(failures) == 2
    assert all("C-STORE status 0xA700 (out of resources)" in f and "refused 3 times" in f
               for f in failures), failures
    assert outcome[0][0] == "job-r" and outcome[0][1] == "failed" and "C-STORE status" in outcome[0][2]
    assert orthanc.instance_count() == 3
    assert _metric(metrics, "qsmnode_dispatched_instances_total", destination="pacs", outcome="sent") == 3
    assert _metric(metrics, "qsmnode_dispatched_instances_total", destination="pacs", outcome="failed") == 2
    (failed,) = _events(audit_path, "dispatch_failed")
    assert failed["failed"] == 2 and failed["sent"] == 3
    # a retry of the job's dispatch (enqueue again) resets the failed files to pending
    d.enqueue("job-r", dest, good + bad)
    assert d.job_state("job-r") == "pending" and d.pending() == 2


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([shutil.which("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=qsmnode test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.mark.integration
def test_dimse_over_tls_with_client_certificate(orthanc_factory, make_mr_instances, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    orthanc = orthanc_factory(DicomTlsEnabled=True, DicomTlsCertificate=str(pki / "server.pem"),
                              DicomTlsPrivateKey=str(pki / "server.key"),
                              DicomTlsTrustedCertificates=str(pki / "ca.pem"),
                              DicomTlsRemoteCertificateRequired=True)
    paths = make_mr_instances(tmp_path / "out", 5)
    address = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    metrics = NodeMetrics()
    # without a client certificate, Orthanc refuses the TLS handshake: retried, nothing delivered
    anon = Destination.from_config({"name": "anon", "address": address, "tls": {"ca_file": str(pki / "ca.pem")}})
    d = Dispatcher(tmp_path / "index.sqlite", "QSMNODE", metrics, base_delay_s=0.1, max_delay_s=0.2)
    with d:
        d.enqueue("job-anon", anon, paths)
        assert _wait(lambda: _metric(metrics, "qsmnode_dispatch_retries_total", destination="anon") >= 1, 20)
        assert not d.job_dispatched("job-anon") and orthanc.instance_count() == 0
        mtls = Destination.from_config({"name": "mtls", "address": address,
                                        "tls": {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
                                                "key_file": str(pki / "client.key")}})
        d.enqueue("job-tls", mtls, paths)
        assert _wait(lambda: d.job_dispatched("job-tls"), 30), d.job_failures("job-tls")
    assert orthanc.instance_count() == 5
