"""The unit dipole kernel in k-space.

D(k) = 1/3 - (k . b0)^2 / |k|^2, with D(0) = 0 (the mean field is not defined by the model).
Salomir R et al. Concepts Magn Reson B 2003;19B:26-34; Marques JP, Bowtell R, Concepts Magn
Reson B 2005;25B:65-78.
"""

from __future__ import annotations

import numpy as np


def dipole_kernel(shape, voxel_size_mm, b0_direction, xp=np, dtype="float32"):
    """Dipole kernel on the FFT grid of ``shape`` (unshifted, matches ``xp.fft.fftn``).

    shape : (ni, nj, nk); voxel_size_mm : (3,) mm along array axes;
    b0_direction : (3,) B0 direction in array axes (normalised here).
    Returns a real array of ``shape`` (``dtype``): field_ppm = ifft(D * fft(chi_ppm)).
    """
    b0 = np.asarray(b0_direction, dtype=np.float64)
    b0 = b0 / np.linalg.norm(b0)
    freqs = [xp.fft.fftfreq(n, d=float(v)).astype(dtype) for n, v in zip(shape, voxel_size_mm)]
    ki, kj, kk = xp.meshgrid(*freqs, indexing="ij")
    k_dot_b0 = ki * b0[0] + kj * b0[1] + kk * b0[2]
    k2 = ki * ki + kj * kj + kk * kk
    k2[0, 0, 0] = 1.0
    kernel = xp.asarray(1.0 / 3.0, dtype=dtype) - k_dot_b0 * k_dot_b0 / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(dtype, copy=False)
