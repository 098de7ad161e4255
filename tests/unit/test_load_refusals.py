"""The loader refuses what cannot be reconstructed, saying what was wrong (and loads the rest)."""

from __future__ import annotations

import copy

import pydicom
import pytest

from qsmnode.dicom.classify import REFUSAL_PHASE_DIFFERENCE
from qsmnode.dicom.load import load_acquisition, load_acquisitions
from qsmnode.errors import InputRefused
from qsmnode.simulate.scan import simulate_scan

N_SLICES, N_ECHOES = 12, 3


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return simulate_scan(
        tmp_path_factory.mktemp("refusals"),
        vendor="siemens",
        matrix=(28, 28, N_SLICES),
        voxel_size_mm=(5.0, 5.0, 5.0),
        echo_times_ms=[5, 12, 19],
        seed=9,
    )


@pytest.fixture
def datasets(scan):
    if not hasattr(scan, "_datasets"):
        scan._datasets = [pydicom.dcmread(p) for p in scan.paths]
    return [copy.deepcopy(ds) for ds in scan._datasets]


def _is(ds, comp=None, echo=None, slice_index=None):
    ok = True
    if comp:
        ok &= ("P" if comp == "phase" else "M") in ds.ImageType[2:3]
    if echo is not None:
        ok &= int(ds.EchoNumbers) == echo
    if slice_index is not None:
        ok &= (int(ds.InstanceNumber) - 1) % N_SLICES == slice_index
    return ok


def refused(sources, *patterns):
    with pytest.raises(InputRefused) as info:
        load_acquisition(sources)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_complete_scan_loads(datasets):
    acq = load_acquisition(datasets)
    assert acq.shape[2] == N_SLICES and acq.n_echoes == N_ECHOES


def test_missing_middle_slice_names_the_gap(datasets):
    kept = [ds for ds in datasets if not _is(ds, slice_index=5)]
    refused(kept, "slice spacing is irregular", "1 slice(s) missing")


def test_missing_edge_slice_caught_by_images_in_acquisition(datasets):
    kept = [ds for ds in datasets if not _is(ds, slice_index=N_SLICES - 1)]
    refused(kept, "ImagesInAcquisition", f"of the {N_SLICES * N_ECHOES} images")


def test_missing_single_phase_image_says_which(datasets):
    kept = [ds for ds in datasets if not _is(ds, "phase", echo=2, slice_index=3)]
    refused(kept, "echo 2 (TE 12 ms) phase: 1 of 12 slices missing")


def test_missing_phase_echo(datasets):
    kept = [ds for ds in datasets if not _is(ds, "phase", echo=3)]
    refused(kept, "echo 3 (TE 19 ms) has no phase images")


def test_magnitude_without_phase(datasets):
    refused([ds for ds in datasets if _is(ds, "magnitude")], "magnitude without phase")


def test_phase_at_one_echo_only_is_a_phase_difference_map(datasets):
    kept = [ds for ds in datasets if _is(ds, "magnitude") or _is(ds, "phase", echo=2)]
    for ds in kept:
        ds.ImagesInAcquisition = None
    refused(kept, REFUSAL_PHASE_DIFFERENCE.split(":")[0])


@pytest.mark.parametrize(
    "image_type,pattern",
    [
        (["DERIVED", "PRIMARY", "M", "SWI"], "SWI"),
        (["DERIVED", "PRIMARY", "MNIP"], "minIP"),
        (["ORIGINAL", "PRIMARY", "M", "MOCO"], "MOCO"),
        (["ORIGINAL", "PRIMARY", "M", "ND", "FIL"], "FIL"),
        (["DERIVED", "SECONDARY", "QSM"], "QSM"),
        (["ORIGINAL", "PRIMARY", "B0", "FIELD_MAP"], "scanner field map (Hz), not phase"),
    ],
)
def test_derived_and_field_map_series_are_refused(datasets, image_type, pattern):
    for ds in datasets:
        ds.ImageType = image_type
    refused(datasets, pattern, "send")


def test_derived_series_next_to_the_originals_is_skipped(datasets):
    swi = [copy.deepcopy(ds) for ds in datasets if _is(ds, "magnitude")]
    for ds in swi:
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "SWI"]
        ds.SeriesInstanceUID = ds.SeriesInstanceUID[:60] + ".9"
        ds.SOPInstanceUID = ds.SOPInstanceUID[:60] + ".9"
    acq = load_acquisition(datasets + swi)
    assert acq.n_echoes == N_ECHOES


def test_uncombined_coil_images(datasets):
    for ds in datasets:
        ds[0x0051, 0x100F].value = "H12"
    refused(datasets, "uncombined coil image", "H12")


def test_2d_stack_with_gaps(datasets):
    for ds in datasets:
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = "3"
    refused(datasets, "2D stack with gaps")


def test_sheared_stack_is_inconsistent_geometry(datasets):
    for ds in datasets:
        if _is(ds, slice_index=4):
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [pos[0] + 4.0, pos[1], pos[2]]
    refused(datasets, "inconsistent geometry")


def test_lossy_transfer_syntax(datasets):
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    refused(datasets, "unsupported transfer syntax", "JPEG Baseline")


def test_not_mr(datasets):
    for ds in datasets:
        ds.Modality = "CT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    refused(datasets, "not an MR image")


def test_folder_with_other_files_and_nothing_dicom(tmp_path, scan):
    (tmp_path / "README.txt").write_text("not DICOM")
    with pytest.raises(InputRefused, match="no DICOM images found"):
        load_acquisitions([tmp_path])
    acq = load_acquisition([scan.dicom_dir, tmp_path])  # stray files are ignored
    assert acq.n_echoes == N_ECHOES
    with pytest.raises(InputRefused, match="no such file"):
        load_acquisitions([tmp_path / "missing"])


def test_reasons_quote_header_numbers_plainly(datasets):
    """Issue 13 item 12: a reason shows "ImageOrientationPatient [1, 0, 0, 0.5, 0.5, 0]", never a
    Python repr such as "[np.float64(1.0), ...]"."""
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0.5, 0.5, 0]
    message = refused(datasets, "ImageOrientationPatient [1, 0, 0, 0.5, 0.5, 0] is not two orthogonal")
    assert "np." not in message


def test_non_positive_echo_time_is_quoted_plainly(datasets):
    for ds in datasets:
        if int(ds.EchoNumbers) == 1:
            ds.EchoTime = -5
    message = refused(datasets, "echo times (-5, 12, 19 ms) include a non-positive value")
    assert "np." not in message
