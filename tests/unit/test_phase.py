"""Receive-phase offset removal (MCPC-3D-S) and echo combination."""

import numpy as np
import pytest

from qsmnode.errors import ReconstructionError
from qsmnode.recon.phase import (
    combine_echoes,
    estimate_noise_sigma,
    estimate_total_field,
    mcpc3ds_phase_offset,
    remove_phase_offset,
)
from qsmnode.recon.unwrap import wrap
from qsmnode.simulate.forward import (
    default_receive_phase,
    field_ppm_to_hz,
    simulate_gre,
    total_field_ppm,
)
from qsmnode.simulate.phantom import head_phantom

TE = np.array([0.004, 0.008, 0.012, 0.016, 0.020])


@pytest.fixture(scope="module")
def case():
    p = head_phantom()
    field = total_field_ppm(p.chi_ppm, p.voxel_size_mm, (0, 0, 1))
    signal = simulate_gre(p, 3.0, TE, (0, 0, 1), snr=100.0, field_ppm=field)
    return p, field_ppm_to_hz(field, 3.0), signal


def test_mcpc3ds_recovers_the_receive_phase(case):
    p, _, signal = case
    offset, hip, quality = mcpc3ds_phase_offset(signal, TE, p.brain_mask, p.voxel_size_mm)
    true = default_receive_phase(p.shape, p.voxel_size_mm)
    err = np.abs(wrap(true - offset))[p.brain_mask]
    assert np.median(err) < 0.01 and np.percentile(err, 99) < 0.05
    assert offset.dtype == np.float32 and quality.min() >= 0 and quality.max() <= 1
    corrected = remove_phase_offset(signal, offset)
    assert corrected.dtype == np.complex64
    np.testing.assert_allclose(np.abs(corrected), np.abs(signal), rtol=1e-5, atol=1e-6)


def test_total_field_matches_truth_within_noise(case):
    p, freq_hz, signal = case
    r = estimate_total_field(signal, TE, p.brain_mask, p.voxel_size_mm)
    b = p.brain_mask
    err = (r.total_field_hz - freq_hz)[b]
    err -= np.median(err)  # the mean field is not defined
    assert np.percentile(np.abs(err), 99) < 0.5  # Hz; 1 ppb = 0.128 Hz at 3 T
    z = err / r.field_noise_hz[b]
    assert 0.7 < np.std(z[np.abs(z) < 10]) < 1.6  # the noise map is calibrated
    assert np.all(r.total_field_hz[~b] == 0)
    assert [s.name for s in r.steps] == ["phase_offset", "unwrapping", "echo_combination"]
    # veins (paramagnetic, along B0) have a positive field in the fit as in the truth
    assert np.corrcoef(r.total_field_hz[b], freq_hz[b])[0, 1] > 0.999


@pytest.mark.parametrize("method", ["laplacian", "skimage"])
def test_other_unwrapping_methods_for_the_template(method):
    if method == "skimage":
        pytest.importorskip("skimage")
    p = head_phantom((48, 48, 36), (4.0, 4.0, 4.0))
    field = total_field_ppm(p.chi_ppm, p.voxel_size_mm, (0, 0, 1))
    s = simulate_gre(p, 3.0, TE, (0, 0, 1), snr=100.0, field_ppm=field)
    r = estimate_total_field(s, TE, p.brain_mask, p.voxel_size_mm, unwrap_method=method)
    err = (r.total_field_hz - field_ppm_to_hz(field, 3.0))[p.brain_mask]
    assert np.percentile(np.abs(err - np.median(err)), 95) < 1.0
    assert r.steps[1].parameters["spatial_method"] == method


def test_single_echo_field():
    p = head_phantom((48, 48, 36), (4.0, 4.0, 4.0))
    field = total_field_ppm(p.chi_ppm, p.voxel_size_mm, (0, 0, 1))
    s = simulate_gre(p, 3.0, [0.010], (0, 0, 1), snr=200.0, receive_phase_offset=False,
                     field_ppm=field)
    r = estimate_total_field(s, [0.010], p.brain_mask, p.voxel_size_mm)
    err = (r.total_field_hz - field_ppm_to_hz(field, 3.0))[p.brain_mask]
    assert np.percentile(np.abs(err - np.median(err)), 99) < 2.0
    assert np.all(np.isfinite(r.field_noise_hz))


def test_combine_echoes_weighted_fit_and_noise():
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    f_true = rng.uniform(-30, 30, shape).astype(np.float32)
    mag = np.empty(shape + (5,), np.float32)
    mag[...] = (np.exp(-25.0 * TE)).astype(np.float32)
    sigma = 0.02
    phase = 2 * np.pi * f_true[..., None] * TE + rng.normal(size=mag.shape) * sigma / mag
    f, noise = combine_echoes(phase.astype(np.float32), mag, TE, noise_sigma=sigma)
    expected_noise = sigma / np.sqrt(np.sum(mag[0, 0, 0] ** 2 * TE**2)) / (2 * np.pi)
    assert np.median(noise) == pytest.approx(expected_noise, rel=0.3)
    z = (f - f_true) / noise
    assert 0.6 < np.std(z) < 1.1
    # one echo: f = phase / (2 pi TE)
    f1, n1 = combine_echoes(phase[..., :1].astype(np.float32), mag[..., :1], TE[:1],
                            noise_sigma=sigma)
    np.testing.assert_allclose(f1, phase[..., 0] / (2 * np.pi * TE[0]), rtol=1e-4, atol=1e-3)


def test_noise_sigma_from_background(case):
    p, _, signal = case
    clean = simulate_gre(p, 3.0, TE[:1], (0, 0, 1), snr=None)
    sigma_true = np.std((signal[..., 0] - clean[..., 0])[~p.brain_mask].real)  # per channel
    assert estimate_noise_sigma(np.abs(signal[..., 0])) == pytest.approx(sigma_true, rel=0.25)


def test_refusals():
    s = np.ones((8, 8, 8, 3), np.complex64)
    m = np.ones((8, 8, 8), bool)
    with pytest.raises(ReconstructionError, match="3 echoes"):
        estimate_total_field(s, [0.01, 0.02], m, (1, 1, 1))
    with pytest.raises(ReconstructionError, match="increasing"):
        estimate_total_field(s, [0.01, 0.03, 0.02], m, (1, 1, 1))
    with pytest.raises(ReconstructionError, match="empty"):
        estimate_total_field(s, [0.01, 0.02, 0.03], ~m, (1, 1, 1))
    with pytest.raises(ReconstructionError, match="4D"):
        estimate_total_field(s[..., 0], [0.01], m, (1, 1, 1))
