"""AuditLog: one JSON line per record, PHI pseudonymised with a stable salted digest, thread-safe."""

import json
import threading

import pytest

from qsmnode.node.audit import AuditLog, is_phi_field


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_record_writes_json_line_with_ts_event_and_fields(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    log.record("received", sop_instance_uid="1.2.3.4", calling_ae="SCANNER", seconds=0.012,
               path=tmp_path / "x.dcm")
    log.close()
    (line,) = _lines(tmp_path / "audit" / "audit.jsonl")
    assert line["event"] == "received"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert line["sop_instance_uid"] == "1.2.3.4"  # UIDs stay in clear
    assert line["seconds"] == 0.012
    assert line["path"] == str(tmp_path / "x.dcm")


def test_phi_never_in_clear_and_pseudonyms_are_stable(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record("received", PatientName="DOE^JANE", patient_id="MRN0042", AccessionNumber="ACC9",
               PatientBirthDate="19700101", study_instance_uid="1.2.840.1",
               tags={"PatientID": "MRN0042", "Modality": "MR"}, others=[{"patient_name": "DOE^JANE"}])
    log.record("sent", PatientID="MRN0042")
    log.close()
    text = path.read_text()
    for secret in ("DOE", "JANE", "MRN0042", "ACC9", "19700101"):
        assert secret not in text
    a, b = _lines(path)
    assert a["patient_id"] == a["tags"]["PatientID"] == b["PatientID"]
    assert a["patient_id"].startswith("h:") and len(a["patient_id"]) == 18
    assert a["PatientName"] == a["others"][0]["patient_name"] != a["patient_id"]
    assert a["tags"]["Modality"] == "MR"
    assert a["study_instance_uid"] == "1.2.840.1"
    # the salt persists beside the log: the same patient gets the same digest after a restart
    again = AuditLog(path)
    assert again.pseudonym("MRN0042") == a["patient_id"]
    again.close()
    # another node (another salt) gives another digest: the digest alone identifies nobody
    other = AuditLog(tmp_path / "other.jsonl")
    assert other.pseudonym("MRN0042") != a["patient_id"]
    other.close()
    assert (tmp_path / "audit.jsonl.salt").stat().st_mode & 0o077 == 0


def test_is_phi_field_spellings():
    assert is_phi_field("PatientName") and is_phi_field("patient_name") and is_phi_field("ACCESSION_NUMBER")
    assert not is_phi_field("SeriesInstanceUID") and not is_phi_field("job_id")


def test_concurrent_records_do_not_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, salt=b"fixed")

    def burst(k):
        for n in range(200):
            log.record("processed", job_id=f"{k}-{n}", note="x" * 500)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = _lines(path)  # every line parses: none torn
    assert len(lines) == 800
    assert len({x["job_id"] for x in lines}) == 800


def test_bad_event_and_closed_log_are_refused_clearly(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", salt=b"s")
    with pytest.raises(ValueError, match="non-empty"):
        log.record("")
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.record("sent")
