"""The file chain end to end: simulate -> ``qsmnode process`` -> valid DICOM outputs in the source study."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from qsmnode.simulate.scan import simulate_scan


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    scan = simulate_scan(root / "scan", vendor="siemens", field_tesla=3.0, matrix=(64, 64, 40),
                         voxel_size_mm=(3.0, 3.0, 3.0), seed=3)
    result = subprocess.run(
        [sys.executable, "-m", "qsmnode.cli", "process", str(scan.dicom_dir), "-o", str(root / "out"),
         "--device", "cpu", "--json"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return scan, root / "out", json.loads(result.stdout)


def _series_by_kind(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    kinds: dict[str, list[pydicom.Dataset]] = {}
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        image_type = list(ds.get("ImageType", []))
        kind = image_type[2] if len(image_type) > 2 and ds.Modality == "MR" else str(ds.SOPClassUID.name)
        kinds.setdefault(kind, []).append(ds)
    return kinds


def test_every_output_kind_is_written_into_the_source_study(processed):
    scan, out, summary = processed
    kinds = _series_by_kind(out)
    for kind in ("QSM", "SWI", "MINIP", "R2STAR"):
        assert kind in kinds, sorted(kinds)
        assert len(kinds[kind]) == 40
    source = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    for datasets in kinds.values():
        for ds in datasets:
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.PatientID == source.PatientID
    assert summary["acquisitions"][0]["outputs"] == sum(len(v) for v in kinds.values())


def test_qsm_series_has_the_right_sign_on_the_phantom(processed):
    scan, out, _ = processed
    qsm = sorted(_series_by_kind(out)["QSM"], key=lambda ds: float(np.dot(ds.ImagePositionPatient, np.cross(
        ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:]))))
    volume = np.stack([ds.pixel_array.T for ds in qsm], axis=-1).astype(np.float32)  # ppb
    labels = np.load(scan.truth_dir / "labels.npy")
    truth = json.loads((scan.truth_dir / "truth.json").read_text())
    names = truth["labels"]
    pallidum = volume[labels == names["globus_pallidus"]]
    white = volume[labels == names["wm"]]
    calcification = volume[labels == names["calcification"]]
    assert pallidum.mean() > white.mean() + 50  # iron-rich pallidum clearly paramagnetic vs WM (ppb)
    assert calcification.mean() < white.mean()


def test_outputs_pass_dciodvfy(processed):
    from tests.dciodvfy import assert_valid

    _, out, _ = processed
    checked = set()
    for path in sorted(out.rglob("*.dcm")):
        kind = path.parent.name
        if kind in checked:
            continue
        assert_valid(path)
        checked.add(kind)
    assert len(checked) >= 5



@pytest.fixture
def reconstruction_stub(monkeypatch):
    """``qsmnode process`` without the reconstruction (what is under test is its account of the
    inputs): every acquisition 'processes' into an empty summary."""
    import qsmnode.process
    from qsmnode.process import ProcessOutcome

    def process_acquisition(acquisition, folder, **kwargs):
        return ProcessOutcome([], {"output_dir": str(folder), "outputs": 0})

    monkeypatch.setattr(qsmnode.process, "process_acquisition", process_acquisition)


def run_process(capsys, *args):
    from qsmnode.cli import main

    status = main(["process", *map(str, args)])
    captured = capsys.readouterr()
    assert status in (0, 2, 3), captured.err
    return status, captured.out


def test_every_input_series_is_in_the_summary_and_the_exit_status_says_what_was_refused(
        tmp_path, capsys, reconstruction_stub):
    """Issue 13 item 13: a folder with a usable acquisition, a magnitude-only one and an SWI made
    from the first: the summary names all four series (processed or refused with the reason)
    and the exit status is 3 (some refused), not 0 with "failures": []."""
    small = dict(vendor="siemens", voxel_size_mm=(6.0, 6.0, 6.0), echo_times_ms=[5, 12, 19])
    usable = simulate_scan(tmp_path / "a", matrix=(24, 24, 8), seed=1, **small)
    other = simulate_scan(tmp_path / "b", matrix=(24, 24, 10), seed=2, **small)
    inputs = tmp_path / "in"
    inputs.mkdir()
    uids = {}
    for n, path in enumerate(usable.paths + [p for p in other.paths if "magnitude" in str(p)]):
        ds = pydicom.dcmread(path)
        ds.save_as(inputs / f"{n:04d}.dcm")
        uids[ds.SeriesInstanceUID] = "processed" if path in usable.paths else "refused"
        if path in usable.paths and ds.ImageType[2] == "M":  # an SWI the scanner made from it
            ds.ImageType = ["DERIVED", "PRIMARY", "SWI"]
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4242"
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.4242.{n}"
            ds.save_as(inputs / f"swi_{n:04d}.dcm")
            uids[ds.SeriesInstanceUID] = "refused"
    status, out = run_process(capsys, inputs, "-o", tmp_path / "out", "--json")
    assert status == 3
    summary = json.loads(out)
    assert len(summary["acquisitions"]) == 1
    outcomes = {s["series_instance_uid"]: s for s in summary["series"]}
    assert {uid: s["outcome"] for uid, s in outcomes.items()} == uids
    reasons = " | ".join(s.get("reason", "") for s in summary["series"])
    assert "magnitude without phase" in reasons and "susceptibility-weighted image (SWI)" in reasons
    assert len(summary["failures"]) == 2
    status, out = run_process(capsys, inputs, "-o", tmp_path / "out2")
    assert status == 3
    assert "2 of 4 input series processed, 2 refused or failed" in out
    assert "refused: magnitude without phase" in out


def test_nothing_processed_exits_2_and_names_every_series(tmp_path, capsys, reconstruction_stub):
    scan = simulate_scan(tmp_path / "a", vendor="siemens", matrix=(24, 24, 8), voxel_size_mm=(6.0, 6.0, 6.0),
                         echo_times_ms=[5, 12], seed=1)
    status, out = run_process(capsys, scan.paths[0].parent, "-o", tmp_path / "out", "--json")
    assert status == 2
    (series,) = json.loads(out)["series"]
    assert series["outcome"] == "refused" and "magnitude without phase" in series["reason"]


def test_everything_processed_exits_0(tmp_path, capsys, reconstruction_stub):
    scan = simulate_scan(tmp_path / "a", vendor="siemens", matrix=(24, 24, 8), voxel_size_mm=(6.0, 6.0, 6.0),
                         echo_times_ms=[5, 12], seed=1)
    status, out = run_process(capsys, scan.dicom_dir, "-o", tmp_path / "out")
    assert status == 0 and "2 of 2 input series processed" in out
