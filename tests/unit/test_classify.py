"""classify_instance: header-only facts the series tracker needs, for every vendor flavour."""

from __future__ import annotations

import pydicom
import pytest

from qsmnode.dicom.classify import classify_instance
from qsmnode.simulate.dicom_writer import WriterOptions
from qsmnode.simulate.scan import simulate_scan

SMALL = dict(matrix=(24, 24, 8), voxel_size_mm=(6.0, 6.0, 6.0), echo_times_ms=[5, 12, 19])


def infos(scan):
    return [classify_instance(pydicom.dcmread(p, stop_before_pixels=True)) for p in scan.paths]


@pytest.mark.parametrize(
    "vendor,components,expected",
    [
        ("siemens", {"magnitude", "phase"}, 8 * 3),
        ("ge", {"magnitude", "phase", "real", "imaginary"}, 8 * 3 * 4),
        ("philips", {"magnitude", "phase"}, None),
        ("siemens-enhanced", {"magnitude", "phase"}, None),
        ("philips-enhanced", {"mixed"}, 1),
        ("canon", {"magnitude", "phase"}, None),
    ],
)
def test_one_key_per_acquisition_components_and_expected_counts(
    tmp_path, vendor, components, expected
):
    scan = simulate_scan(tmp_path, vendor=vendor, seed=3, **SMALL)
    result = infos(scan)
    assert {i.acquisition_key for i in result} == {result[0].acquisition_key}
    assert {i.component for i in result} == components
    assert {i.expected_in_series for i in result} == {expected}
    assert all(i.refusal is None for i in result)
    assert {i.vendor for i in result} == {vendor.split("-")[0]}
    assert all(i.modality == "MR" and i.sop_instance_uid and i.series_instance_uid for i in result)
    if vendor in ("siemens", "ge", "philips", "canon"):
        assert {n for i in result for n in i.echo_numbers} == {1, 2, 3}
    if vendor == "philips-enhanced":
        assert result[0].echo_numbers == (1, 2, 3)


def test_key_ignores_uids_and_descriptions_but_not_geometry(tmp_path):
    scan = simulate_scan(
        tmp_path / "a",
        vendor="siemens",
        seed=3,
        writer_options=WriterOptions(xa_interop=True),
        **SMALL,
    )
    result = infos(scan)
    assert len({i.study_instance_uid for i in result}) == 3  # XA interoperability export
    assert len({i.series_instance_uid for i in result}) == 2
    assert len({i.acquisition_key for i in result}) == 1
    other = simulate_scan(tmp_path / "b", vendor="siemens", seed=3, oblique_deg=10, **SMALL)
    assert infos(other)[0].acquisition_key != result[0].acquisition_key


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"ImageType": ["DERIVED", "PRIMARY", "M", "SWI"]}, "SWI"),
        ({"ImageType": ["DERIVED", "PRIMARY", "MNIP"]}, "minIP"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "M", "MOCO"]}, "MOCO"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "FIL"]}, "FIL"),
        ({"ImageType": ["DERIVED", "PRIMARY", "PROJECTION IMAGE"]}, "projection"),
        ({"ImageType": ["DERIVED", "SECONDARY", "OTHER"]}, "derived image"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "B0MAP"]}, "scanner field map (Hz)"),
        ({"SequenceName": "*fm2d2r"}, "phase-difference field map, not per-echo phase"),
        ({"ScanningSequence": "SE"}, "not a gradient-echo"),
        ({"Modality": "CT"}, "not an MR image"),
    ],
)
def test_refusals(tmp_path, change, pattern):
    scan = simulate_scan(tmp_path, vendor="siemens", seed=3, **SMALL)
    ds = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    assert classify_instance(ds).refusal is None
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    refusal = classify_instance(ds).refusal
    assert refusal and pattern in refusal
    assert "send" in refusal or "QSM needs" in refusal  # says what the sender can do


def test_classify_does_not_read_pixel_data(tmp_path):
    scan = simulate_scan(tmp_path, vendor="philips-enhanced", seed=3, **SMALL)
    ds = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    assert "PixelData" not in ds
    info = classify_instance(ds)
    assert info.component == "mixed" and info.refusal is None
