"""Summary Secondary Capture: key slice of QSM and SWI, ppb bar, findings as burned-in text."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

import tests.dciodvfy as dciodvfy
from qsmnode.report.findings import Focus, find_foci
from qsmnode.report.summary_image import (
    DIAMAGNETIC_RGB,
    PARAMAGNETIC_RGB,
    build_summary_images,
    key_slice,
    render_summary,
)
from test_outputs import synthetic_case
from test_sr import plausible_review


def _colour_pixels(rgb: np.ndarray, colour) -> int:
    return int(np.all(rgb == np.array(colour, dtype=np.uint8), axis=-1).sum())


def test_key_slice_is_the_most_extreme_focus_or_the_largest_brain_section():
    mask = np.zeros((8, 8, 10), bool)
    mask[2:6, 2:6, 3:8] = True
    mask[1:7, 1:7, 6] = True
    assert key_slice(mask, []) == 6
    foci = [Focus("paramagnetic", (3.0, 3.0, 4.2), 8.0, 0.3, 0.4, 1.0, 2.5, 1),
            Focus("diamagnetic", (4.0, 4.0, 7.4), 8.0, -0.5, -0.9, 1.0, 2.5, 1)]
    assert key_slice(mask, foci) == 7


def test_render_marks_foci_and_lists_them():
    acquisition, result = synthetic_case()
    foci = find_foci(result.chi_ppm, result.mask, acquisition.voxel_size_mm)
    rgb, k = render_summary(result.chi_ppm, result.swi, result.mask, acquisition.voxel_size_mm,
                            foci, lines=["header line"])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert k == key_slice(result.mask, foci)
    # paramagnetic foci circled and listed in red, the calcification listed in cyan
    assert _colour_pixels(rgb, PARAMAGNETIC_RGB) > 50
    assert _colour_pixels(rgb, DIAMAGNETIC_RGB) > 20
    text_area = rgb[rgb.shape[0] - 250:]
    assert text_area.max() == 255  # text was drawn
    empty, _ = render_summary(np.zeros_like(result.chi_ppm), result.swi, result.mask,
                              acquisition.voxel_size_mm, [])
    assert _colour_pixels(empty, PARAMAGNETIC_RGB) == 0


def test_secondary_capture_attributes(tmp_path):
    acquisition, result = synthetic_case()
    (ds,) = build_summary_images(acquisition, result, plausible_review(acquisition, result),
                                 software_version="0.1.0")
    path = tmp_path / "summary.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.BurnedInAnnotation == "YES"
    assert back.StudyInstanceUID == acquisition.header.StudyInstanceUID
    assert back.SeriesDescription.startswith("SUMMARY")
    assert back.PhotometricInterpretation == "RGB"
    assert back.pixel_array.shape == (back.Rows, back.Columns, 3)
    if dciodvfy.AVAILABLE:
        dciodvfy.assert_valid(path)
    else:
        pytest.skip("dicom3tools dciodvfy not installed")
