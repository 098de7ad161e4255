"""Forward model: dipole field against the analytic sphere, and the GRE signal model."""

import numpy as np
import pytest

from qsmnode.acquisition import GYROMAGNETIC_RATIO_MHZ_PER_T
from qsmnode.simulate.forward import (
    default_receive_phase,
    field_ppm_to_hz,
    receive_bias_7t,
    simulate_gre,
    total_field_ppm,
)
from qsmnode.simulate.phantom import head_phantom


def _sphere_case(b0_direction, n=48, radius_vox=6.0, center=(20.0, 24.0, 27.0)):
    idx = np.indices((n, n, n), dtype=np.float64)
    rvec = np.stack([idx[a] - center[a] for a in range(3)])
    r = np.sqrt((rvec**2).sum(0))
    chi = (r <= radius_vox).astype(np.float32)  # 1 ppm
    a_eff = (3.0 * chi.sum() / (4.0 * np.pi)) ** (1 / 3)
    b0 = np.asarray(b0_direction, float) / np.linalg.norm(b0_direction)
    cos = np.einsum("a...,a->...", rvec, b0) / np.maximum(r, 1e-9)
    analytic = (1.0 / 3.0) * (a_eff / np.maximum(r, 1e-9)) ** 3 * (3 * cos**2 - 1)
    return chi, r, a_eff, analytic


@pytest.mark.parametrize("b0", [(0, 0, 1), (0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20)))])
def test_sphere_field_matches_analytic(b0):
    chi, r, a, analytic = _sphere_case(b0)
    field = total_field_ppm(chi, (1.0, 1.0, 1.0), b0)
    assert field.dtype == np.float32 and field.shape == chi.shape
    inside = r < 0.6 * a
    assert np.max(np.abs(field[inside])) < 0.02  # Lorentz-corrected: zero inside
    outside = (r > 1.6 * a) & (r < 3.5 * a)
    err = field[outside] - analytic[outside]
    # values up to ~0.16 ppm; the voxelised sphere (radius 6 voxels) is not perfectly round
    assert np.max(np.abs(err)) < 0.03, np.max(np.abs(err))
    assert np.sqrt(np.mean(err**2)) < 0.003
    # sign: positive along B0, negative across it (paramagnetic sphere)
    assert np.corrcoef(field[outside], analytic[outside])[0, 1] > 0.99


def test_padding_prevents_wrap_around():
    chi, r, a, analytic = _sphere_case((0, 0, 1))
    far = (r > 2.5 * a)
    err_padded = np.abs(total_field_ppm(chi, (1, 1, 1), (0, 0, 1), pad_factor=2) - analytic)[far]
    err_periodic = np.abs(total_field_ppm(chi, (1, 1, 1), (0, 0, 1), pad_factor=1) - analytic)[far]
    assert err_padded.max() < 0.5 * err_periodic.max()


def test_anisotropic_voxels_give_the_same_field_in_mm():
    chi, r, a, analytic = _sphere_case((0, 0, 1))
    iso = total_field_ppm(chi, (1.0, 1.0, 1.0), (0, 0, 1))
    sub = chi[:, :, ::2]  # 2 mm along k; same sphere, coarser sampling
    aniso = total_field_ppm(sub, (1.0, 1.0, 2.0), (0, 0, 1))
    far = (r[:, :, ::2] > 2.0 * a) & (r[:, :, ::2] < 3.5 * a)
    assert np.max(np.abs(aniso[far] - iso[:, :, ::2][far])) < 0.02


def test_field_ppm_to_hz():
    assert float(field_ppm_to_hz(np.float32(1.0), 3.0)) == pytest.approx(
        GYROMAGNETIC_RATIO_MHZ_PER_T * 3.0, rel=1e-6)


@pytest.fixture(scope="module")
def small_phantom():
    return head_phantom((48, 48, 36), (4.0, 4.0, 4.0))


def test_signal_model_noise_free(small_phantom):
    p = small_phantom
    te = np.array([0.005, 0.010, 0.015])
    field = total_field_ppm(p.chi_ppm, p.voxel_size_mm, (0, 0, 1))
    s = simulate_gre(p, 3.0, te, (0, 0, 1), snr=None, field_ppm=field)
    assert s.dtype == np.complex64 and s.shape == p.shape + (3,)
    brain = p.brain_mask
    phi0 = default_receive_phase(p.shape, p.voxel_size_mm)
    f_hz = field_ppm_to_hz(field, 3.0)
    for e, t in enumerate(te):
        decay = p.m0 * np.exp(-p.r2star_per_s(3.0) * t)
        expected = decay * np.exp(1j * (phi0 + 2 * np.pi * f_hz * t))
        np.testing.assert_allclose(s[..., e][brain], expected[brain], atol=2e-4)
    # phase sign: the frequency of a paramagnetic vein is positive where the field is positive
    hip = s[..., 1] * np.conj(s[..., 0])
    pos = brain & (f_hz > 2.0) & (f_hz < 40.0)
    assert np.all(np.angle(hip[pos]) > 0)
    assert np.ptp(phi0[brain]) > 3.0  # several radians of receive-phase variation


def test_noise_level_and_determinism(small_phantom):
    p = small_phantom
    te = [0.004, 0.008]
    clean = simulate_gre(p, 3.0, te, (0, 0, 1), snr=None)
    noisy = simulate_gre(p, 3.0, te, (0, 0, 1), snr=50.0, seed=7)
    again = simulate_gre(p, 3.0, te, (0, 0, 1), snr=50.0, seed=7)
    np.testing.assert_array_equal(noisy, again)
    brain = p.brain_mask
    sigma = np.std(noisy[..., 0][brain] - clean[..., 0][brain])
    level = np.mean(np.abs(clean[..., 0][brain]))
    assert level / sigma == pytest.approx(50.0, rel=0.1)
    assert not np.array_equal(noisy, simulate_gre(p, 3.0, te, (0, 0, 1), snr=50.0, seed=8))


def test_bias_at_7t_and_refusals(small_phantom):
    p = small_phantom
    bias = receive_bias_7t(p.shape, p.voxel_size_mm)
    assert 1.8 < bias.max() <= 2.0 and bias.min() >= 1.0
    s7 = simulate_gre(p, 7.0, [0.004], (0, 0, 1), snr=None, receive_phase_offset=False)
    s7_flat = simulate_gre(p, 7.0, [0.004], (0, 0, 1), snr=None, receive_bias=False,
                           receive_phase_offset=False)
    ratio = np.abs(s7[..., 0])[p.brain_mask] / np.abs(s7_flat[..., 0])[p.brain_mask]
    assert ratio.max() > 1.8 and ratio.min() >= 0.999
    with pytest.raises(ValueError, match="echo_times_s"):
        simulate_gre(p, 3.0, [0.01, 0.005], (0, 0, 1))
    with pytest.raises(ValueError, match="b0_tesla"):
        simulate_gre(p, 0.0, [0.01], (0, 0, 1))
