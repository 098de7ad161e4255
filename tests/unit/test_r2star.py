"""R2*/T2* fit against exact decays and the phantom's R2*."""

import numpy as np
import pytest

from qsmnode.errors import ReconstructionError
from qsmnode.recon.r2star import R2StarNotDefined, r2star_map
from qsmnode.simulate.forward import simulate_gre
from qsmnode.simulate.phantom import LABELS, head_phantom

TE = np.array([0.004, 0.008, 0.012, 0.016, 0.020])


def test_exact_monoexponential_decay():
    r2_true = np.linspace(1.0, 300.0, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    mag = 3.0 * np.exp(-r2_true[..., None] * TE.astype(np.float32))
    mask = np.ones(r2_true.shape, bool)
    mask[0, 0, 0] = False
    r2, t2 = r2star_map(mag, TE, mask)
    assert r2.dtype == np.float32 and t2.dtype == np.float32
    np.testing.assert_allclose(r2[mask], r2_true[mask], rtol=1e-3)
    np.testing.assert_allclose(t2[mask], 1000.0 / r2_true[mask], rtol=1e-3)
    assert r2[0, 0, 0] == 0 and t2[0, 0, 0] == 0


def test_clipping_to_a_sane_range():
    mag = np.ones((2, 2, 2, 5), np.float32)
    mag[0] *= np.exp(+50.0 * TE)[None, None, :]  # growing "decay" -> R2* clipped at 0
    mag[1] *= np.exp(-2000.0 * TE)[None, None, :]  # faster than the cap
    r2, t2 = r2star_map(mag, TE, np.ones((2, 2, 2), bool), r2star_max_per_s=500.0)
    assert np.all(r2[0] == 0) and np.all(t2[0] == 1000.0)
    assert np.all(r2[1] == 500.0) and np.all(t2[1] == pytest.approx(2.0))


@pytest.mark.parametrize("b0_tesla", [3.0, 7.0])
def test_phantom_r2star(b0_tesla):
    p = head_phantom()
    s = simulate_gre(p, b0_tesla, TE, (0, 0, 1), snr=100.0)
    r2, _ = r2star_map(np.abs(s), TE, p.brain_mask)
    truth = p.r2star_per_s(b0_tesla)
    for name in ("wm", "gm", "putamen", "globus_pallidus", "caudate", "thalamus", "vein"):
        sel = p.labels == LABELS[name]
        assert np.median(r2[sel]) == pytest.approx(float(truth[sel][0]), rel=0.05), name
    wm = p.labels == LABELS["wm"]
    assert np.percentile(np.abs(r2[wm] - truth[wm]), 90) < 0.15 * truth[wm][0]
    assert np.all(r2[~p.brain_mask] == 0)


def test_one_echo_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least two echoes"):
        r2star_map(np.ones((4, 4, 4, 1), np.float32), [0.01], np.ones((4, 4, 4), bool))
    with pytest.raises(R2StarNotDefined) as info:
        r2star_map(np.ones((4, 4, 4, 2), np.float32), [0.01], np.ones((4, 4, 4), bool))
    assert isinstance(info.value, ReconstructionError)
