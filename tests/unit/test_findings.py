"""Focus detection: microbleeds paramagnetic, calcifications diamagnetic, veins not microbleeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.report.findings import (
    find_foci,
    local_contrast_ppm,
    principal_axis_elongation,
    whole_brain_statistics,
)


def reconstructed_like(chi_ppm, mask, *, blur_mm=1.0, noise_ppm=0.02, voxel_mm=2.0, seed=7):
    """The truth as a reconstruction shows it: Gaussian blur (FWHM ~2.4 mm) and white noise."""
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(chi_ppm * mask, blur_mm / voxel_mm)
    return ((chi + rng.normal(0.0, noise_ppm, chi.shape)) * mask).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_phantom_microbleeds_calcifications_and_no_vein(seed):
    from qsmnode.simulate.phantom import LABELS, head_phantom

    phantom = head_phantom(matrix=(96, 96, 72), voxel_size_mm=(2, 2, 2), seed=seed)
    assert len(phantom.microbleeds) == 3 and len(phantom.calcifications) == 2
    chi = reconstructed_like(phantom.chi_ppm, phantom.brain_mask, seed=seed + 10)
    foci = find_foci(chi, phantom.brain_mask, (2.0, 2.0, 2.0))
    for truth, kind, sign in ((phantom.microbleeds, "paramagnetic", 1),
                              (phantom.calcifications, "diamagnetic", -1)):
        for centre, _ in truth:
            hits = [f for f in foci if np.linalg.norm(np.subtract(f.centroid_ijk, centre)) < 1.5]
            assert len(hits) == 1, f"{kind} focus at {centre}: {len(hits)} detections"
            focus = hits[0]
            assert focus.kind == kind
            assert sign * focus.peak_ppm > 0.15 and sign * focus.mean_ppm > 0
            assert focus.volume_mm3 > 0 and focus.elongation < 2.5
    veins = phantom.labels == LABELS["vein"]
    for focus in foci:
        i, j, k = np.round(focus.centroid_ijk).astype(int)
        if focus.kind == "paramagnetic":
            assert not veins[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].any(), \
                f"vein segment at {(i, j, k)} reported as a microbleed"
    assert len(foci) == 5, [(f.kind, f.centroid_ijk) for f in foci]


def _grid(shape=(64, 64, 48)):
    return np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")


def test_vein_tube_is_not_a_microbleed_but_a_nodule_on_it_is():
    shape = (64, 64, 48)
    ii, jj, kk = _grid(shape)
    mask = np.ones(shape, dtype=bool)
    chi = np.full(shape, -0.02)
    # oblique vein, radius 1.5 voxels, 40 voxels long
    direction = np.array([1.0, 0.6, 0.3]) / np.linalg.norm([1.0, 0.6, 0.3])
    start = np.array([12.0, 16.0, 14.0])
    rel = np.stack([ii - start[0], jj - start[1], kk - start[2]], axis=-1)
    t = np.clip(rel @ direction, 0, 40)
    dist = np.linalg.norm(rel - t[..., None] * direction, axis=-1)
    chi[dist <= 1.5] = 0.45
    # a short vein segment on its own (8 voxels long)
    chi[40:48, 48:50, 10:12] = 0.45
    # a microbleed touching the vein, and one alone
    on_vein = start + 20 * direction + np.array([0.0, 0.0, 2.0])
    chi[(ii - on_vein[0]) ** 2 + (jj - on_vein[1]) ** 2 + (kk - on_vein[2]) ** 2 <= 4] = 1.2
    chi[(ii - 48) ** 2 + (jj - 16) ** 2 + (kk - 34) ** 2 <= 2] = 0.9
    chi = reconstructed_like(chi, mask, blur_mm=0.5, noise_ppm=0.015, voxel_mm=1.0)
    foci = find_foci(chi, mask, (1.0, 1.0, 1.0))
    para = [f for f in foci if f.kind == "paramagnetic"]
    assert len(para) == 2, [(f.centroid_ijk, f.elongation) for f in para]
    centres = sorted(np.round(f.centroid_ijk).astype(int).tolist() for f in para)
    assert np.linalg.norm(np.subtract(centres[0], on_vein)) < 2.0 or \
        np.linalg.norm(np.subtract(centres[1], on_vein)) < 2.0
    assert any(np.linalg.norm(np.subtract(c, (48, 16, 34))) < 1.5 for c in centres)
    assert not [f for f in foci if f.kind == "diamagnetic"]


def test_large_paramagnetic_nucleus_is_not_a_focus():
    shape = (48, 48, 40)
    ii, jj, kk = _grid(shape)
    chi = np.zeros(shape)
    # globus-pallidus-like ellipsoid, 0.25 ppm, 24 x 12 x 12 mm
    chi[((ii - 24) / 12) ** 2 + ((jj - 24) / 6) ** 2 + ((kk - 20) / 6) ** 2 <= 1] = 0.25
    mask = np.ones(shape, dtype=bool)
    assert find_foci(chi.astype(np.float32), mask, (1.0, 1.0, 1.0)) == []


def test_elongation_and_statistics():
    rng = np.random.default_rng(0)
    ball = np.argwhere(np.ones((5, 5, 5)))
    assert principal_axis_elongation(ball, np.ones(len(ball)), (1, 1, 1)) == pytest.approx(1.0)
    rod = np.argwhere(np.ones((20, 2, 2)))
    assert principal_axis_elongation(rod, np.ones(len(rod)), (1, 1, 1)) > 5
    # anisotropic voxels count in mm: 10 x 1 x 1 voxels of 1 x 10 x 10 mm is a cube-ish block
    slab = np.argwhere(np.ones((10, 1, 1)))
    assert principal_axis_elongation(slab, np.ones(10), (1, 10, 10)) < 1.5
    one = np.array([[3, 3, 3]])  # a single anisotropic voxel is round, not elongated
    assert principal_axis_elongation(one, np.ones(1), (1.0, 1.0, 2.0)) == pytest.approx(1.0)
    chi = rng.normal(0.1, 0.05, (20, 20, 20))
    mask = np.zeros(chi.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    stats = whole_brain_statistics(chi, mask, (2, 2, 2))
    assert stats["volume_ml"] == pytest.approx(1000 * 8 / 1000)
    assert stats["mean_ppm"] == pytest.approx(chi[mask].mean())
    assert stats["p05_ppm"] < stats["median_ppm"] < stats["p95_ppm"]
    contrast = local_contrast_ppm(np.full(chi.shape, 0.3), mask, (2, 2, 2))
    np.testing.assert_allclose(contrast[mask], 0, atol=1e-5)
    assert find_foci(chi, np.zeros(chi.shape, bool), (2, 2, 2)) == []
    with pytest.raises(ValueError, match="same 3-D shape"):
        find_foci(chi, mask[:-1], (2, 2, 2))
