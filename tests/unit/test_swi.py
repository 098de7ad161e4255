"""SWI (positive = paramagnetic phase attenuated) and sliding-slab minIP."""

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.recon.swi import (
    homodyne_highpass_phase,
    minimum_intensity_projection,
    swi,
    swi_echo_index,
    swi_from_signal,
    swi_phase_mask,
)
from qsmnode.simulate.forward import field_ppm_to_hz, simulate_gre, total_field_ppm
from qsmnode.simulate.phantom import LABELS, head_phantom

TE = np.array([0.004, 0.008, 0.012, 0.016, 0.020])


def test_phase_mask_attenuates_positive_phase_only():
    phi = np.array([-np.pi, -1.0, 0.0, np.pi / 2, np.pi, 4.0], np.float32).reshape(1, 1, 6)
    pm = swi_phase_mask(phi, power=1)
    np.testing.assert_allclose(pm[0, 0], [1, 1, 1, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(swi_phase_mask(phi, power=4)[0, 0, 3], 0.5**4, rtol=1e-5)
    mag = np.full(phi.shape, 2.0, np.float32)
    out = swi(mag, phi, mask=np.array([True] * 5 + [False]).reshape(1, 1, 6), power=1)
    np.testing.assert_allclose(out[0, 0], [2, 2, 2, 1, 0, 2], atol=1e-6)


def test_echo_choice_follows_field_strength():
    te = [0.005, 0.010, 0.020, 0.030, 0.040]
    assert swi_echo_index(te, 3.0) == 2
    assert swi_echo_index(te, 1.5) == 4
    assert swi_echo_index(te, 7.0) == 1


@pytest.fixture(scope="module")
def case():
    p = head_phantom()
    field = total_field_ppm(p.chi_ppm, p.voxel_size_mm, (0, 0, 1))
    s = simulate_gre(p, 3.0, TE, (0, 0, 1), snr=100.0, field_ppm=field)
    return p, s, field


def test_veins_darker_than_white_matter(case):
    p, s, _ = case
    out = swi_from_signal(s, TE, 3.0, p.voxel_size_mm, p.brain_mask)
    mag = np.abs(s[..., swi_echo_index(TE, 3.0)])
    assert out.dtype == np.float32 and out.shape == p.shape and out.min() >= 0
    vein = p.labels == LABELS["vein"]
    near = (ndimage.distance_transform_edt(~vein, sampling=p.voxel_size_mm) < 6) & (
        p.labels == LABELS["wm"])
    swi_contrast = out[vein].mean() / out[near].mean()
    mag_contrast = mag[vein].mean() / mag[near].mean()
    assert swi_contrast < 0.8
    assert swi_contrast < mag_contrast - 0.05  # the phase mask adds contrast
    # the phase mask darkens the positive lobes of each microbleed's dipole field (along B0)
    for (i, j, k), _ in p.microbleeds:
        ratio = out[i, j, k - 2:k + 3] / mag[i, j, k - 2:k + 3]
        assert ratio.min() < 0.9


def test_homodyne_phase_of_vein_along_b0_is_positive(case):
    p, s, field = case
    hp = homodyne_highpass_phase(s[..., 2], p.voxel_size_mm)
    vein = p.labels == LABELS["vein"]
    along_b0 = vein & (field_ppm_to_hz(field, 3.0) > 10.0)
    assert along_b0.sum() > 3
    assert np.median(hp[along_b0]) > 0


def test_swi_from_local_field(case):
    p, s, field = case
    local_hz = field_ppm_to_hz(field, 3.0) * p.brain_mask
    out = swi_from_signal(s, TE, 3.0, p.voxel_size_mm, p.brain_mask, local_field_hz=local_hz)
    mag = np.abs(s[..., 4])
    para = p.brain_mask & (local_hz > 5)
    assert np.all(out[para] < mag[para])
    assert np.all(out[p.brain_mask & (local_hz <= 0)] == mag[p.brain_mask & (local_hz <= 0)])


def test_minip(case):
    p, s, _ = case
    image = swi_from_signal(s, TE, 3.0, p.voxel_size_mm, p.brain_mask)
    mip = minimum_intensity_projection(image, p.voxel_size_mm[2], slab_mm=8.0)
    assert mip.shape == image.shape and mip.dtype == np.float32
    assert np.all(mip <= image)
    # centred 4-slice slab: slice k holds the minimum over k-2 .. k+1
    k = 30
    np.testing.assert_array_equal(mip[:, :, k], image[:, :, k - 2:k + 2].min(axis=2))
    np.testing.assert_array_equal(minimum_intensity_projection(image, 2.0, slab_mm=1.0), image)
