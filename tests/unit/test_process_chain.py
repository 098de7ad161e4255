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
