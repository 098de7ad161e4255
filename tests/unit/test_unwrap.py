"""Phase unwrapping: exact where the data allow, on synthetic phase and on the head phantom."""

import numpy as np
import pytest

from qsmnode.recon.mask import brain_mask
from qsmnode.recon.phase import estimate_total_field
from qsmnode.recon.unwrap import (
    laplacian_unwrap,
    unwrap_phase,
    unwrap_quality_guided,
    unwrap_temporal,
    wrap,
)
from qsmnode.simulate.forward import (
    default_receive_phase,
    field_ppm_to_hz,
    simulate_gre,
    total_field_ppm,
)
from qsmnode.simulate.phantom import head_phantom

TE = np.array([0.004, 0.008, 0.012, 0.016, 0.020])


def _fraction_right(unwrapped, true, mask, exact=False):
    """Fraction of the mask where unwrapped - true is the most common multiple of 2 pi."""
    k = np.rint((unwrapped - true) / (2 * np.pi))[mask]
    if exact:  # noise-free input: the result is congruent with it
        residual = (unwrapped - true)[mask] - 2 * np.pi * k
        assert np.max(np.abs(residual)) < 1e-3
    _, counts = np.unique(k, return_counts=True)
    return counts.max() / mask.sum()


def _smooth_phase(n=40):
    idx = np.indices((n, n, n), dtype=np.float32) - n / 2
    true = 0.03 * idx[0] ** 2 + 0.5 * idx[1] - 0.02 * idx[0] * idx[2] + 3.0
    mask = (idx**2).sum(0) < (0.45 * n) ** 2
    return true.astype(np.float32), mask


def test_quality_guided_is_exact_on_smooth_phase():
    true, mask = _smooth_phase()
    assert np.ptp(true[mask]) > 20  # many wraps
    u = unwrap_quality_guided(wrap(true), mask, np.ones_like(true), center=False)
    assert u.dtype == np.float32
    assert _fraction_right(u, true, mask, exact=True) == 1.0
    assert np.all(u[~mask] == 0)


def test_each_disconnected_piece_is_unwrapped():
    true, mask = _smooth_phase()
    mask = mask.copy()
    mask[:, 19:21, :] = False  # cut the sphere in two
    u = unwrap_quality_guided(wrap(true), mask, np.ones_like(true))
    for half in (np.s_[:, :19, :], np.s_[:, 21:, :]):
        m = np.zeros_like(mask)
        m[half] = mask[half]
        assert _fraction_right(u, true, m) == 1.0


def test_laplacian_unwrap():
    true, mask = _smooth_phase()
    smooth = laplacian_unwrap(wrap(true), (1.0, 1.0, 1.0))
    # not congruent, but its Laplacian is the true one: compare after removing a plane
    lap = lambda a: sum(np.gradient(np.gradient(a, axis=ax), axis=ax) for ax in range(3))  # noqa
    inner = mask & (np.indices(mask.shape).min(0) > 3)
    assert np.median(np.abs(lap(smooth) - lap(true))[inner]) < 0.01
    congruent = laplacian_unwrap(wrap(true), (1.0, 1.0, 1.0), mask=mask, congruent=True)
    steps = (congruent - wrap(true))[mask] / (2 * np.pi)
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-4)  # congruent with the input


def test_skimage_method_matches():
    pytest.importorskip("skimage")
    true, mask = _smooth_phase(24)
    u = unwrap_phase(wrap(true), mask, method="skimage")
    assert _fraction_right(u, true, mask) == 1.0
    with pytest.raises(ValueError, match="unknown unwrapping method"):
        unwrap_phase(wrap(true), mask, method="magic")


def test_temporal_unwrapping_against_template():
    rng = np.random.default_rng(1)
    f_hz = rng.uniform(-150, 150, size=(8, 8, 8)).astype(np.float32)
    true = 2 * np.pi * f_hz[..., None] * TE.astype(np.float32)
    template = 2 * np.pi * f_hz * np.float32(0.004)  # e.g. echo 2 - echo 1
    u = unwrap_temporal(wrap(true), TE, template, 0.004, magnitude=np.ones_like(true))
    np.testing.assert_allclose(u, true, atol=1e-3)
    with pytest.raises(ValueError, match="echoes"):
        unwrap_temporal(wrap(true)[..., :3], TE, template, 0.004)


@pytest.fixture(scope="module")
def phantom():
    return head_phantom()


@pytest.mark.parametrize(
    "b0_tesla,b0_direction",
    [(3.0, (0.0, 0.0, 1.0)), (7.0, (0.0, 0.0, 1.0)),
     (7.0, (0.0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))))],
    ids=["3T", "7T", "7T-oblique20"],
)
def test_phantom_unwrapping_bar(phantom, b0_tesla, b0_direction):
    """All echoes unwrapped right (up to one global 2 pi k) in >= 99.5 % of the mask."""
    field = total_field_ppm(phantom.chi_ppm, phantom.voxel_size_mm, b0_direction)
    signal = simulate_gre(phantom, b0_tesla, TE, b0_direction, snr=100.0, field_ppm=field)
    mask = brain_mask(np.abs(signal), phantom.voxel_size_mm)
    result = estimate_total_field(signal, TE, mask, phantom.voxel_size_mm)
    phi0 = default_receive_phase(phantom.shape, phantom.voxel_size_mm)
    freq = field_ppm_to_hz(field, b0_tesla)
    for e, te in enumerate(TE):
        true = wrap(phi0 - result.phase_offset) + 2 * np.pi * freq * np.float32(te)
        assert _fraction_right(result.unwrapped_phase[..., e], true, mask) >= 0.995, e
    # spatial unwrapping alone of the first echo, receive phase included
    true1 = phi0 + 2 * np.pi * freq * np.float32(TE[0])
    u1 = unwrap_quality_guided(np.angle(signal[..., 0]), mask, np.abs(signal[..., 0]))
    assert _fraction_right(u1, true1, mask) >= 0.995
