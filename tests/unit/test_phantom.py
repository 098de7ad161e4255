"""The numerical head phantom: labels, volumes, signs of the foci, determinism."""

import numpy as np
import pytest

from qsmnode.simulate.phantom import BRAIN_LABELS, CHI_PPM, LABELS, HeadPhantom, head_phantom


@pytest.fixture(scope="module")
def phantom() -> HeadPhantom:
    return head_phantom()


def test_types_and_shapes(phantom):
    assert phantom.shape == (96, 96, 72)
    assert phantom.chi_ppm.dtype == np.float32
    assert phantom.labels.dtype == np.int16
    assert phantom.brain_mask.dtype == bool
    assert phantom.m0.dtype == np.float32
    assert phantom.voxel_size_mm == (2.0, 2.0, 2.0)
    assert set(np.unique(phantom.labels)) <= set(LABELS.values())


def test_every_tissue_present_with_plausible_volume(phantom):
    ml_per_voxel = np.prod(phantom.voxel_size_mm) / 1000.0
    vol = {name: phantom.label_mask(name).sum() * ml_per_voxel for name in LABELS}
    for name in LABELS:
        if name == "marrow":  # the realistic head's diploe; this phantom's skull is one table
            continue
        assert vol[name] > 0, f"{name} missing from the phantom"
    assert 900 < phantom.brain_mask.sum() * ml_per_voxel < 1600  # adult brain + CSF, ml
    assert vol["wm"] > vol["putamen"] > vol["globus_pallidus"] > vol["red_nucleus"]
    assert 2 < vol["vein"] < 30
    assert 0.5 < vol["sinus"] < 60


def test_bilateral_nuclei_are_symmetric(phantom):
    ni = phantom.shape[0]
    for name in ("caudate", "putamen", "globus_pallidus", "thalamus", "substantia_nigra",
                 "red_nucleus", "dentate"):
        m = phantom.label_mask(name)
        right, left = m[: ni // 2].sum(), m[ni // 2:].sum()
        assert right > 0 and left > 0, name
        assert abs(right - left) <= 0.25 * max(right, left), name


def test_susceptibility_values_and_signs(phantom):
    chi, lab = phantom.chi_ppm, phantom.labels
    for name in ("caudate", "putamen", "globus_pallidus", "vein", "microbleed"):
        assert np.all(chi[lab == LABELS[name]] == np.float32(CHI_PPM[name]))
        assert CHI_PPM[name] > 0
    assert np.all(chi[lab == LABELS["calcification"]] < 0)
    assert np.all(chi[lab == LABELS["sinus"]] > 0)  # air, partial volume with bone
    assert chi[lab == LABELS["sinus"]].max() == pytest.approx(9.4)
    assert chi[lab == LABELS["skull"]].min() == pytest.approx(-2.0)
    assert np.all(phantom.m0[lab == LABELS["skull"]] < 0.5)
    assert np.median(phantom.m0[lab == LABELS["sinus"]]) == 0  # partial volume at the edge


def test_brain_mask_definition(phantom):
    expected = np.isin(phantom.labels, [LABELS[n] for n in BRAIN_LABELS])
    np.testing.assert_array_equal(phantom.brain_mask, expected)
    assert not np.any(phantom.brain_mask & phantom.label_mask("sinus"))
    assert not np.any(phantom.brain_mask & phantom.label_mask("skull"))


def test_foci_in_white_matter_away_from_veins(phantom):
    assert len(phantom.microbleeds) == 3 and len(phantom.calcifications) == 2
    vox = np.asarray(phantom.voxel_size_mm)
    veins = np.argwhere(phantom.label_mask("vein")) * vox
    for (center, radius), name in ([(f, "microbleed") for f in phantom.microbleeds]
                                   + [(f, "calcification") for f in phantom.calcifications]):
        lo, hi = (1.0, 2.0) if name == "microbleed" else (1.5, 2.5)
        assert lo <= radius <= hi
        assert phantom.labels[center] == LABELS[name]
        assert np.min(np.linalg.norm(veins - np.asarray(center) * vox, axis=1)) > 8.0


def test_r2star_scales_with_field(phantom):
    r3, r7 = phantom.r2star_per_s(3.0), phantom.r2star_per_s(7.0)
    wm = phantom.label_mask("wm")
    assert r3.dtype == np.float32
    assert np.all(r3[wm] == pytest.approx(20.0))
    assert np.all(r7[wm] == pytest.approx(20.0 * 7 / 3))
    gp, gm = phantom.label_mask("globus_pallidus"), phantom.label_mask("gm")
    assert r3[gp][0] > r3[wm][0] > r3[gm][0]
    assert r3[phantom.label_mask("csf")].max() < 5
    with pytest.raises(ValueError):
        phantom.r2star_per_s(0.0)


def test_deterministic_and_seed_dependent():
    a = head_phantom((48, 48, 36), (4.0, 4.0, 4.0), seed=3)
    b = head_phantom((48, 48, 36), (4.0, 4.0, 4.0), seed=3)
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    assert a.microbleeds == b.microbleeds
    c = head_phantom((48, 48, 36), (4.0, 4.0, 4.0), seed=4)
    assert not np.array_equal(a.labels, c.labels)


def test_same_anatomy_at_another_resolution():
    coarse = head_phantom((48, 48, 36), (4.0, 4.0, 4.0))
    fine = head_phantom((64, 64, 48), (3.0, 3.0, 3.0))
    ml = lambda p, m: m.sum() * np.prod(p.voxel_size_mm) / 1000.0  # noqa: E731
    assert ml(coarse, coarse.brain_mask) == pytest.approx(ml(fine, fine.brain_mask), rel=0.05)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="matrix"):
        head_phantom((4, 4, 4))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        head_phantom(voxel_size_mm=(1.0, 0.0, 1.0))
