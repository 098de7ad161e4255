"""Dipole inversion: local field (ppm) -> susceptibility (ppm).

Algorithms
----------
* TKD, thresholded k-space division: Shmueli K, de Zwart JA, van Gelderen P, et al.
  MRM 2009;62:1510-1522. One FFT pair; the fast preview.
* Weighted linear total variation by ADMM in the style of FANSI: Milovic C, Bilgic B, Zhao B,
  Acosta-Cabronero J, Tejos C. MRM 2018;80:814-821 (see also Bilgic B et al. MRM 2014;72:1444).
  The data term is weighted by the inverse field noise; splitting the data term (``z2 = D chi``)
  makes every update either diagonal in k-space or voxel-wise, so no inner solver is needed.

The regularisation weight comes from the noise, not from a constant tuned to one dataset:
:func:`regularisation_weight` is the MAP weight for Gaussian field noise and a Laplace prior on the
susceptibility gradient, ``alpha = sigma_eff^2 / b`` with ``sigma_eff`` the rms effective field
noise in ppm (measured noise plus a model-error floor that the presets set per field strength)
and ``b`` the prior gradient scale in ppm/mm. Gradients are taken per mm, so the voxel size enters
through the operator and through the measured noise.

Arrays ``[i, j, k]``, float32 (float64 on request, for reference computations), numpy or cupy (found
from the input); FFT-based with zero padding.
"""

from __future__ import annotations

import math

import numpy as np

from qsmnode.recon.backend import array_module
from qsmnode.recon.background import crop_to, half_spectrum, irfftn, pad_to, padded_shape, rfftn
from qsmnode.recon.dipole import dipole_kernel


def tkd(local_field_ppm, mask, voxel_size_mm, b0_direction, *, threshold=0.19, pad_mm=16.0):
    """Thresholded k-space division (Shmueli K et al. MRM 2009;62:1510).

    local_field_ppm : float ``[i, j, k]`` ppm (0 outside mask); mask : bool; threshold : |D| below
    which ``1/D`` is replaced by ``sign(D)/threshold``. Returns chi in ppm, 0 outside the mask.
    """
    xp = array_module(local_field_ppm)
    shape = tuple(local_field_ppm.shape)
    pshape = padded_shape(shape, voxel_size_mm, pad_mm)
    m = xp.asarray(mask, dtype=xp.float32)
    f = pad_to(xp.asarray(local_field_ppm, dtype=xp.float32) * m, pshape)
    d = half_spectrum(dipole_kernel(pshape, voxel_size_mm, b0_direction, xp=xp))
    t = float(threshold)
    safe = xp.where(d == 0, 1.0, d)
    inv = xp.where(xp.abs(d) > t, 1.0 / safe, xp.sign(d) / t).astype(xp.float32)
    chi = crop_to(irfftn(rfftn(f, xp) * inv, pshape, xp), shape) * m
    return chi.astype(xp.float32)


def regularisation_weight(field_noise_ppm, mask, *, model_error_ppm=0.003, gradient_scale_ppm_per_mm=0.05):
    """TV weight ``alpha`` (for data weights normalised to rms 1) from the field noise.

    field_noise_ppm : per-voxel noise std of the local field in ppm (``[i, j, k]``, inf where
    unreliable); model_error_ppm : floor added in quadrature for model error (background residual,
    discretisation); gradient_scale_ppm_per_mm : Laplace-prior scale of |grad chi|.
    Returns ``(alpha, sigma_eff_rms_ppm)``, plain floats. MAP: alpha = sigma_eff^2 / b.
    """
    xp = array_module(field_noise_ppm)
    m = xp.asarray(mask, dtype=bool)
    sigma = xp.where(xp.isfinite(field_noise_ppm), field_noise_ppm, xp.nan)[m]
    sigma = sigma[xp.isfinite(sigma)]
    noise_rms = float(xp.sqrt(xp.mean(sigma * sigma))) if sigma.size else 0.0
    # harmonic rms: the weighted data term is dominated by the reliable voxels
    if sigma.size:
        sig_eff = xp.sqrt(sigma * sigma + model_error_ppm**2)
        sigma_eff = float(1.0 / xp.sqrt(xp.mean(1.0 / (sig_eff * sig_eff))))
    else:
        sigma_eff = math.hypot(noise_rms, model_error_ppm)
    return sigma_eff**2 / float(gradient_scale_ppm_per_mm), sigma_eff


def data_weights(field_noise_ppm, mask, model_error_ppm=0.003):
    """Data weights ``1 / sqrt(noise^2 + model_error^2)`` inside the mask, normalised to rms 1; 0 outside."""
    xp = array_module(field_noise_ppm)
    m = xp.asarray(mask, dtype=xp.float32)
    noise = xp.where(xp.isfinite(field_noise_ppm), field_noise_ppm, xp.inf).astype(xp.float32)
    w = m / xp.sqrt(noise * noise + xp.float32(model_error_ppm) ** 2)
    rms = float(xp.sqrt(xp.sum(w * w) / max(float(xp.sum(m)), 1.0)))
    return (w / (rms or 1.0)).astype(xp.float32)


def _gradient_symbol(pshape, voxel_size_mm, xp, dtype=np.float32):
    """Sum over axes of |G_a(k)|^2 for forward differences per mm (1/mm^2), on the rfft half grid."""
    g2 = None
    for axis, (n, v) in enumerate(zip(pshape, voxel_size_mm)):
        length = n // 2 + 1 if axis == 2 else n
        k = xp.arange(length, dtype=dtype)
        term = (2.0 - 2.0 * xp.cos(2.0 * np.pi * k / n)) / float(v) ** 2
        shp = [1, 1, 1]
        shp[axis] = length
        term = term.astype(dtype).reshape(shp)
        g2 = term if g2 is None else g2 + term
    return g2


def _axis_slices(a):
    """Index tuples (hi, lo, first, last) along axis ``a`` of a 3-D array for periodic differences."""
    hi, lo, first, last = ([slice(None)] * 3 for _ in range(4))
    hi[a], lo[a], first[a], last[a] = slice(1, None), slice(None, -1), slice(0, 1), slice(-1, None)
    return tuple(hi), tuple(lo), tuple(first), tuple(last)


def _grad(x, voxel_size_mm, xp, out=None):
    """Periodic forward differences per mm along i, j, k (into ``out`` buffers when given)."""
    out = out or [xp.empty_like(x) for _ in range(3)]
    for a, v in enumerate(voxel_size_mm):
        hi, lo, first, last = _axis_slices(a)
        g = out[a]
        xp.subtract(x[hi], x[lo], out=g[lo])
        xp.subtract(x[first], x[last], out=g[last])
        g *= g.dtype.type(1.0 / float(v))
    return out


def _grad_adjoint(ys, voxel_size_mm, xp):
    """Adjoint of :func:`_grad`: sum over axes of (y[n-1] - y[n]) / h (periodic)."""
    out = xp.zeros_like(ys[0])
    for a, (y, v) in enumerate(zip(ys, voxel_size_mm)):
        hi, lo, first, last = _axis_slices(a)
        scale = y.dtype.type(1.0 / float(v))
        out[hi] += (y[lo] - y[hi]) * scale
        out[first] += (y[last] - y[first]) * scale
    return out


def relative_update(new, old, region, xp):
    """``||R (new - old)|| / ||R new||`` over the region ``R`` (bool or 0/1 array of the same shape).

    Dimensionless; 1.0 when ``R new`` is 0. Sums are accumulated in float64, so the value does not
    depend on the summation order of the backend. Stopping tests of the iterative solvers use it on
    the brain mask: outside the mask the solution is not constrained by data and must not decide.
    """
    diff = xp.where(region, new - old, 0)
    num = float(xp.sum(diff * diff, dtype=xp.float64))
    kept = xp.where(region, new, 0)
    den = float(xp.sum(kept * kept, dtype=xp.float64))
    return math.sqrt(num / den) if den > 0 else 1.0


def fansi_wtv(local_field_ppm, mask, voxel_size_mm, b0_direction, *, weights=None, alpha=4e-4,
              iterations=60, tolerance=0.005, consecutive=3, mu_gradient=None, mu_data=1.0, pad_mm=16.0,
              dtype=np.float32):
    """Weighted linear TV dipole inversion by ADMM (FANSI style; Milovic C et al. MRM 2018;80:814).

    Minimises ``1/2 ||W (D chi - f)||^2 + alpha ||grad chi||_1`` with splittings ``z = grad chi``
    and ``z2 = D chi``. local_field_ppm : float ``[i, j, k]`` ppm; mask : bool; weights : ``W``
    (rms 1 inside the mask, 0 outside; default the mask); alpha : TV weight (see
    :func:`regularisation_weight`); mu_gradient : ADMM penalty of the gradient split (default
    ``100 alpha``, as FANSI); mu_data : penalty of the data split. Gradients per mm.
    dtype : working precision (float32 default; float64 for reference computations).

    Stopping (Boyd S et al., Found Trends Mach Learn 2011;3:1, sec. 3.3, on the primal iterate):
    after ``iterations`` iterations, or once the relative update of chi inside the mask,
    :func:`relative_update` ``(chi_k, chi_k-1, mask)``, has stayed below ``tolerance`` for
    ``consecutive`` iterations in a row. Measured inside the mask because outside it chi is not
    constrained by data; required on consecutive iterations so that a single dip of a
    slowly-varying update does not decide. The mean of chi over the padded grid is not determined
    by the model (D(0) = G(0) = 0) and is set to 0 (minimum norm): dividing its rounding noise by a
    floored denominator would shift chi by a random constant every iteration.

    Returns ``(chi_ppm, info)``: chi in ppm (``dtype``), 0 outside the mask; info = {iterations,
    update (the last relative update in the mask), converged (the stopping test triggered), alpha}.
    """
    xp = array_module(local_field_ppm)
    dt = np.dtype(dtype)
    shape = tuple(local_field_ppm.shape)
    pshape = padded_shape(shape, voxel_size_mm, pad_mm)
    m = xp.asarray(mask, dtype=dt)
    inside = pad_to(xp.asarray(mask, dtype=bool), pshape)
    f = pad_to(xp.asarray(local_field_ppm, dtype=dt) * m, pshape)
    w = m if weights is None else xp.asarray(weights, dtype=dt) * m
    w2 = pad_to(w * w, pshape)
    d = half_spectrum(dipole_kernel(pshape, voxel_size_mm, b0_direction, xp=xp, dtype=dt))
    g2 = _gradient_symbol(pshape, voxel_size_mm, xp, dt)
    mu1 = float(mu_gradient) if mu_gradient is not None else 100.0 * float(alpha)
    mu2 = float(mu_data)
    denom = (mu1 * g2 + mu2 * d * d).astype(dt)
    inv_denom = xp.where(denom > 0, 1.0 / xp.where(denom > 0, denom, 1.0), 0.0).astype(dt)  # 0 at k = 0
    w2f = w2 * f
    thr = dt.type(float(alpha) / mu1)
    fft = {"xp": xp, "dtype": dt}

    chi = xp.zeros(pshape, dtype=dt)
    z = [xp.zeros(pshape, dtype=dt) for _ in range(3)]
    s = [xp.zeros(pshape, dtype=dt) for _ in range(3)]
    z2 = xp.where(w2 > 0, f, 0.0).astype(dt)  # unreliable data must not seed the solution
    s2 = xp.zeros(pshape, dtype=dt)
    update = float("inf")
    below = 0
    it = 0
    g = None
    for it in range(1, int(iterations) + 1):
        rhs = _grad_adjoint([zi - si for zi, si in zip(z, s)], voxel_size_mm, xp)
        rhs *= dt.type(mu1)
        chi_hat = (rfftn(rhs, **fft) + mu2 * d * rfftn(z2 - s2, **fft)) * inv_denom
        chi_new = irfftn(chi_hat, pshape, **fft)
        d_chi = irfftn(d * chi_hat, pshape, **fft)
        update = relative_update(chi_new, chi, inside, xp)
        chi = chi_new
        below = below + 1 if update < tolerance else 0
        if below >= consecutive:
            break
        g = _grad(chi, voxel_size_mm, xp, out=g)
        for a in range(3):
            v = g[a]
            v += s[a]  # v = grad chi + s (in the gradient buffer)
            # z = soft-threshold(v); s = v - z = clip(v, -thr, thr)
            xp.clip(v, -thr, thr, out=s[a])
            xp.subtract(v, s[a], out=z[a])
        v2 = d_chi + s2
        z2 = (w2f + mu2 * v2) / (w2 + mu2)
        s2 = v2 - z2
    out = crop_to(chi, shape) * m
    info = {"iterations": it, "update": update, "converged": below >= consecutive, "alpha": float(alpha)}
    return out.astype(dt), info
