"""simulate_scan writes realistic vendor DICOM and a truth that matches it."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from qsmnode.acquisition import GYROMAGNETIC_RATIO_MHZ_PER_T, b0_direction_from_affine
from qsmnode.dicom.load import load_acquisition
from qsmnode.simulate.scan import default_echo_times_ms, simulate_scan

SMALL = dict(matrix=(40, 44, 24), voxel_size_mm=(4.0, 4.0, 4.0))


def test_truth_files_and_headers(tmp_path):
    scan = simulate_scan(
        tmp_path, vendor="siemens", field_tesla=3.0, oblique_deg=20, seed=1, **SMALL
    )
    chi = np.load(scan.truth_dir / "chi_ppm.npy")
    labels = np.load(scan.truth_dir / "labels.npy")
    mask = np.load(scan.truth_dir / "brain_mask.npy")
    assert chi.shape == labels.shape == mask.shape == (40, 44, 24)
    assert mask.dtype == bool and 0.05 < mask.mean() < 0.9
    truth = json.loads((scan.truth_dir / "truth.json").read_text())
    assert truth["labels"]["microbleed"] != truth["labels"]["calcification"]
    assert truth["echo_times_s"] == pytest.approx([0.004, 0.010, 0.016, 0.022, 0.028])
    np.testing.assert_allclose(
        truth["b0_direction"], b0_direction_from_affine(np.array(truth["affine"]))
    )
    assert truth["b0_direction"][2] == pytest.approx(np.cos(np.radians(20)), abs=1e-6)
    for focus in truth["microbleeds"]:
        assert chi[tuple(focus["center_ijk"])] > 0.3  # paramagnetic
    for focus in truth["calcifications"]:
        assert chi[tuple(focus["center_ijk"])] < -0.3  # diamagnetic

    ds = pydicom.dcmread(scan.paths[0], stop_before_pixels=True)
    assert float(ds.MagneticFieldStrength) == 3.0
    assert float(ds.ImagingFrequency) == pytest.approx(123.2, abs=0.1)  # a 2.89 T "3 T" Siemens
    assert truth["b0_tesla"] == pytest.approx(
        float(ds.ImagingFrequency) / GYROMAGNETIC_RATIO_MHZ_PER_T
    )
    assert ds.PatientName and ds.PatientID and ds.StudyInstanceUID and ds.FrameOfReferenceUID
    assert ds.ProtocolName and ds.SeriesDescription and int(ds.ImagesInAcquisition) == 24 * 5
    assert scan.dicom_dir.is_dir() and all(p.is_file() for p in scan.paths)


def test_deterministic_for_a_seed(tmp_path):
    a = simulate_scan(
        tmp_path / "a",
        vendor="ge",
        seed=4,
        matrix=(24, 24, 8),
        voxel_size_mm=(6, 6, 6),
        echo_times_ms=[5, 12],
    )
    b = simulate_scan(
        tmp_path / "b",
        vendor="ge",
        seed=4,
        matrix=(24, 24, 8),
        voxel_size_mm=(6, 6, 6),
        echo_times_ms=[5, 12],
    )
    assert [p.name for p in a.paths] == [p.name for p in b.paths]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a.paths, b.paths))


def test_default_echo_times_suit_the_field():
    assert (
        default_echo_times_ms(1.5)[-1]
        > default_echo_times_ms(3.0)[-1]
        > default_echo_times_ms(7.0)[-1]
    )
    assert len(default_echo_times_ms(3.0)) == 5


def test_philips_instance_numbers_arrive_in_random_order(tmp_path):
    scan = simulate_scan(
        tmp_path,
        vendor="philips",
        seed=2,
        matrix=(24, 24, 8),
        voxel_size_mm=(6, 6, 6),
        echo_times_ms=[5, 12],
    )
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in scan.paths]
    assert sorted(numbers) == list(range(1, len(numbers) + 1)) and numbers != sorted(numbers)


@pytest.mark.parametrize("orientation", ["sagittal", "coronal"])
def test_anatomy_stays_upright_for_other_slab_orientations(tmp_path, orientation):
    """The head's superior end is at +z in patient space whatever the slab orientation."""
    scan = simulate_scan(
        tmp_path,
        vendor="siemens",
        orientation=orientation,
        seed=1,
        matrix=(40, 40, 40),
        voxel_size_mm=(5, 5, 5),
        echo_times_ms=[5, 12],
    )
    acq = load_acquisition(scan.dicom_dir)
    mask = np.load(scan.truth_dir / "brain_mask.npy")
    ijk = np.argwhere(mask)
    lps = ijk @ acq.affine[:3, :3].T + acq.affine[:3, 3]
    axial = simulate_scan(
        tmp_path / "ax",
        vendor="siemens",
        seed=1,
        matrix=(40, 40, 40),
        voxel_size_mm=(5, 5, 5),
        echo_times_ms=[5, 12],
    )
    ax_mask = np.load(axial.truth_dir / "brain_mask.npy")
    ax_lps = np.argwhere(ax_mask) @ axial.affine[:3, :3].T + axial.affine[:3, 3]
    # same brain, same place in patient space (centroid within a voxel)
    np.testing.assert_allclose(lps.mean(axis=0), ax_lps.mean(axis=0), atol=5.0)
    assert mask.sum() == ax_mask.sum()
