"""Input checks of the reconstruction: every refusal is a ReconstructionError with a reason."""

import numpy as np
import pytest

from qsmnode.errors import ReconstructionError
from qsmnode.recon.checks import SINGLE_ECHO_NOTE, check_inputs

TE = [0.005, 0.010, 0.015]


def _signal(shape=(8, 8, 4), n_echo=3):
    rng = np.random.default_rng(0)
    mag = 1.0 + rng.random(shape + (n_echo,))
    return (mag * np.exp(1j * rng.random(shape + (n_echo,)))).astype(np.complex64)


def _check(**kw):
    args = dict(signal=_signal(), echo_times_s=TE, b0_tesla=3.0, voxel_size_mm=(1, 1, 1), b0_direction=(0, 0, 1))
    args.update(kw)
    return check_inputs(**args)


def test_valid_input_has_no_notes():
    assert _check() == []


def test_single_echo_is_accepted_with_a_note():
    notes = _check(signal=_signal(n_echo=1), echo_times_s=[0.02])
    assert notes == [SINGLE_ECHO_NOTE]
    notes3d = _check(signal=_signal(n_echo=1)[..., 0], echo_times_s=[0.02])
    assert notes3d == [SINGLE_ECHO_NOTE]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_refused(bad):
    s = _signal()
    s[2, 3, 1, 0] = bad
    with pytest.raises(ReconstructionError, match="NaN or infinite"):
        _check(signal=s)


def test_all_zero_magnitude_refused():
    with pytest.raises(ReconstructionError, match="zero everywhere"):
        _check(signal=np.zeros((8, 8, 4, 3), np.complex64))


def test_one_zero_echo_refused():
    s = _signal()
    s[..., 1] = 0
    with pytest.raises(ReconstructionError, match=r"echo\(es\) \[1\]"):
        _check(signal=s)


def test_single_slice_refused():
    with pytest.raises(ReconstructionError, match="one slice is not a volume"):
        _check(signal=_signal(shape=(8, 8, 1)))


@pytest.mark.parametrize(
    "te, message",
    [
        ([0.010, 0.005, 0.015], "not sorted"),
        ([0.005, 0.005, 0.015], "duplicate echo times"),
        ([0.005, 0.010], "2 echo times for 3 echoes"),
        ([0.0, 0.010, 0.015], "finite and positive"),
        ([0.005, np.nan, 0.015], "finite and positive"),
        ([5.0, 10.0, 15.0], "expected in seconds"),
    ],
)
def test_bad_echo_times_refused(te, message):
    with pytest.raises(ReconstructionError, match=message):
        _check(echo_times_s=te)


@pytest.mark.parametrize("vox", [(1, 1, 0), (1, -1, 1), (1, np.nan, 1), (1, np.inf, 1)])
def test_bad_voxel_size_refused(vox):
    with pytest.raises(ReconstructionError, match="voxel size"):
        _check(voxel_size_mm=vox)


def test_zero_b0_direction_refused():
    with pytest.raises(ReconstructionError, match="zero length"):
        _check(b0_direction=(0, 0, 0))


@pytest.mark.parametrize("b0", [0.0, -3.0, np.nan])
def test_bad_field_strength_refused(b0):
    with pytest.raises(ReconstructionError, match="field strength"):
        _check(b0_tesla=b0)


def test_error_carries_a_hint():
    with pytest.raises(ReconstructionError) as err:
        _check(signal=_signal(shape=(8, 8, 1)))
    assert err.value.hint and "complete 3D acquisition" in err.value.hint
