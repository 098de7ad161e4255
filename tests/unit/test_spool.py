"""Spool: durable, stored once per SOP Instance UID, reconcile after a crash, retention removal."""

import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from qsmnode.node.index import Index
from qsmnode.durable import write_durably
from qsmnode.node.spool import Spool, safe_name


def mr_bytes(tmp_path, n=0, series=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series or "1.2.3.4"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    p = tmp_path / f"src{n}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return ds, p.read_bytes()


@pytest.mark.parametrize("journal", [True, False], ids=["journaled", "direct"])
def test_store_is_durable_exact_and_once(tmp_path, journal):
    spool = Spool(tmp_path / "s", journal=journal)
    spool.open()
    ds, data = mr_bytes(tmp_path)
    path, stored = spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
    assert stored and spool.exists(ds.SeriesInstanceUID, ds.SOPInstanceUID)
    spool.materialize()
    assert path.read_bytes() == data
    assert path == spool.path_for(ds.SeriesInstanceUID, ds.SOPInstanceUID)
    again, stored2 = spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, b"something else")
    assert again == path and not stored2 and path.read_bytes() == data
    assert not list(path.parent.glob(".*"))


def test_safe_name_keeps_uids_and_hashes_the_rest():
    assert safe_name("1.2.840.10008.1") == "1.2.840.10008.1"
    odd = safe_name("../../etc/passwd")
    assert "/" not in odd and odd.startswith("x") and odd == safe_name("../../etc/passwd")


def test_reconcile_indexes_files_a_crash_left_out_and_quarantines_partial_ones(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.open()
    index = Index(tmp_path / "s" / "index.sqlite")
    ds1, d1 = mr_bytes(tmp_path, 1)
    ds2, d2 = mr_bytes(tmp_path, 2)
    p1, _ = spool.store(ds1.SeriesInstanceUID, ds1.SOPInstanceUID, d1)
    index.add_instance(ds1.SOPInstanceUID, ds1.SeriesInstanceUID, "1.2.3", p1)
    p2, _ = spool.store(ds2.SeriesInstanceUID, ds2.SOPInstanceUID, d2)  # acknowledged, index insert lost
    spool.materialize()
    partial = spool.path_for("1.2.3.4", "1.2.3.999")
    partial.write_bytes(d2[: len(d2) // 2])  # a write cut short (never acknowledged)
    (partial.parent / ".junk.tmp").write_bytes(b"x")
    assert spool.reconcile(index) == 1
    assert index.has_instance(ds2.SOPInstanceUID) and not index.has_instance("1.2.3.999")
    assert not partial.exists() and (tmp_path / "s" / "quarantine" / partial.name).exists()
    assert not (partial.parent / ".junk.tmp").exists()
    assert spool.reconcile(index) == 0


def test_remove_files_and_write_durably(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.open()
    ds, data = mr_bytes(tmp_path)
    path, _ = spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
    spool.materialize()
    assert spool.remove_files([path, path]) == 1 and not path.parent.exists()
    path2, stored = spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)  # folder comes back
    spool.materialize()
    assert stored and path2.exists()
    target = tmp_path / "x.json"
    write_durably(target, b"{}")
    write_durably(target, b"[1]")
    assert target.read_bytes() == b"[1]" and sorted(os.listdir(tmp_path)) == ["s", "src0.dcm", "x.json"]
    assert spool.free_mb() > 0
    assert pydicom.dcmread(path2).SOPInstanceUID == ds.SOPInstanceUID


def test_retention_deletes_only_delivered_work_after_the_keep_time(tmp_path):
    from qsmnode.config import NodeConfig
    from qsmnode.node.dispatch import Destination, Dispatcher
    from qsmnode.node.retention import Retention

    storage = tmp_path / "s"
    cfg = NodeConfig(storage=storage, retention_hours=1.0, pressure_free_disk_mb=0.0)
    spool, index = Spool(storage), Index(cfg.db_path)
    spool.open()
    dispatcher = Dispatcher(cfg.db_path, "QSMNODE")  # real outbox, never started: nothing gets delivered
    jobs = {}
    for n, dests in ((1, []), (2, [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                                   "port": 1}])):
        ds, data = mr_bytes(tmp_path, n, series=f"1.2.3.{n}")
        path, _ = spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
        spool.materialize()
        index.add_instance(ds.SOPInstanceUID, ds.SeriesInstanceUID, "1.2.3", path, received_at=0.0)
        (row,) = index.unclassified()
        acq = index.record_classification(row, component="magnitude", echo_numbers=(1,), instance_number=1,
                                          acquisition_key=f"k{n}", expected_in_series=1)
        index.set_acquisition_state(acq, "queued")
        job = index.create_job(acq, 1, rule="r", preset="auto", destinations=dests)
        out = storage / "outputs" / job
        out.mkdir(parents=True)
        (out / "qsm.dcm").write_bytes(data)  # a real DICOM file: the outbox reads its file meta
        index.claim_next_job()
        index.finish_job(job, "done", output_dir=str(out), outputs=[str(out / "qsm.dcm")])
        if dests:
            dispatcher.enqueue(job, Destination(**dests[0]), [out / "qsm.dcm"])
        jobs[n] = (job, path, out)
    retention = Retention(cfg, index, spool, dispatcher)
    t_done = index.job(jobs[1][0])["finished_at"]
    assert retention.sweep(now=t_done + 60) == 0  # within the keep time: nothing goes
    assert retention.sweep(now=t_done + 7200) == 1  # job 1 (no destinations) goes; job 2 is not delivered
    assert not jobs[1][1].exists() and not jobs[1][2].exists() and index.job(jobs[1][0])["purged"] == 1
    assert jobs[2][1].exists() and jobs[2][2].exists()
    assert dispatcher.pending() == 1
