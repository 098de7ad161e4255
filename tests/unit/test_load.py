"""simulate -> DICOM -> load_acquisition gives back the signal, B0, geometry for every vendor."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from qsmnode.acquisition import b0_direction_from_affine
from qsmnode.dicom.load import load_acquisition, load_acquisitions
from qsmnode.errors import InputRefused
from qsmnode.simulate.dicom_writer import WriterOptions
from qsmnode.simulate.scan import simulate_scan

SMALL = dict(matrix=(40, 36, 20), voxel_size_mm=(3.5, 3.5, 3.5))
PHASE_QUANTUM = 2 * np.pi / 4095  # 12-bit phase step (Siemens 2pi/4096, Philips 6284 mrad/4095)


def assert_round_trip(acq, scan, phase_tol=PHASE_QUANTUM):
    truth = scan.signal
    assert acq.signal.shape == truth.shape
    assert acq.signal.dtype == np.complex64
    bright = np.abs(truth) > 0.2 * np.abs(truth).max()
    dphi = np.angle(acq.signal * np.conj(truth))[bright]
    assert np.abs(dphi).max() <= phase_tol, np.abs(dphi).max()
    ratio = np.abs(acq.signal)[bright] / np.abs(truth)[bright]
    assert ratio.std() / ratio.mean() < 0.01  # magnitude up to one scanner scale factor
    np.testing.assert_allclose(acq.echo_times_s, scan.echo_times_s, rtol=1e-6)
    assert acq.b0_tesla == pytest.approx(scan.b0_tesla, rel=1e-6)
    np.testing.assert_allclose(acq.affine, scan.affine, atol=1e-3)
    np.testing.assert_allclose(acq.voxel_size_mm, SMALL["voxel_size_mm"], atol=1e-4)
    np.testing.assert_allclose(acq.b0_direction, scan.b0_direction, atol=1e-4)
    np.testing.assert_allclose(acq.b0_direction, b0_direction_from_affine(scan.affine), atol=1e-6)
    # the array-axis convention of DESIGN.md: vol[:, :, k] == pixel_array.T
    assert len(acq.source_instances) == acq.shape[2]
    assert all(acq.source_instances[k] for k in range(acq.shape[2]))
    assert acq.header.get("PatientID") and acq.header.get("StudyInstanceUID")
    assert "PixelData" not in acq.header
    assert any("ImagingFrequency" in line for line in acq.provenance)


@pytest.mark.parametrize(
    "vendor,field,orientation,oblique",
    [
        ("siemens", 3.0, "axial", 0.0),
        ("siemens", 1.5, "axial", 20.0),
        ("siemens", 7.0, "sagittal", 0.0),
        ("siemens-enhanced", 3.0, "axial", 45.0),
        ("siemens-enhanced", 7.0, "coronal", 0.0),
        ("ge", 3.0, "axial", 20.0),
        ("ge", 1.5, "coronal", 0.0),
        ("philips", 3.0, "sagittal", 20.0),
        ("philips", 7.0, "axial", 45.0),
        ("philips-enhanced", 1.5, "axial", 0.0),
        ("philips-enhanced", 3.0, "coronal", 20.0),
        ("canon", 3.0, "axial", 0.0),
    ],
)
def test_round_trip(tmp_path, vendor, field, orientation, oblique):
    scan = simulate_scan(
        tmp_path,
        vendor=vendor,
        field_tesla=field,
        orientation=orientation,
        oblique_deg=oblique,
        seed=2,
        **SMALL,
    )
    acq = load_acquisition([scan.dicom_dir])
    assert_round_trip(acq, scan, phase_tol=2e-3 if vendor != "ge" else 1.5e-3)
    assert acq.vendor == vendor.split("-")[0]
    if oblique:
        assert abs(acq.b0_direction[2]) < 0.99  # not (0, 0, 1)
    if vendor == "canon":
        assert not acq.phase_sign_validated and acq.warnings
    else:
        assert acq.phase_sign_validated and not acq.warnings
    assert abs(acq.b0_tesla - field) / field < 0.05  # a real field near the label, from frequency
    if vendor == "siemens" and field == 3.0:
        assert acq.b0_tesla == pytest.approx(2.8936, abs=1e-3)  # not 3


def test_ge_rules_recorded(tmp_path):
    scan = simulate_scan(tmp_path, vendor="ge", seed=1, **SMALL)
    acq = load_acquisition(scan.dicom_dir)
    text = "\n".join(acq.provenance)
    assert "real and imaginary" in text and "conjugated" in text and "alternate slices" in text


def test_ge_magnitude_phase_without_pi_offset(tmp_path):
    opts = WriterOptions(ge_components=("magnitude", "phase"), ge_slice_pi_offset=False)
    scan = simulate_scan(tmp_path, vendor="ge", seed=1, writer_options=opts, **SMALL)
    acq = load_acquisition([scan.dicom_dir])
    assert_round_trip(acq, scan, phase_tol=1.5e-3)
    assert any("milliradians" in p for p in acq.provenance)
    assert any("no alternate-slice" in p for p in acq.provenance)


def test_siemens_phase_without_rescale_and_xa_interop_study_uids(tmp_path):
    opts = WriterOptions(siemens_phase_rescale=False, xa_interop=True)
    scan = simulate_scan(tmp_path, vendor="siemens", seed=4, writer_options=opts, **SMALL)
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in scan.paths}
    assert len(studies) == 5  # one study UID per echo volume, as XA interoperability exports do
    acq = load_acquisition([scan.dicom_dir])
    assert_round_trip(acq, scan)
    assert any("unsigned phase" in p for p in acq.provenance)


def test_datasets_and_files_in_any_order(tmp_path):
    scan = simulate_scan(tmp_path, vendor="philips", seed=5, **SMALL)
    datasets = [pydicom.dcmread(p) for p in reversed(scan.paths)]
    acq = load_acquisition(datasets)
    assert_round_trip(acq, scan)


@pytest.mark.parametrize(
    "ts",
    [
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.RLELossless,
    ],
)
def test_transfer_syntaxes(tmp_path, ts):
    scan = simulate_scan(
        tmp_path,
        vendor="siemens",
        seed=6,
        transfer_syntax=ts,
        matrix=(32, 32, 12),
        voxel_size_mm=(4.0, 4.0, 4.0),
        echo_times_ms=[5, 12, 19],
    )
    assert (
        str(pydicom.dcmread(scan.paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        == ts
    )
    acq = load_acquisition([scan.dicom_dir])
    bright = np.abs(scan.signal) > 0.2 * np.abs(scan.signal).max()
    assert np.abs(np.angle(acq.signal * np.conj(scan.signal))[bright]).max() < 2e-3


def test_jpeg_lossless_from_dcmtk(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("/usr/bin/dcmcjpeg"):
        pytest.skip("DCMTK dcmcjpeg not installed")
    scan = simulate_scan(
        tmp_path / "s",
        vendor="siemens",
        seed=6,
        matrix=(32, 32, 10),
        voxel_size_mm=(4.0, 4.0, 4.0),
        echo_times_ms=[5, 12],
    )
    out = tmp_path / "jpeg"
    for p in scan.paths:
        target = out / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["/usr/bin/dcmcjpeg", "+e1", "+un", str(p), str(target)],
            check=True,
            capture_output=True,
        )
    ts = pydicom.dcmread(
        next(out.rglob("*.dcm")), stop_before_pixels=True
    ).file_meta.TransferSyntaxUID
    assert ts == pydicom.uid.JPEGLosslessSV1
    acq = load_acquisition([out])
    bright = np.abs(scan.signal) > 0.2 * np.abs(scan.signal).max()
    assert np.abs(np.angle(acq.signal * np.conj(scan.signal))[bright]).max() < 2e-3


def test_repeated_acquisitions_are_split_and_load_acquisition_refuses_two(tmp_path):
    a = simulate_scan(tmp_path / "a", vendor="siemens", seed=7, **SMALL)
    b = simulate_scan(
        tmp_path / "b",
        vendor="siemens",
        seed=8,
        writer_options=WriterOptions(extra={"AcquisitionTime": "111500.000000"}),
        **SMALL,
    )
    # same patient, same frame of reference and geometry: only the acquisition time tells them apart
    for p in b.paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = pydicom.dcmread(
            a.paths[0], stop_before_pixels=True
        ).FrameOfReferenceUID
        ds.save_as(p)
    acqs = load_acquisitions([a.dicom_dir, b.dicom_dir])
    assert len(acqs) == 2
    with pytest.raises(InputRefused, match="2 acquisitions found"):
        load_acquisition([a.dicom_dir, b.dicom_dir])
