"""Susceptibility-weighted imaging (SWI) and its minimum-intensity projection.

Haacke EM, Xu Y, Cheng YC, Reichenbach JR. Susceptibility weighted imaging (SWI). MRM
2004;52:612-618: a high-pass (homodyne) filtered phase becomes a phase mask that is multiplied
into the magnitude ``power`` times (4 by default). Under the internal sign convention of
DESIGN.md a paramagnetic source (vein, bleed) gives a POSITIVE phase, so the mask attenuates
positive phase: pm = 1 for phi <= 0, 1 - phi/pi for 0 < phi < pi, 0 for phi >= pi.
(Haacke's paper attenuates negative phase because of the opposite, left-handed sign.)
Arrays ``[i, j, k]``; numpy or cupy in, same backend out; magnitude units are kept.
"""

from __future__ import annotations

import numpy as np

from qsmnode.recon.backend import array_module
from qsmnode.recon.phase import ndimage_module


def homodyne_highpass_phase(complex_image, voxel_size_mm, *, filter_mm=4.0):
    """High-pass filtered phase (radians) of a complex image: angle(S conj(LP(S))).

    LP is a Gaussian low-pass of the complex image with sigma ``filter_mm`` (mm) — the image
    space form of Haacke's central k-space Hanning filter (a 64 of 512 filter on a 230 mm field
    of view cuts near 7 mm; sigma 4 mm is comparable). Returns float32 [i, j, k] in (-pi, pi].
    """
    xp = array_module(complex_image)
    nd = ndimage_module(xp)
    s = xp.asarray(complex_image, dtype=xp.complex64)
    sigma = [float(filter_mm) / float(v) for v in voxel_size_mm]
    lp = nd.gaussian_filter(xp.real(s), sigma, mode="nearest") + 1j * nd.gaussian_filter(
        xp.imag(s), sigma, mode="nearest")
    return xp.angle(s * xp.conj(lp)).astype(xp.float32)


def swi_phase_mask(phase_rad, power=4):
    """SWI phase mask raised to ``power`` for positive (paramagnetic) phase.

    phase_rad : [i, j, k] radians. Returns float32 in [0, 1]: (clip(1 - phi/pi, 0, 1))^power
    where phi > 0, 1 elsewhere.
    """
    xp = array_module(phase_rad)
    phi = xp.asarray(phase_rad, dtype=xp.float32)
    pm = xp.where(phi > 0, xp.clip(1.0 - phi / xp.float32(np.pi), 0.0, 1.0), xp.float32(1.0))
    return (pm ** xp.float32(power)).astype(xp.float32)


def swi(magnitude, phase_rad, mask=None, *, power=4):
    """SWI = magnitude x phase_mask^power (Haacke 2004).

    magnitude : [i, j, k] (one echo, or a combined magnitude); phase_rad : [i, j, k] high-pass
    filtered phase in radians (:func:`homodyne_highpass_phase`, or 2 pi x local field (Hz) x TE).
    mask : optional bool; outside it the phase mask is 1 (magnitude kept). power : 4 at 3 T by
    default (a parameter; field-strength presets may change it). Returns float32 >= 0.
    """
    xp = array_module(magnitude)
    pm = swi_phase_mask(phase_rad, power)
    if mask is not None:
        pm = xp.where(xp.asarray(mask, dtype=bool), pm, xp.float32(1.0))
    return (xp.abs(xp.asarray(magnitude, dtype=xp.float32)) * pm).astype(xp.float32)


def swi_echo_index(echo_times_s, b0_tesla, *, te_at_3t_s=0.020):
    """Index of the echo closest to the SWI target TE = te_at_3t_s x 3 T / B0.

    The phase contrast grows with B0 x TE, so 20 ms at 3 T corresponds to 40 ms at 1.5 T and
    about 8.6 ms at 7 T.
    """
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    target = float(te_at_3t_s) * 3.0 / float(b0_tesla)
    return int(np.argmin(np.abs(te - target)))


def swi_from_signal(signal, echo_times_s, b0_tesla, voxel_size_mm, mask=None, *, power=4,
                    filter_mm=4.0, local_field_hz=None):
    """SWI from multi-echo complex GRE: the echo nearest the target TE (see
    :func:`swi_echo_index`), its homodyne-filtered phase (or 2 pi x ``local_field_hz`` x TE when
    a local field in Hz is given, which avoids the homodyne filter's edge artefacts), and the
    positive-phase mask to the ``power``. signal : complex [i, j, k, echo]. Returns float32.
    """
    xp = array_module(signal)
    e = swi_echo_index(echo_times_s, b0_tesla)
    te = float(np.asarray(echo_times_s, dtype=np.float64).ravel()[e])
    echo = signal[..., e]
    if local_field_hz is not None:
        phase = xp.float32(2.0 * np.pi * te) * xp.asarray(local_field_hz, dtype=xp.float32)
    else:
        phase = homodyne_highpass_phase(echo, voxel_size_mm, filter_mm=filter_mm)
    return swi(xp.abs(echo), phase, mask, power=power)


def minimum_intensity_projection(swi_image, voxel_size_k_mm, slab_mm=8.0):
    """Sliding-slab minimum-intensity projection along k (same shape as the input).

    Each slice k holds the minimum over the slab of ``slab_mm`` (mm) centred on it (at least
    one slice; edges repeat the border slice). voxel_size_k_mm : slice spacing in mm.
    Returns float32 [i, j, k] <= swi_image everywhere.
    """
    xp = array_module(swi_image)
    nd = ndimage_module(xp)
    size = max(1, int(round(float(slab_mm) / float(voxel_size_k_mm))))
    img = xp.asarray(swi_image, dtype=xp.float32)
    return nd.minimum_filter1d(img, size=size, axis=2, mode="nearest").astype(xp.float32)
