"""Reading in worker processes (``workers`` > 1) gives exactly what the serial path gives.

The pool thresholds are lowered so that the small simulated series go through the pool; every
test compares the two paths on the same files: the arrays bit for bit, header, provenance,
warnings, source references, and the refusal messages word for word.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
from pathlib import Path

import pydicom
import pytest

from qsmnode.dicom import load, readpool
from qsmnode.dicom.load import load_acquisition, load_acquisitions
from qsmnode.errors import InputRefused
from qsmnode.simulate.dicom_writer import WriterOptions
from qsmnode.simulate.scan import simulate_scan

SAMPLES = Path(__file__).resolve().parents[2] / "sample_dicom"
TINY = dict(matrix=(24, 20, 10), voxel_size_mm=(4.0, 4.0, 4.0), echo_times_ms=[5, 12, 19])


@pytest.fixture(autouse=True)
def pool_for_small_inputs(monkeypatch):
    """Let every input of 2 files or more go through a pool of (up to) 2 workers."""
    monkeypatch.setattr(readpool, "MIN_FILES", 2)
    monkeypatch.setattr(readpool, "MIN_FILES_PER_WORKER", 1)
    yield
    readpool.shutdown_prestarted()


@pytest.fixture
def pool_used(monkeypatch):
    """Counts the parallel reads that returned instances (not the serial fallback)."""
    calls = []
    original = load._read_parallel

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(load, "_read_parallel", spy)
    return calls


def outcome(sources, workers):
    """The acquisitions, or the refusal message."""
    try:
        return load_acquisitions(sources, workers=workers)
    except InputRefused as err:
        return f"InputRefused: {err}"


def assert_same(serial, parallel):
    if isinstance(serial, str) or isinstance(parallel, str):
        assert serial == parallel
        return
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert a.signal.dtype == b.signal.dtype and a.signal.shape == b.signal.shape
        assert a.signal.strides == b.signal.strides  # the same Fortran-ordered layout
        assert a.signal.tobytes(order="A") == b.signal.tobytes(order="A")  # bit for bit
        assert a.echo_times_s.tobytes() == b.echo_times_s.tobytes()
        assert a.affine.tobytes() == b.affine.tobytes()
        assert a.b0_tesla == b.b0_tesla
        assert a.vendor == b.vendor and a.phase_sign_validated == b.phase_sign_validated
        assert a.header == b.header
        assert a.header.file_meta == b.header.file_meta
        assert [e.tag for e in a.header] == [e.tag for e in b.header]
        assert a.source_series_uids == b.source_series_uids
        assert a.source_instances == b.source_instances
        assert a.provenance == b.provenance
        assert a.warnings == b.warnings


def compare(sources, pool_used, workers=2):
    serial = outcome(sources, workers=1)
    n_before = len(pool_used)
    parallel = outcome(sources, workers=workers)
    assert pool_used[n_before:] == [True], "the parallel path was not taken"
    assert_same(serial, parallel)
    return parallel


def write_all(datasets, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def siemens(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("siemens"), vendor="siemens", seed=3, **TINY)


# --------------------------------------------------------------------------- equal results


@pytest.mark.parametrize(
    "vendor",
    ["siemens", "siemens-enhanced", "ge", "philips", "philips-enhanced", "canon"],
)
def test_vendors(tmp_path, pool_used, vendor):
    scan = simulate_scan(tmp_path, vendor=vendor, seed=4, oblique_deg=15.0, **TINY)
    # siemens-enhanced: one multi-frame instance per echo and component; philips-enhanced: one
    # instance with every frame, and a stray file beside it so that the pool gets two files
    (scan.dicom_dir / "README.txt").write_text("not DICOM")
    acqs = compare([scan.dicom_dir], pool_used)
    assert acqs[0].vendor == vendor.split("-")[0]


@pytest.mark.parametrize("name", ["siemens_3T", "ge_3T"])
def test_sample_dicom(pool_used, name):
    if not (SAMPLES / name).is_dir():
        pytest.skip(f"sample_dicom/{name} not present")
    compare([SAMPLES / name / "dicom"], pool_used)


def test_more_workers_than_cpus_and_file_order(siemens, pool_used):
    # the order of the sources decides the header's reference instance and the order of the
    # source references in both paths alike; the signal does not depend on it
    files = list(reversed(siemens.paths))
    parallel = compare(files, pool_used, workers=5)
    in_order = outcome([siemens.dicom_dir], workers=5)
    assert in_order[0].signal.tobytes(order="A") == parallel[0].signal.tobytes(order="A")


def test_duplicates_across_chunks_are_used_once(tmp_path, siemens, pool_used):
    copy_dir = tmp_path / "copy"
    shutil.copytree(siemens.dicom_dir, copy_dir)
    acqs = compare([siemens.dicom_dir, copy_dir], pool_used)
    assert len(acqs) == 1


def test_repeated_acquisitions(tmp_path, pool_used):
    a = simulate_scan(tmp_path / "a", vendor="siemens", seed=7, **TINY)
    b = simulate_scan(
        tmp_path / "b",
        vendor="siemens",
        seed=8,
        writer_options=WriterOptions(extra={"AcquisitionTime": "111500.000000"}),
        **TINY,
    )
    frame_of_reference = pydicom.dcmread(a.paths[0], stop_before_pixels=True).FrameOfReferenceUID
    for p in b.paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(p)
    acqs = compare([a.dicom_dir, b.dicom_dir], pool_used)
    assert len(acqs) == 2


def test_pixels_through_a_folder_or_pickled(tmp_path, siemens, pool_used, monkeypatch):
    monkeypatch.setattr(readpool, "TRANSFER_DIRS", [Path("/nonexistent/shm"), tmp_path])
    compare([siemens.dicom_dir], pool_used)
    assert not list(tmp_path.iterdir())  # the per-call folder is gone
    monkeypatch.setattr(readpool, "TRANSFER_DIRS", [])  # nowhere: pickled through the pipe
    compare([siemens.dicom_dir], pool_used)
    monkeypatch.setattr(readpool, "_free_bytes", lambda folder: 0)  # no room anywhere
    monkeypatch.setattr(readpool, "TRANSFER_DIRS", [tmp_path])
    assert readpool.transfer_dir(1000) is None
    compare([siemens.dicom_dir], pool_used)


def test_stale_transfer_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(readpool, "TRANSFER_DIRS", [tmp_path])
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a process id that no longer runs
    stale = tmp_path / f"qsmnode-load-{pid}-abc"
    stale.mkdir()
    (stale / "00000").write_bytes(b"x")
    mine = readpool.transfer_dir()
    assert mine is not None and mine.parent == tmp_path and not stale.exists()
    shutil.rmtree(mine)


def test_forkserver(siemens, pool_used, monkeypatch):
    monkeypatch.setattr(readpool, "start_method", lambda: "forkserver")
    compare([siemens.dicom_dir], pool_used)


def test_prestarted_pool_is_used_once(siemens, pool_used):
    assert load.prestart_workers(2) == "fork"
    assert readpool._prestarted is not None
    serial = outcome([siemens.dicom_dir], workers=1)
    assert_same(serial, outcome([siemens.dicom_dir], workers=None))
    assert readpool._prestarted is None and pool_used == [True]


def test_no_transfer_files_left_behind(siemens, pool_used):
    def leftovers():
        return {p for d in readpool.TRANSFER_DIRS if d.is_dir() for p in d.glob("qsmnode-load-*")}

    before = leftovers()
    compare([siemens.dicom_dir], pool_used)
    assert leftovers() <= before


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def datasets(siemens):
    return [pydicom.dcmread(p) for p in siemens.paths]


def _slice(ds):
    return (int(ds.InstanceNumber) - 1) % TINY["matrix"][2]


def test_corrupt_pixel_data_same_refusal(tmp_path, siemens, pool_used):
    folder = tmp_path / "dicom"
    shutil.copytree(siemens.dicom_dir, folder)
    victim = sorted(folder.rglob("*.dcm"))[7]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated inside the pixel data
    (folder / "garbage.dcm").write_bytes(os.urandom(3000))
    (folder / "header_only.dcm").write_bytes(sorted(folder.rglob("*.dcm"))[3].read_bytes()[:600])
    message = compare([folder], pool_used)
    assert message.startswith("InputRefused: ") and "is truncated" in message


def test_truncated_pixel_data_is_a_refusal_not_a_crash(tmp_path, siemens):
    folder = tmp_path / "dicom"
    shutil.copytree(siemens.dicom_dir, folder)
    victim = sorted(folder.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(InputRefused, match="pixel data of .* is truncated"):
        load_acquisition([folder], workers=1)


def test_missing_slice(tmp_path, datasets, pool_used):
    kept = [ds for ds in datasets if _slice(ds) != 4]
    message = compare([write_all(kept, tmp_path / "d")], pool_used)
    assert "missing" in message


def test_missing_phase_image(tmp_path, datasets, pool_used):
    kept = [
        ds
        for ds in datasets
        if not ("P" in ds.ImageType[2:3] and int(ds.EchoNumbers) == 2 and _slice(ds) == 3)
    ]
    message = compare([write_all(kept, tmp_path / "d")], pool_used)
    assert "echo 2 (TE 12 ms) phase: 1 of 10 slices missing" in message


def test_derived_series_beside_the_originals(tmp_path, datasets, pool_used):
    swi = [copy.deepcopy(ds) for ds in datasets if "M" in ds.ImageType[2:3]]
    for ds in swi:
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "SWI"]
        ds.SeriesInstanceUID = ds.SeriesInstanceUID[:60] + ".9"
        ds.SOPInstanceUID = ds.SOPInstanceUID[:60] + ".9"
    compare([write_all(datasets + swi, tmp_path / "d")], pool_used)
    message = compare([write_all(swi, tmp_path / "swi")], pool_used)
    assert "SWI" in message


def test_not_mr_and_uncombined(tmp_path, datasets, pool_used):
    ct = copy.deepcopy(datasets)
    for ds in ct:
        ds.Modality = "CT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert "not an MR image" in compare([write_all(ct, tmp_path / "ct")], pool_used)
    for ds in datasets:
        ds[0x0051, 0x100F].value = "H12"
    assert "uncombined coil image" in compare([write_all(datasets, tmp_path / "coil")], pool_used)


def test_broken_enhanced_functional_group(tmp_path, pool_used):
    scan = simulate_scan(tmp_path / "s", vendor="siemens-enhanced", seed=5, **TINY)
    victim = sorted(scan.paths)[1]
    data = bytearray(victim.read_bytes())
    slope = data.index(b"\x28\x00\x53\x10DS")  # a RescaleSlope of the functional groups
    length = int.from_bytes(data[slope + 6 : slope + 8], "little")
    data[slope + 8 : slope + 8 + length] = b"x" * length  # not a number: image_records raises
    victim.write_bytes(bytes(data))
    message = compare([scan.dicom_dir], pool_used)
    assert isinstance(message, str) and "unreadable image header" in message


# --------------------------------------------------------------------------- fallbacks


def _die(chunk):
    os._exit(3)


def test_dead_worker_falls_back_to_the_serial_path(siemens, pool_used, monkeypatch, caplog):
    monkeypatch.setattr(load, "_read_chunk", _die)
    serial = outcome([siemens.dicom_dir], workers=1)
    with caplog.at_level(logging.WARNING, logger="qsmnode.dicom.load"):
        parallel = outcome([siemens.dicom_dir], workers=2)
    assert pool_used == [False]
    assert "reading them in this process" in caplog.text
    assert_same(serial, parallel)


def test_datasets_and_small_inputs_stay_serial(siemens, pool_used, monkeypatch):
    datasets = [pydicom.dcmread(p) for p in siemens.paths]
    assert_same(outcome([siemens.dicom_dir], workers=1), outcome(datasets, workers=4))
    assert pool_used == []
    monkeypatch.setattr(readpool, "MIN_FILES", 64)
    outcome(siemens.paths[:40], workers=4)
    assert pool_used == []


def test_resolve_workers(monkeypatch):
    monkeypatch.setattr(readpool, "MIN_FILES", 64)
    monkeypatch.setattr(readpool, "MIN_FILES_PER_WORKER", 16)
    monkeypatch.setattr(readpool, "available_cpus", lambda: 16)
    assert readpool.resolve_workers(None, 2112) == readpool.MAX_DEFAULT_WORKERS
    assert readpool.resolve_workers(None, 63) == 1
    assert readpool.resolve_workers(None, 80) == 5  # at least 16 files per worker
    assert readpool.resolve_workers(1, 2112) == 1
    assert readpool.resolve_workers(12, 2112) == 12
    monkeypatch.setattr(readpool, "available_cpus", lambda: 2)
    assert readpool.resolve_workers(None, 2112) == 2
    with pytest.raises(ValueError):
        readpool.resolve_workers(0, 2112)


def test_chunks_keep_order():
    items = list(range(103))
    chunks = readpool.chunked(items, 3)
    assert [i for c in chunks for i in c] == items
    assert len(chunks) <= 3 * readpool.CHUNKS_PER_WORKER


def test_start_method():
    assert not readpool.cuda_initialised()  # no GPU context in the test process
    assert readpool.start_method() == "fork"
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not readpool.fork_is_safe()  # another thread: a forked child may inherit its locks
        assert readpool.start_method() == "forkserver"
    finally:
        stop.set()
        t.join()


def test_cuda_initialised_means_forkserver(siemens, pool_used, monkeypatch):
    """A process whose CUDA driver is initialised keeps /dev/nvidia* open: no fork then."""
    real_readlink = os.readlink

    def readlink(path, *args, **kwargs):
        if str(path).startswith("/proc/self/fd/") and str(path).endswith("/0"):
            return "/dev/nvidiactl"
        return real_readlink(path, *args, **kwargs)

    monkeypatch.setattr(readpool.os, "readlink", readlink)
    assert readpool.cuda_initialised()
    assert readpool.start_method() == "forkserver"
    assert load.prestart_workers(2) == "forkserver"  # the server is started, no pool is kept
    assert readpool._prestarted is None
    compare([siemens.dicom_dir], pool_used)
