"""Plausibility checks of a reconstruction (qsmnode.recon.plausibility), each on synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from qsmnode.recon import plausibility as p
from qsmnode.recon.result import StepRecord
from test_outputs import case_from_maps, oblique_affine


def ellipsoid_mask(shape, voxel_size_mm, semi_axes_mm, centre_mm=None) -> np.ndarray:
    """Bool ``[i, j, k]`` ellipsoid with semi-axes in mm (centred in the array by default)."""
    vox = np.asarray(voxel_size_mm, dtype=float)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * d for n, d in zip(shape, vox)], indexing="ij")
    centre = np.asarray(shape) * vox / 2.0 if centre_mm is None else np.asarray(centre_mm)
    r2 = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi_axes_mm))
    return r2 < 1.0


def volume_ml(mask, vox) -> float:
    return float(mask.sum() * np.prod(vox) / 1000.0)


VOX3 = (3.0, 3.0, 3.0)
ADULT_BRAIN_SEMI_MM = (68.0, 84.0, 58.0)  # ~1.39 L
HEAD_WITH_SCALP_SEMI_MM = (85.0, 100.0, 80.0)  # ~2.85 L: the scalp and skull base inside


# ----------------------------------------------------------------------------- patient age
@pytest.mark.parametrize("age, expected", [("041Y", 41.0), ("006M", 0.5), ("010W", 10 * 7 / 365.25),
                                           ("003D", 3 / 365.25)])
def test_patient_age_from_age_string(age, expected):
    header = Dataset()
    header.PatientAge = age
    assert p.patient_age_years(header) == pytest.approx(expected)


def test_patient_age_from_birth_and_study_date_or_unknown():
    header = Dataset()
    header.PatientBirthDate = "20200101"
    header.StudyDate = "20230701"
    assert p.patient_age_years(header) == pytest.approx(3.5, abs=0.01)
    assert p.patient_age_years(Dataset()) is None
    header.PatientAge = ""  # empty type-2 attribute: falls back to the dates
    assert p.patient_age_years(header) == pytest.approx(3.5, abs=0.01)


def test_plausible_mask_volume_by_age():
    assert p.plausible_mask_volume_ml(None) == pytest.approx((825.0, 1995.0))  # adult ICV 1.1-1.9 L
    assert p.plausible_mask_volume_ml(41) == p.plausible_mask_volume_ml(None)
    infant_low, infant_high = p.plausible_mask_volume_ml(0.5)
    assert infant_low < 300 and 1000 <= infant_high <= 1100  # infants ICV ~0.35-1.0 L
    child = p.plausible_mask_volume_ml(2.0)
    assert infant_high < child[1] < p.plausible_mask_volume_ml(None)[1]


# ----------------------------------------------------------------------------- mask volume
def test_adult_brain_mask_is_plausible():
    mask = ellipsoid_mask((64, 72, 56), VOX3, ADULT_BRAIN_SEMI_MM)
    assert 1200 < volume_ml(mask, VOX3) < 1600
    assert p.check_mask_volume(mask, VOX3) is None


def test_mask_with_the_scalp_is_too_large_even_when_the_slab_cuts_it():
    mask = ellipsoid_mask((64, 72, 53), VOX3, HEAD_WITH_SCALP_SEMI_MM)  # touches k = 0 and 52
    assert mask[:, :, 0].any() and mask[:, :, -1].any()
    concern = p.check_mask_volume(mask, VOX3)
    assert concern is not None and concern.check == "mask_volume"
    assert "larger than a plausible intracranial volume" in concern.message
    assert "scalp" in concern.message and concern.value == pytest.approx(volume_ml(mask, VOX3))


def test_too_small_mask_of_a_whole_brain_scan_is_flagged():
    mask = ellipsoid_mask((64, 72, 56), VOX3, (45.0, 55.0, 40.0))  # 0.41 L, inside the slab
    concern = p.check_mask_volume(mask, VOX3)
    assert concern is not None and "smaller than plausible" in concern.message
    assert "scaled" not in concern.message  # the whole brain was covered


def test_thin_slab_is_not_flagged_as_too_small_but_judged_by_its_coverage():
    """A 30 mm axial slab through an adult brain holds ~0.45 L: plausible for its coverage,
    not flagged; the same slab with only a small blob in it is still flagged."""
    vox = (1.0, 1.0, 2.0)
    shape = (180, 200, 15)  # 30 mm along k
    brain = ellipsoid_mask(shape, vox, ADULT_BRAIN_SEMI_MM, centre_mm=(90, 100, 15))
    assert brain[:, :, 0].any() and brain[:, :, -1].any()
    assert 300 < volume_ml(brain, vox) < 800
    assert p.covered_fraction(brain, vox) < 0.5
    assert p.check_mask_volume(brain, vox) is None
    blob = ellipsoid_mask(shape, vox, (20.0, 20.0, 40.0), centre_mm=(90, 100, 15))
    concern = p.check_mask_volume(blob, vox)
    assert concern is not None and "slab can hold" in concern.message


def test_oblique_slab_coverage_uses_the_patient_direction():
    """The same thin slab, cut along patient S-I (125 mm) or A-P (170 mm): the cap height
    relative to the brain's extent, hence the covered fraction, differs."""
    mask = np.zeros((40, 40, 10), bool)
    mask[5:35, 5:35, :] = True  # touches k = 0 and k = 9: 10 slices x 3 mm = 30 mm
    axial = np.diag([3.0, 3.0, 3.0, 1.0])
    coronal = np.array([[3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])  # k along A-P
    h_si, h_ap = 30 / 125, 30 / 170
    assert p.covered_fraction(mask, VOX3, axial) == pytest.approx(h_si ** 2 * (3 - 2 * h_si))
    assert p.covered_fraction(mask, VOX3, coronal) == pytest.approx(h_ap ** 2 * (3 - 2 * h_ap))


def test_an_infant_mask_is_plausible_for_an_infant_only():
    mask = ellipsoid_mask((64, 72, 56), VOX3, (48.0, 58.0, 42.0))  # ~0.49 L
    assert p.check_mask_volume(mask, VOX3, age_years=0.5) is None
    adult = p.check_mask_volume(mask, VOX3)
    assert adult is not None and "patient age unknown" in adult.message


# ----------------------------------------------------------------------------- echo times
@pytest.mark.parametrize("te_ms, b0, flagged", [
    ((2.3, 4.6), 3.0004, True),                      # the Philips field map: 13.8 ms T
    ((4.0, 10.0, 16.0, 22.0, 28.0), 2.8936, False),  # Siemens 3 T QSM protocol
    ((4.5, 9.0, 13.5, 18.0), 2.8936, False),         # short 3 T protocol, last TE 18 ms
    ((5.0, 20.0), 3.0, False),                       # 3 T: first ~4-5 ms, last >= 20 ms
    ((3.0, 7.0, 12.0), 6.98, False),                 # 7 T: last >= ~12 ms
    ((6.0, 14.0, 22.0, 30.0), 1.494, False),         # 1.5 T: last >= ~30 ms
    ((3.0, 6.0, 9.0), 1.494, True),                  # 1.5 T with a last echo of 9 ms
    ((20.0,), 3.0, False),                           # single echo, long enough
])
def test_echo_times_too_short_for_the_field(te_ms, b0, flagged):
    concern = p.check_echo_times([t / 1000.0 for t in te_ms], b0)
    assert (concern is not None) == flagged
    if flagged:
        assert concern.check == "echo_times"
        assert "too short" in concern.message and f"{te_ms[-1]:.3g} ms" in concern.message


def test_echo_check_uses_the_echoes_the_field_was_made_from():
    _, result = case_from_maps(np.zeros((8, 8, 4), np.float32), np.ones((8, 8, 4), bool),
                               oblique_affine())
    result.steps.insert(0, StepRecord("echo_selection", "TE limit", "qsmnode presets",
                                      {"echoes_used": [1, 2], "echo_times_ms": [2.0, 4.0]}))
    assert p.field_echo_times_s(result, [0.002, 0.004, 0.040]) == pytest.approx([0.002, 0.004])
    result.steps.pop(0)
    assert p.field_echo_times_s(result, [0.002, 0.004, 0.040]) == pytest.approx([0.002, 0.004, 0.04])


def test_phase_cnr_efficiency_peaks_at_the_tissue_t2star():
    assert p.phase_cnr_efficiency(0.045, 3.0) == pytest.approx(1.0)
    assert p.phase_cnr_efficiency(0.0046, 3.0) == pytest.approx(0.25, abs=0.02)
    threshold_te_s = p.MIN_ECHO_TIME_FIELD_PRODUCT_MS_T / 3.0 / 1000.0
    assert p.phase_cnr_efficiency(threshold_te_s, 3.0) == pytest.approx(0.48, abs=0.02)


# ----------------------------------------------------------------------------- value range
def test_values_beyond_half_a_ppm_in_more_than_two_percent_of_the_mask_are_flagged():
    rng = np.random.default_rng(0)
    mask = np.ones((40, 40, 40), bool)
    chi = rng.normal(0.0, 0.05, mask.shape).astype(np.float32)
    veins = rng.random(mask.shape) < 0.005
    chi[veins] = 0.6  # 0.5 % of the brain: veins
    assert p.check_susceptibility_range(chi, mask) is None
    chi[rng.random(mask.shape) < 0.05] = -0.8  # 5 % out of range: a failed map
    concern = p.check_susceptibility_range(chi, mask)
    assert concern is not None and concern.check == "susceptibility_range"
    assert concern.value == pytest.approx(0.05, abs=0.01)
    assert "1st-99th percentile" in concern.message and "-800" in concern.message


# ----------------------------------------------------------------------------- foci count
def test_implausible_number_of_foci():
    assert p.check_foci_count(0) is None
    assert p.check_foci_count(p.MAX_PLAUSIBLE_FOCI) is None
    concern = p.check_foci_count(191)
    assert concern is not None and "191" in concern.message and concern.check == "foci_count"


# ----------------------------------------------------------------------------- all checks
def brain_sized_case(te_s=(0.005, 0.011, 0.017), chi_scale=1.0):
    """A ReconResult with an adult-sized brain mask (3 mm voxels) and a tissue-like map."""
    mask = ellipsoid_mask((64, 72, 56), VOX3, ADULT_BRAIN_SEMI_MM)
    rng = np.random.default_rng(1)
    chi = (rng.normal(0.0, 0.02, mask.shape) * chi_scale * mask).astype(np.float32)
    acquisition, result = case_from_maps(chi, mask, oblique_affine(VOX3), n_echoes=len(te_s))
    acquisition.echo_times_s = np.asarray(te_s)
    return acquisition, result


def test_assess_result_plausible_and_each_concern():
    acquisition, result = brain_sized_case()
    args = (acquisition.echo_times_s, acquisition.b0_tesla, acquisition.voxel_size_mm)
    assert p.assess_result(result, *args, affine=acquisition.affine, n_candidate_foci=3) == []
    concerns = p.assess_result(result, [0.0023, 0.0046], 3.0, acquisition.voxel_size_mm,
                               n_candidate_foci=191)
    assert [c.check for c in concerns] == ["echo_times", "foci_count"]
    _, noisy = brain_sized_case(chi_scale=20.0)  # SD 0.4 ppm: a fifth of the brain beyond 0.5
    assert [c.check for c in p.assess_result(noisy, *args)] == ["susceptibility_range"]
