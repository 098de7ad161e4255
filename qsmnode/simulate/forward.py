"""Forward model: susceptibility -> field -> multi-echo complex GRE signal.

Field: the Lorentz-corrected dipole convolution in k-space, field_ppm = F^-1[D(k) F[chi_ppm]]
with D(k) = 1/3 - (k.b0)^2/|k|^2 (Salomir R et al. Concepts Magn Reson B 2003;19B:26;
Marques JP, Bowtell R. Concepts Magn Reson B 2005;25B:65), evaluated on a zero-padded grid so
the field is not wrapped around periodically.

Signal (the standard multi-echo GRE model, e.g. Wang Y, Liu T. MRM 2015;73:82):
S(TE) = m0 * bias * exp(-R2* TE) * exp(i (phi0 + 2 pi f TE)) + noise,
f = gamma * B0 * field_ppm * 1e-6 in Hz, gamma = 42.57747892 MHz/T. Phase sign as DESIGN.md:
a paramagnetic source gives a positive frequency and a phase that grows with TE.
"""

from __future__ import annotations

import numpy as np

from qsmnode.acquisition import GYROMAGNETIC_RATIO_MHZ_PER_T
from qsmnode.recon.backend import array_module
from qsmnode.recon.dipole import dipole_kernel


def _fft_module(xp):
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def _fast_len(n: int) -> int:
    import scipy.fft

    return int(scipy.fft.next_fast_len(int(n), real=True))


def total_field_ppm(chi_ppm, voxel_size_mm, b0_direction, pad_factor=2):
    """Field shift in ppm (of B0) produced by a susceptibility distribution.

    chi_ppm : [i, j, k] susceptibility in ppm (numpy or cupy; the result is on the same backend).
    voxel_size_mm : (3,) voxel size in mm along (i, j, k).
    b0_direction : (3,) B0 direction in array axes (normalised here; oblique scans: e.g.
        ``(0, sin 20deg, cos 20deg)``).
    pad_factor : the grid is zero-padded to ``pad_factor`` times each size (rounded up to a fast
        FFT length) so the field does not wrap around; 1 disables padding.

    Returns float32 [i, j, k], field in ppm: Lorentz-corrected (a uniformly magnetised sphere
    has zero field inside and chi/3 (a/r)^3 (3 cos^2 - 1) outside), mean field undefined (D(0)=0).
    """
    xp = array_module(chi_ppm)
    chi = xp.asarray(chi_ppm, dtype=xp.float32)
    if chi.ndim != 3:
        raise ValueError(f"chi_ppm must be 3D [i, j, k], got shape {chi.shape}")
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    shape = chi.shape
    padded = tuple(_fast_len(int(np.ceil(n * pad_factor))) if pad_factor > 1 else n for n in shape)
    fft = _fft_module(xp)
    kernel = dipole_kernel(padded, voxel_size_mm, b0_direction, xp=xp, dtype="float32")
    kernel = kernel[:, :, : padded[2] // 2 + 1]
    kw = {"workers": -1} if xp is np else {}
    spectrum = fft.rfftn(chi, s=padded, axes=(0, 1, 2), **kw)
    spectrum *= kernel
    field = fft.irfftn(spectrum, s=padded, axes=(0, 1, 2), **kw)
    return xp.ascontiguousarray(field[: shape[0], : shape[1], : shape[2]].astype(xp.float32))


def default_receive_phase(shape, voxel_size_mm) -> np.ndarray:
    """A smooth receive-phase offset phi0 in radians ([i, j, k], float32).

    Mimics a coil-combined phase offset: a linear ramp plus two smooth bumps, about 5-6 rad
    of variation across a head. Deterministic, in mm, so independent of the matrix.
    """
    x, y, z = _grid_mm(shape, voxel_size_mm)
    phi0 = (
        0.8
        + 1.6 * (x / 70.0)
        - 1.2 * (y / 90.0)
        + 1.5 * np.exp(-((x - 30.0) ** 2 + (y + 20.0) ** 2 + (z - 10.0) ** 2) / (2 * 45.0**2))
        - 1.3 * np.cos(np.pi * z / 140.0) * np.sin(np.pi * (x + y) / 200.0)
    )
    return phi0.astype(np.float32)


def receive_bias_7t(shape, voxel_size_mm, centre_factor=2.0) -> np.ndarray:
    """Smooth receive/transmit magnitude bias typical of 7 T: centre brighter by ``centre_factor``.

    Returns float32 [i, j, k], 1 at the head periphery rising to about ``centre_factor`` at the
    centre (Gaussian profile, sigma 45 mm), slightly off-centre as in real data.
    """
    x, y, z = _grid_mm(shape, voxel_size_mm)
    r2 = (x - 5.0) ** 2 + (y + 8.0) ** 2 + (z - 5.0) ** 2
    return (1.0 + (centre_factor - 1.0) * np.exp(-r2 / (2 * 45.0**2))).astype(np.float32)


def _grid_mm(shape, voxel_size_mm):
    axes = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * float(v))
        for n, v in zip(shape, voxel_size_mm)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def field_ppm_to_hz(field_ppm, b0_tesla):
    """Frequency offset in Hz of a field shift in ppm at ``b0_tesla``: gamma * B0 * ppm."""
    return field_ppm * np.float32(GYROMAGNETIC_RATIO_MHZ_PER_T * b0_tesla)


def simulate_gre(
    phantom,
    b0_tesla,
    echo_times_s,
    b0_direction,
    *,
    snr=100.0,
    receive_phase_offset=True,
    receive_bias=None,
    seed=0,
    field_ppm=None,
):
    """Multi-echo complex GRE signal of a :class:`~qsmnode.simulate.phantom.HeadPhantom`.

    b0_tesla : field strength in T. echo_times_s : echo times in s (increasing).
    b0_direction : (3,) B0 in array axes (oblique scans through this vector).
    snr : mean brain magnitude at the first echo divided by the noise std; the complex noise has
        std ``sigma / sqrt(2)`` per real/imaginary channel (|noise| rms = sigma). ``None`` or
        ``inf``: no noise.
    receive_phase_offset : True -> the smooth default phi0 (:func:`default_receive_phase`,
        several rad across the head); False -> phi0 = 0; or an array [i, j, k] in radians.
    receive_bias : None -> a 7 T centre brightening (x2) when ``b0_tesla >= 5``, none below;
        False -> none; a float -> that centre factor; or an array [i, j, k].
    seed : noise seed. field_ppm : precomputed total field (ppm), else computed from chi.

    Returns complex64 ``[i, j, k, echo]``; the phase follows DESIGN.md (positive frequency for a
    paramagnetic source, phase = phi0 + 2 pi f TE).
    """
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    if te.size == 0 or np.any(te <= 0) or np.any(np.diff(te) <= 0):
        raise ValueError(f"echo_times_s must be positive and increasing, got {echo_times_s!r}")
    if not b0_tesla > 0:
        raise ValueError(f"b0_tesla must be positive, got {b0_tesla!r}")
    shape = phantom.shape
    vox = phantom.voxel_size_mm
    if field_ppm is None:
        field_ppm = total_field_ppm(phantom.chi_ppm, vox, b0_direction)
    freq_hz = np.asarray(field_ppm_to_hz(np.asarray(field_ppm, dtype=np.float32), b0_tesla))

    if receive_phase_offset is True:
        phi0 = default_receive_phase(shape, vox)
    elif receive_phase_offset is False or receive_phase_offset is None:
        phi0 = np.zeros(shape, np.float32)
    else:
        phi0 = np.asarray(receive_phase_offset, dtype=np.float32)

    if receive_bias is None:
        bias = receive_bias_7t(shape, vox) if b0_tesla >= 5.0 else np.ones(shape, np.float32)
    elif receive_bias is False:
        bias = np.ones(shape, np.float32)
    elif np.isscalar(receive_bias):
        bias = receive_bias_7t(shape, vox, centre_factor=float(receive_bias))
    else:
        bias = np.asarray(receive_bias, dtype=np.float32)

    r2s = phantom.r2star_per_s(b0_tesla)
    amplitude0 = phantom.m0 * bias
    signal = np.empty(shape + (te.size,), dtype=np.complex64)
    for e, t in enumerate(te):
        mag = amplitude0 * np.exp(-r2s * np.float32(t))
        phase = phi0 + np.float32(2.0 * np.pi * t) * freq_hz
        signal[..., e] = mag * np.exp(1j * phase.astype(np.float32))

    if snr is not None and np.isfinite(snr):
        brain = phantom.brain_mask
        sigma = float(np.mean(np.abs(signal[..., 0][brain]))) / float(snr)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        noise = noise + 1j * rng.standard_normal(signal.shape, dtype=np.float32)
        signal += (np.float32(sigma / np.sqrt(2.0)) * noise).astype(np.complex64)
    return signal
