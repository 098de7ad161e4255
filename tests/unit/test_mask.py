"""Brain mask from magnitude at 1.5, 3 and 7 T (noise, 7 T receive bias), phase quality."""

import numpy as np
import pytest

from qsmnode.errors import ReconstructionError
from qsmnode.recon.mask import brain_mask, field_noise_quality, refine_brain_mask
from qsmnode.simulate.forward import simulate_gre
from qsmnode.simulate.phantom import LABELS, head_phantom

TE = [0.004, 0.008, 0.012, 0.016, 0.020]


@pytest.fixture(scope="module")
def phantom():
    return head_phantom()


@pytest.mark.parametrize("b0_tesla,snr", [(1.5, 40.0), (3.0, 100.0), (7.0, 60.0)])
def test_mask_bar(phantom, b0_tesla, snr):
    signal = simulate_gre(phantom, b0_tesla, TE, (0, 0, 1), snr=snr, seed=3)
    mask = brain_mask(np.abs(signal), phantom.voxel_size_mm)
    truth = phantom.brain_mask
    assert mask.dtype == bool and mask.shape == truth.shape
    assert (mask & truth).sum() >= 0.95 * truth.sum()
    assert (mask & ~truth).sum() <= 0.03 * truth.sum()
    assert not np.any(mask & (phantom.labels == LABELS["sinus"]))
    # scalp only where the brain stem meets the neck at the bottom of the field of view
    scalp = mask & (phantom.labels == LABELS["scalp"])
    assert scalp.sum() <= 0.005 * truth.sum() and not scalp[:, :, 10:].any()
    # the dark foci and veins stay inside
    for center, _ in phantom.microbleeds + phantom.calcifications:
        assert mask[center]


def test_mask_survives_strong_bias_without_normalisation_hint(phantom):
    # a 7 T centre brightening of x3 and the first echo only
    signal = simulate_gre(phantom, 7.0, TE[:1], (0, 0, 1), snr=50.0, receive_bias=3.0)
    mask = brain_mask(np.abs(signal[..., 0]), phantom.voxel_size_mm)
    truth = phantom.brain_mask
    assert (mask & truth).sum() >= 0.95 * truth.sum()
    assert (mask & ~truth).sum() <= 0.03 * truth.sum()


def test_phase_quality_trims_the_edge_only(phantom):
    signal = simulate_gre(phantom, 3.0, TE[:1], (0, 0, 1), snr=100.0)
    base = brain_mask(np.abs(signal), phantom.voxel_size_mm)
    quality = np.ones(base.shape, np.float32)
    quality[:, :20, :] = 0.0  # unreliable frontal slab
    quality[48, 48, 40] = 0.0  # one unreliable voxel deep inside
    trimmed = brain_mask(np.abs(signal), phantom.voxel_size_mm, phase_quality=quality)
    assert not trimmed[:, :20, :].any()
    assert trimmed[48, 48, 40] == base[48, 48, 40]
    assert np.array_equal(trimmed[:, 21:, :], base[:, 21:, :])
    np.testing.assert_array_equal(refine_brain_mask(base, quality), trimmed)


def test_field_noise_quality():
    noise = np.array([[[0.1, 0.4, np.inf]]], np.float32)
    q = field_noise_quality(noise, np.ones_like(noise, bool), scale=0.2)
    np.testing.assert_allclose(q[0, 0], [0.8, 0.2, 0.0], rtol=1e-5)


def test_refusals():
    with pytest.raises(ReconstructionError, match="zero everywhere"):
        brain_mask(np.zeros((16, 16, 16), np.float32), (1, 1, 1))
    bad = np.ones((16, 16, 16), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ReconstructionError, match="NaN"):
        brain_mask(bad, (1, 1, 1))
    with pytest.raises(ReconstructionError, match="3D or 4D"):
        brain_mask(np.ones((16, 16), np.float32), (1, 1, 1))
