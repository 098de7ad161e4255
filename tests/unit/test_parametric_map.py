"""The QSM Parametric Map: float32 ppm, Real World Value Mapping in UCUM ppm, source geometry."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

import tests.dciodvfy as dciodvfy
from qsmnode.dicom.outputs import build_output_datasets
from qsmnode.dicom.write import write_datasets
from test_outputs import synthetic_case


@pytest.fixture(scope="module")
def pm_file(tmp_path_factory):
    acquisition, result = synthetic_case(shape=(30, 26, 14))
    datasets = build_output_datasets(acquisition, result, summary_image=False)
    out = tmp_path_factory.mktemp("pm")
    write_datasets(datasets, out)
    return acquisition, result, out / "QSM_PM" / "0001.dcm"


def frame_order(ds, affine) -> np.ndarray:
    """Frame indices sorted along the slice axis k (from each frame's ImagePositionPatient)."""
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient
                          for f in ds.PerFrameFunctionalGroupsSequence], dtype=float)
    ijk = np.linalg.solve(np.asarray(affine)[:3, :3], (positions - affine[:3, 3]).T).T
    np.testing.assert_allclose(ijk[:, :2], 0, atol=1e-4)  # every frame is a whole slice
    np.testing.assert_allclose(np.sort(ijk[:, 2]), np.arange(len(ijk)), atol=1e-4)
    return np.argsort(ijk[:, 2])


def test_parametric_map_gives_back_the_map_in_ppm(pm_file):
    acquisition, result, path = pm_file
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    frames = ds.pixel_array
    assert frames.dtype == np.float32
    vol = frames[frame_order(ds, acquisition.affine)].transpose(2, 1, 0)
    expected = np.where(result.mask, result.chi_ppm, 0).astype(np.float32)
    np.testing.assert_array_equal(vol, expected)  # float32 stored exactly
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("ppm", "UCUM")
    assert float(mapping.RealWorldValueSlope) == 1.0
    assert float(mapping.RealWorldValueIntercept) == 0.0
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert quantity.CodeValue == "126396"  # Magnetic Susceptibility


def test_parametric_map_is_on_the_source_geometry_and_study(pm_file):
    acquisition, result, path = pm_file
    ds = pydicom.dcmread(path)
    header = acquisition.header
    assert ds.StudyInstanceUID == header.StudyInstanceUID
    assert ds.PatientID == header.PatientID
    assert ds.FrameOfReferenceUID == header.FrameOfReferenceUID
    assert ds.NumberOfFrames == result.chi_ppm.shape[2]
    assert (ds.Rows, ds.Columns) == (result.chi_ppm.shape[1], result.chi_ppm.shape[0])
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    a = acquisition.affine
    np.testing.assert_allclose(iop[:3], a[:3, 0] / np.linalg.norm(a[:3, 0]), atol=1e-6)
    np.testing.assert_allclose(iop[3:], a[:3, 1] / np.linalg.norm(a[:3, 1]), atol=1e-6)
    order = frame_order(ds, a)
    for k, f in enumerate(order):
        frame = ds.PerFrameFunctionalGroupsSequence[f]
        ipp = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(ipp, (a @ [0, 0, k, 1])[:3], atol=1e-4)
    assert ds.SeriesDescription.startswith("QSM")
    equipment = {e.Manufacturer for e in ds.ContributingEquipmentSequence}
    assert "qsmnode" in equipment


@pytest.mark.skipif(not dciodvfy.AVAILABLE, reason="dicom3tools dciodvfy not installed")
def test_parametric_map_passes_dciodvfy(pm_file):
    dciodvfy.assert_valid(pm_file[2])
