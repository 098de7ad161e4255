"""Derived classic MR series, deterministic UIDs, durable writing, and every output's validity."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from qsmnode.acquisition import Acquisition, SourceReference
from qsmnode.recon.result import ReconResult, StepRecord


def oblique_affine(voxel_size_mm=(1.0, 1.2, 2.0), origin=(-90.0, -110.0, -40.0)) -> np.ndarray:
    """A 4x4 LPS affine, rotated 15 degrees about x then 10 about z (an oblique acquisition)."""
    a, b = np.deg2rad(15.0), np.deg2rad(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(voxel_size_mm)
    affine[:3, 3] = origin
    return affine


def source_header(series_number: int = 7) -> Dataset:
    header = Dataset()
    header.PatientName = "QSM^Phantom"
    header.PatientID = "QSM-0001"
    header.PatientBirthDate = "19700101"
    header.PatientSex = "O"
    header.StudyInstanceUID = generate_uid(entropy_srcs=["study", "qsmnode-test"])
    header.StudyDate = "20240102"
    header.StudyTime = "101500"
    header.StudyID = "1"
    header.AccessionNumber = "ACC123"
    header.ReferringPhysicianName = "Doe^Jane"
    header.StudyDescription = "MR brain"
    header.FrameOfReferenceUID = generate_uid(entropy_srcs=["for", "qsmnode-test"])
    header.PositionReferenceIndicator = ""
    header.Manufacturer = "SIEMENS"
    header.ManufacturerModelName = "Prisma"
    header.InstitutionName = "Test Hospital"
    header.StationName = "MR1"
    header.DeviceSerialNumber = "12345"
    header.SoftwareVersions = "syngo MR XA30"
    header.SeriesNumber = series_number
    header.MagneticFieldStrength = 3
    header.ImagingFrequency = 123.255
    header.ScanningSequence = "GR"
    header.SequenceVariant = ["SP", "SK"]
    header.ScanOptions = ""
    header.MRAcquisitionType = "3D"
    header.RepetitionTime = 30.0
    header.FlipAngle = 15
    header.SliceThickness = 2.0
    header.PatientPosition = "HFS"
    return header


def case_from_maps(chi_ppm, mask, affine, *, seed=0, n_echoes=3, warnings=()):
    """An Acquisition and a ReconResult around the given susceptibility map and mask."""
    rng = np.random.default_rng(seed)
    shape = tuple(chi_ppm.shape)
    voxel_size_mm = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    header = source_header()
    mag_series = generate_uid(entropy_srcs=["mag", str(seed)])
    phase_series = generate_uid(entropy_srcs=["phase", str(seed)])
    mr = "1.2.840.10008.5.1.4.1.1.4"
    instances = []
    for k in range(shape[2]):
        refs = []
        for e in range(n_echoes):
            for series, label in ((mag_series, "m"), (phase_series, "p")):
                refs.append(SourceReference(mr, generate_uid(entropy_srcs=[label, str(k),
                                                                           str(e), str(seed)]),
                                            series))
        instances.append(refs)
    te = np.array([0.005 + 0.006 * e for e in range(n_echoes)])
    signal = np.ones(shape + (n_echoes,), dtype=np.complex64)
    acquisition = Acquisition(
        signal=signal, echo_times_s=te, b0_tesla=123.255 / 42.57747892, affine=affine,
        vendor="siemens", phase_sign_validated=True, header=header,
        source_series_uids=(mag_series, phase_series), source_instances=instances,
        provenance=["siemens phase used as stored"], warnings=list(warnings))
    mask = np.asarray(mask, dtype=bool)
    r2star = (rng.random(shape) * 80.0).astype(np.float32) * mask
    swi = (rng.random(shape) * 700.0 + 100).astype(np.float32) * mask
    minip = np.minimum(swi, np.roll(swi, 1, axis=2))
    steps = [
        StepRecord("brain_mask", "magnitude threshold + morphology", "Smith SM. HBM 2002",
                   {"threshold": 0.2}, 0.1),
        StepRecord("unwrapping", "Laplacian", "Schofield MA, Zhu Y. Opt Lett 2003;28:1194",
                   {}, 0.2),
        StepRecord("echo_combination", "weighted linear fit", "Wu B et al. 2012",
                   {"echo_times_s": [float(t) for t in te]}, 0.1),
        StepRecord("background_removal", "V-SHARP", "Wu B et al. MRM 2012;67:137-147",
                   {"radii_mm": [12, 10, 8, 6, 4, 2], "tsvd": 0.05}, 0.5),
        StepRecord("dipole_inversion", "iLSQR", "Li W et al. NeuroImage 2015;108:111-122",
                   {"tolerance": 0.01, "max_iterations": 30}, 1.5),
        StepRecord("referencing", "whole-brain mean", "QSM consensus, MRM 2024", {}, 0.01),
    ]
    result = ReconResult(
        chi_ppm=np.asarray(chi_ppm, dtype=np.float32), mask=mask, r2star_per_s=r2star,
        t2star_ms=np.where(r2star > 0, 1000.0 / np.maximum(r2star, 1e-3), 0).astype(np.float32),
        swi=swi, minip=minip, total_field_hz=np.zeros(shape, np.float32),
        local_field_hz=np.zeros(shape, np.float32), field_noise_hz=np.ones(shape, np.float32),
        reference_region="whole_brain", reference_ppm={"whole_brain": 0.0, "csf": -0.012},
        steps=steps, preset={"name": "3T", "b0_tesla": 2.89, "inversion": "iLSQR"},
        quality={"mask_volume_ml": float(mask.sum() * np.prod(voxel_size_mm) / 1000),
                 "unreliable_phase_fraction": 0.03, "fit_residual": 0.012,
                 "seconds_total": 2.41},
        device="cpu", warnings=["test warning: nothing wrong"])
    return acquisition, result


def synthetic_case(shape=(40, 36, 24), voxel_size_mm=(1.0, 1.2, 2.0), seed=0,
                   n_echoes=3, warnings=()) -> tuple[Acquisition, ReconResult]:
    """An oblique acquisition and a result with one paramagnetic and one diamagnetic sphere,
    a voxel beyond the int16 range inside the mask and a large value outside it."""
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2.0
    r2 = ((ii - c[0]) / (shape[0] * 0.42)) ** 2 + ((jj - c[1]) / (shape[1] * 0.42)) ** 2 + (
        (kk - c[2]) / (shape[2] * 0.45)) ** 2
    mask = r2 < 1.0
    chi = rng.normal(0.0, 0.02, shape)
    p = np.array(shape) * [0.35, 0.33, 0.5]
    d = np.array(shape) * [0.65, 0.61, 0.42]
    chi[(ii - p[0]) ** 2 + (jj - p[1]) ** 2 + ((kk - p[2]) * 2) ** 2 <= 9] = 0.9
    chi[(ii - d[0]) ** 2 + (jj - d[1]) ** 2 + ((kk - d[2]) * 2) ** 2 <= 9] = -0.7
    centre = tuple(int(n) // 2 for n in shape)
    chi[centre] = 50.0  # inside the mask: clipped to 32767 ppb
    chi[1, 1, 1] = 3.0  # outside the mask: stored as 0
    chi = chi.astype(np.float32)
    return case_from_maps(chi, mask, oblique_affine(voxel_size_mm), seed=seed,
                          n_echoes=n_echoes, warnings=warnings)


# ----------------------------------------------------------------------------------------------
import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from qsmnode.dicom import outputs, uids  # noqa: E402
from qsmnode.dicom.outputs import build_output_datasets  # noqa: E402
from qsmnode.dicom.write import output_kind, write_datasets  # noqa: E402
from qsmnode.errors import InputRefused  # noqa: E402

import tests.dciodvfy as dciodvfy  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    acquisition, result = synthetic_case(warnings=("phase sign of vendor X not validated",))
    datasets = build_output_datasets(acquisition, result)
    out = tmp_path_factory.mktemp("outputs")
    paths = write_datasets(datasets, out)
    return acquisition, result, datasets, paths, out


def read_series(out: Path, kind: str) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((out / kind).glob("*.dcm"))]


def volume_from_series(datasets) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild ``[i, j, k]`` (stored values) and the affine from classic slices (DESIGN axes)."""
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets = sorted(datasets, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    vol = np.stack([d.pixel_array.T for d in datasets], axis=2)
    ps = [float(v) for v in datasets[0].PixelSpacing]
    p0 = np.array(datasets[0].ImagePositionPatient, dtype=float)
    p1 = np.array(datasets[1].ImagePositionPatient, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * ps[1]
    affine[:3, 1] = iop[3:] * ps[0]
    affine[:3, 2] = p1 - p0
    affine[:3, 3] = p0
    return vol, affine


def test_every_kind_is_written_where_a_person_finds_it(written):
    _, result, datasets, paths, out = written
    n_k = result.chi_ppm.shape[2]
    kinds = sorted(p.name for p in out.iterdir())
    assert kinds == ["MINIP", "QSM", "QSM_PM", "R2STAR", "SR", "SUMMARY", "SWI"]
    for kind in ("QSM", "SWI", "MINIP", "R2STAR"):
        assert len(list((out / kind).glob("*.dcm"))) == n_k
    assert len(paths) == len(datasets) == 4 * n_k + 3
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"


def test_qsm_series_gives_back_the_map_in_ppb(written):
    acquisition, result, _, _, out = written
    series = read_series(out, "QSM")
    vol, affine = volume_from_series(series)
    expected = np.clip(np.rint(result.chi_ppm.astype(np.float64) * 1000), -32768, 32767)
    expected[~result.mask] = 0
    assert vol.dtype == np.int16
    np.testing.assert_array_equal(vol, expected.astype(np.int16))
    assert vol[20, 18, 12] == 32767  # 50 ppm clipped, not wrapped (centre voxel)
    assert vol[1, 1, 1] == 0  # outside the mask
    assert series[0].PixelRepresentation == 1
    assert float(series[0].RescaleSlope) == 1.0 and float(series[0].RescaleIntercept) == 0.0
    assert float(series[0].WindowCenter) == 0 and float(series[0].WindowWidth) == 300
    np.testing.assert_allclose(affine, acquisition.affine, atol=1e-6)


def test_r2star_swi_minip_encoding(written):
    _, result, _, _, out = written
    r2, _ = volume_from_series(read_series(out, "R2STAR"))
    ds = read_series(out, "R2STAR")[0]
    assert r2.dtype == np.uint16 and float(ds.RescaleSlope) == 0.1
    np.testing.assert_allclose(r2 * 0.1, result.r2star_per_s, atol=0.05 + 1e-6)
    swi, _ = volume_from_series(read_series(out, "SWI"))
    minip, _ = volume_from_series(read_series(out, "MINIP"))
    assert swi.dtype == np.uint16 and minip.dtype == np.uint16
    scale = 4095 / max(result.swi.max(), result.minip.max())
    np.testing.assert_allclose(swi, result.swi * scale, atol=0.5 + 1e-6)
    assert np.all(minip <= swi)  # same scale, so the projection stays below the image


def test_study_geometry_and_provenance(written):
    acquisition, _, _, _, out = written
    header = acquisition.header
    for kind in ("QSM", "SWI", "MINIP", "R2STAR"):
        series = read_series(out, kind)
        series_uids = {d.SeriesInstanceUID for d in series}
        assert len(series_uids) == 1 and series_uids.isdisjoint(acquisition.source_series_uids)
        for ds in series[:3]:
            for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber",
                            "StudyDate", "FrameOfReferenceUID"):
                assert ds[keyword].value == header[keyword].value, keyword
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", kind]
            assert ds.SeriesDescription.startswith(kind)
            assert ds.SOPClassUID == pydicom.uid.MRImageStorage
            k = ds.InstanceNumber - 1
            np.testing.assert_allclose(ds.ImagePositionPatient,
                                       (acquisition.affine @ [0, 0, k, 1])[:3], atol=1e-5)
            refs = {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence}
            assert refs == {r.sop_instance_uid for r in acquisition.source_instances[k]}
            assert {s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence} == set(
                acquisition.source_series_uids)
            equipment = {e.Manufacturer: e for e in ds.ContributingEquipmentSequence}
            assert equipment["qsmnode"].SoftwareVersions == qsmnode_version()
            assert equipment["qsmnode"].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
            assert ds.DerivationCodeSequence[0].CodeValue
            assert "V-SHARP" in ds.DerivationDescription


def qsmnode_version():
    import qsmnode

    return qsmnode.__version__


def test_uids_are_deterministic_unique_and_versioned():
    acquisition, result = synthetic_case(shape=(12, 10, 6))
    first = build_output_datasets(acquisition, result, summary_image=False)
    again = build_output_datasets(acquisition, result, summary_image=False)
    other = build_output_datasets(acquisition, result, summary_image=False,
                                  software_version="9.9.9")
    sop = [d.SOPInstanceUID for d in first]
    assert sop == [d.SOPInstanceUID for d in again]
    assert [d.SeriesInstanceUID for d in first] == [d.SeriesInstanceUID for d in again]
    assert len(set(sop)) == len(sop)
    assert set(sop).isdisjoint(d.SOPInstanceUID for d in other)
    for uid in sop:
        assert len(uid) <= 64 and uid.startswith("2.25.")
        pydicom.uid.UID(uid).is_valid
    assert uids.series_uid(["a", "b"], "1", "QSM") == uids.series_uid(["b", "a"], "1", "QSM")


def test_rewrite_replaces_and_duplicates_are_refused(tmp_path):
    acquisition, result = synthetic_case(shape=(12, 10, 6))
    datasets = build_output_datasets(acquisition, result, parametric_map=False,
                                     summary_image=False)
    first = write_datasets(datasets, tmp_path)
    second = write_datasets(datasets, tmp_path)
    assert first == second and len(list(tmp_path.rglob("*.dcm"))) == len(datasets)
    assert output_kind(datasets[0]) == "QSM"
    with pytest.raises(ValueError, match="InstanceNumber"):
        write_datasets([datasets[0], datasets[0]], tmp_path / "dup")


def test_source_without_frame_of_reference_is_refused():
    acquisition, result = synthetic_case(shape=(12, 10, 6))
    del acquisition.header.FrameOfReferenceUID
    with pytest.raises(InputRefused, match="FrameOfReferenceUID"):
        build_output_datasets(acquisition, result)


def test_optional_outputs_can_be_switched_off():
    acquisition, result = synthetic_case(shape=(12, 10, 6))
    datasets = build_output_datasets(acquisition, result, parametric_map=False,
                                     summary_image=False)
    kinds = {output_kind(d) for d in datasets}
    assert kinds == {"QSM", "SWI", "MINIP", "R2STAR", "SR"}


@pytest.mark.skipif(not dciodvfy.AVAILABLE, reason="dicom3tools dciodvfy not installed")
@pytest.mark.parametrize("kind", ["QSM", "SWI", "MINIP", "R2STAR", "QSM_PM", "SR", "SUMMARY"])
def test_dciodvfy_accepts_every_output_kind(written, kind):
    out = written[4]
    files = sorted((out / kind).glob("*.dcm"))
    for path in {files[0], files[-1]}:
        dciodvfy.assert_valid(path)


def test_dciodvfy_helper_reports_errors(tmp_path):
    if not dciodvfy.AVAILABLE:
        pytest.skip("dicom3tools dciodvfy not installed")
    acquisition, result = synthetic_case(shape=(12, 10, 6))
    ds = outputs.build_classic_series(acquisition, result, "QSM",
                                      outputs.qsm_to_ppb(result.chi_ppm, result.mask),
                                      software_version="0", when=datetime.datetime.now())[0]
    del ds.StudyInstanceUID
    del ds.Modality
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy.validate(path)
    assert errors
    with pytest.raises(AssertionError):
        dciodvfy.assert_valid(path)


def test_series_are_written_and_reported_one_at_a_time_most_important_first(tmp_path):
    """``write_series`` reports each series once it is durable, in SERIES_ORDER; while the QSM is
    being reported nothing after it is on disk (one writer), and the files are the ones that
    ``build_output_datasets`` gives."""
    from qsmnode.dicom.outputs import SERIES_ORDER, iter_output_series
    from qsmnode.process import write_series

    acquisition, result = synthetic_case(shape=(12, 10, 6))
    reports = []

    def on_series(series):
        on_disk = sorted(d.name for d in tmp_path.iterdir() if d.is_dir())
        reports.append((series.kind, on_disk, all(p.is_file() for p in series.paths)))

    written = write_series(iter_output_series(acquisition, result), tmp_path, on_series=on_series)
    assert [w.kind for w in written] == list(SERIES_ORDER)
    for n, (kind, on_disk, complete) in enumerate(reports):
        assert kind == SERIES_ORDER[n] and complete
        assert on_disk == sorted(SERIES_ORDER[:n + 1]), (kind, on_disk)
    expected = build_output_datasets(acquisition, result)
    uids = [pydicom.dcmread(p).SOPInstanceUID for w in written for p in w.paths]
    assert uids == [d.SOPInstanceUID for d in expected]


def test_a_failure_while_building_keeps_the_series_written_before(tmp_path):
    from qsmnode.dicom.outputs import iter_output_series
    from qsmnode.process import write_series

    acquisition, result = synthetic_case(shape=(12, 10, 6))
    reported = []

    def failing():
        for n, item in enumerate(iter_output_series(acquisition, result)):
            if n == 2:
                raise RuntimeError("cannot build MINIP")
            yield item

    with pytest.raises(RuntimeError, match="cannot build MINIP"):
        write_series(failing(), tmp_path, on_series=lambda s: reported.append(s.kind))
    assert reported == ["QSM", "SWI"]
    assert sorted(d.name for d in tmp_path.iterdir()) == ["QSM", "SWI"]
    assert len(list((tmp_path / "QSM").glob("*.dcm"))) == 6

    def refusing_callback(series):
        raise OSError("the parent is gone")

    with pytest.raises(OSError, match="the parent is gone"):  # nothing after a failed report
        write_series(iter_output_series(acquisition, result), tmp_path / "again", on_series=refusing_callback)
    assert sorted(d.name for d in (tmp_path / "again").iterdir()) == ["QSM"]
