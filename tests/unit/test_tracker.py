"""Series tracker on a real simulated acquisition: completion by count, by quiet time, the incomplete cap
(with the missing slices named), refused series, re-opening, and rule/destination choice."""

import os
import shutil
import struct

import pydicom
import pytest

from qsmnode.config import NodeConfig
from qsmnode.node.dispatch import Destination
from qsmnode.node.index import Index, series_components
from qsmnode.node.rules import Rule
from qsmnode.node.tracker import Tracker, describe_missing


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from qsmnode.simulate.scan import simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("scan"), vendor="siemens", matrix=(24, 24, 8),
                         echo_times_ms=[4.0, 8.0, 12.0])


def config(**kw):
    pacs = Destination.parse_address("PACS@127.0.0.1:4242", name="pacs")
    base = dict(quiet_seconds=10.0, incomplete_cap_seconds=100.0, destinations={"pacs": pacs})
    base.update(kw)
    return NodeConfig(**base)


def ingest(index, paths, t, ae="MR1"):
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        index.add_instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), p,
                           calling_ae=ae, received_at=t)


def test_complete_by_count_queues_one_job_with_the_rule_choices(tmp_path, scan):
    index = Index(tmp_path / "i.sqlite")
    woken = []
    tracker = Tracker(config(), index, on_job=woken.append)
    ingest(index, scan.paths, t=1000.0)
    jobs = tracker.step(now=1000.5)  # long before the quiet time: counts say it is complete
    assert len(jobs) == 1 and woken == jobs
    job = index.job(jobs[0])
    assert job["state"] == "queued" and job["rule"] == "default" and job["preset"] == "auto"
    assert [d["name"] for d in job["destinations"]] == ["pacs"]
    assert job["params"]["instances"] == len(scan.paths) and len(job["params"]["series"]) == 2
    (acq,) = index.acquisitions()
    assert acq["state"] == "queued"
    comps = {s["component"] for s in index.series_of_acquisition(acq["id"])}
    assert comps == {"magnitude", "phase"}
    assert tracker.step(now=5000.0) == []  # nothing new: no second job


def test_a_ge_series_of_interleaved_components_completes_by_count(tmp_path):
    """Issue 13 item 10: GE writes the real and imaginary (and magnitude, phase) images into one
    series; its ImagesInAcquisition counts them all, so the count completes it (not the quiet timer)."""
    from qsmnode.simulate.scan import simulate_scan

    ge = simulate_scan(tmp_path / "ge", vendor="ge", matrix=(16, 16, 8), echo_times_ms=[4.0, 8.0])
    index = Index(tmp_path / "i.sqlite")
    tracker = Tracker(config(), index)
    ingest(index, ge.paths, t=1000.0)
    (job,) = tracker.step(now=1000.5)
    assert index.job(job)["params"]["why_complete"] == "every series complete by count"
    (series,) = index.series_of_acquisition(index.acquisitions()[0]["id"])
    assert {"real", "imaginary"} <= series_components(series) and series["received"] == len(ge.paths)


def test_magnitude_alone_waits_then_is_unmatched_then_reopens_with_the_phase(tmp_path, scan):
    index = Index(tmp_path / "i.sqlite")
    tracker = Tracker(config(), index)
    by_series = {}
    for p in scan.paths:
        by_series.setdefault(pydicom.dcmread(p, stop_before_pixels=True).ImageType[2], []).append(p)
    ingest(index, by_series["M"], t=1000.0)
    assert tracker.step(now=1001.0) == []  # complete magnitude series, but no phase yet: wait
    assert tracker.step(now=1011.0) == []  # quiet: the default rule does not take magnitude alone
    (acq,) = index.acquisitions()
    assert acq["state"] == "unmatched" and "no phase" in acq["reason"]
    ingest(index, by_series["P"], t=1100.0)  # the phase series arrives late
    (job,) = tracker.step(now=1100.5)
    assert job.endswith("-2") and index.acquisition(acq["id"])["generation"] == 2


def test_short_series_fail_after_the_cap_naming_the_missing_slices(tmp_path, scan):
    index = Index(tmp_path / "i.sqlite")
    tracker = Tracker(config(), index)
    dropped = {pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber: p for p in scan.paths[:3]}
    keep = [p for p in scan.paths if p not in dropped.values()]
    ingest(index, keep, t=1000.0)
    assert tracker.step(now=1050.0) == []  # past the quiet time, but counts say slices are missing: wait
    (job_id,) = tracker.step(now=1101.0)  # past the cap
    job = index.job(job_id)
    assert job["state"] == "failed" and "incomplete acquisition" in job["reason"]
    assert "missing slices (InstanceNumber)" in job["reason"]
    for n in dropped:
        assert str(n) in job["reason"]
    assert [d["name"] for d in job["destinations"]] == ["pacs"]  # `qsmnode retry` still knows where to send
    assert index.acquisitions()[0]["state"] == "failed"


def test_unknown_counts_complete_after_the_quiet_time(tmp_path, scan):
    index = Index(tmp_path / "i.sqlite")

    def no_counts(ds):
        from qsmnode.dicom.classify import classify_instance
        import dataclasses

        return dataclasses.replace(classify_instance(ds), expected_in_series=None)

    tracker = Tracker(config(), index, classify=no_counts)
    ingest(index, scan.paths, t=1000.0)
    assert tracker.step(now=1005.0) == []
    assert len(tracker.step(now=1010.5)) == 1


def test_refused_series_are_kept_apart_and_rules_pick_destinations(tmp_path, scan):
    derived = tmp_path / "swi.dcm"
    ds = pydicom.dcmread(scan.paths[0])
    ds.ImageType = ["DERIVED", "PRIMARY", "SWI"]
    ds.SeriesInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.save_as(derived)
    index = Index(tmp_path / "i.sqlite")
    mr1 = Destination.parse_address("MR1@10.0.0.21:104")
    rules = (Rule.from_config({"name": "mr1-back", "destinations": ["return-to-sender"],
                               "match": {"calling_ae": "^MR1$"}}, 0),)
    tracker = Tracker(config(rules=rules, known_aes={"MR1": mr1}), index)
    ingest(index, [derived], t=1000.0, ae="MR1")
    ingest(index, scan.paths, t=1000.0, ae="MR1")
    (job_id,) = tracker.step(now=1011.0)
    assert [d["ae_title"] for d in index.job(job_id)["destinations"]] == ["MR1"]
    refused = [a for a in index.acquisitions() if a["acquisition_key"].startswith("refused:")]
    assert len(refused) == 1 and refused[0]["state"] == "unmatched" and "SWI" in refused[0]["reason"]


def test_describe_missing_names_echoes():
    series = [{"series_instance_uid": "1.1", "expected": 6, "received": 4, "description": "pha", "component": "phase"}]
    insts = [{"series_instance_uid": "1.1", "instance_number": n, "echo_numbers": e}
             for n, e in ((1, "1"), (2, "2"), (3, "1"), (5, "1"))]
    (line,) = describe_missing(series, insts)
    assert "4 of 6" in line and "(InstanceNumber) 4, 6" in line and "echo 2 has 1 of 3" in line


def test_test_rule_command_explains_the_match(scan, tmp_path, capsys):
    from qsmnode.cli import main

    by_type = {}
    for p in scan.paths:
        by_type.setdefault(pydicom.dcmread(p, stop_before_pixels=True).ImageType[2], p)
    assert main(["test-rule", str(by_type["M"]), str(by_type["P"])]) == 0
    out = capsys.readouterr().out
    assert "rule 'default': MATCHES" in out and "phase information present" in out
    assert main(["test-rule", str(by_type["M"])]) == 1
    assert "no phase" in capsys.readouterr().out
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[destination]]\nname = "pacs"\naddress = "PACS@127.0.0.1:4242"\n'
                   '[[rule]]\nname = "gre-only"\ndestinations = ["pacs"]\n[rule.match.tags]\n'
                   'SeriesDescription = "^t1"\n')
    assert main(["test-rule", "--config", str(cfg), str(by_type["M"]), str(by_type["P"])]) == 1
    assert "matches none of '^t1'" in capsys.readouterr().out


def test_instances_still_in_memory_are_classified_and_written_before_the_job(tmp_path, scan):
    """Journaled instances have no file yet: the tracker reads them from the spool (here through
    the classifier child process, as in the node) and writes their files before queueing the job."""
    from qsmnode.node.classifier import ClassifierProcess
    from qsmnode.node.instance_header import read_header
    from qsmnode.node.scp import _header_bytes
    from qsmnode.node.spool import Spool

    spool = Spool(tmp_path / "storage")
    spool.open()
    index = Index(tmp_path / "i.sqlite")
    for p in scan.paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        raw = open(p, "rb").read()
        meta_end = 132 + 12 + struct.unpack_from("<I", raw, 140)[0]  # preamble, DICM, (0002,0000) UL
        header = read_header(raw[meta_end:], str(ds.file_meta.TransferSyntaxUID))
        header_bytes = _header_bytes(raw[:meta_end], header, len(raw) - meta_end)
        assert header_bytes <= len(raw) - 24 * 24 * 2  # the pixels stay behind
        path, stored = spool.store(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), raw[:meta_end],
                                   raw[meta_end:], header_bytes=header_bytes)
        assert stored and not path.exists()
        assert spool.pending_data(path, header_only=True) == raw[:header_bytes]
        index.add_instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), path,
                           calling_ae="MR1", received_at=1000.0)
    classifier = ClassifierProcess()
    try:
        tracker = Tracker(config(), index, spool=spool, classifier=classifier)
        (job_id,) = tracker.step(now=1000.5)
    finally:
        classifier.close()
        spool.close()
    assert {s["component"] for s in index.series_of_acquisition(index.job(job_id)["acquisition_id"])} == {
        "magnitude", "phase"}
    inputs = [i["path"] for i in index.instances_of_acquisition(index.job(job_id)["acquisition_id"])]
    assert len(inputs) == len(scan.paths) and all(os.path.getsize(p) > 0 for p in inputs)
