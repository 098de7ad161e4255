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

Arrays ``[i, j, k]``, float32, numpy or cupy (found from the input); FFT-based with zero padding.
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


def _gradient_symbol(pshape, voxel_size_mm, xp):
    """Sum over axes of |G_a(k)|^2 for forward differences per mm, on the rfft half grid."""
    g2 = None
    for axis, (n, v) in enumerate(zip(pshape, voxel_size_mm)):
        length = n // 2 + 1 if axis == 2 else n
        k = xp.arange(length, dtype=xp.float32)
        term = (2.0 - 2.0 * xp.cos(2.0 * np.pi * k / n)) / float(v) ** 2
        shp = [1, 1, 1]
        shp[axis] = length
        term = term.astype(xp.float32).reshape(shp)
        g2 = term if g2 is None else g2 + term
    return g2


def _grad(x, voxel_size_mm, xp, out=None):
    """Periodic forward differences per mm along i, j, k (into ``out`` buffers when given)."""
    out = out or [xp.empty_like(x) for _ in range(3)]
    for a, v in enumerate(voxel_size_mm):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[a], lo[a] = slice(1, None), slice(None, -1)
        last, first = [slice(None)] * 3, [slice(None)] * 3
        last[a], first[a] = slice(-1, None), slice(0, 1)
        g = out[a]
        xp.subtract(x[tuple(hi)], x[tuple(lo)], out=g[tuple(lo)])
        xp.subtract(x[tuple(first)], x[tuple(last)], out=g[tuple(last)])
        g *= xp.float32(1.0 / float(v))
    return out


def _grad_adjoint(ys, voxel_size_mm, xp):
    """Adjoint of :func:`_grad`: sum over axes of (y[n-1] - y[n]) / h (periodic)."""
    out = xp.zeros_like(ys[0])
    for a, (y, v) in enumerate(zip(ys, voxel_size_mm)):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[a], lo[a] = slice(1, None), slice(None, -1)
        last, first = [slice(None)] * 3, [slice(None)] * 3
        last[a], first[a] = slice(-1, None), slice(0, 1)
        scale = xp.float32(1.0 / float(v))
        out[tuple(hi)] += (y[tuple(lo)] - y[tuple(hi)]) * scale
        out[tuple(first)] += (y[tuple(last)] - y[tuple(first)]) * scale
    return out


def fansi_wtv(local_field_ppm, mask, voxel_size_mm, b0_direction, *, weights=None, alpha=4e-4,
              iterations=60, tolerance=0.005, mu_gradient=None, mu_data=1.0, pad_mm=16.0):
    """Weighted linear TV dipole inversion by ADMM (FANSI style; Milovic C et al. MRM 2018;80:814).

    Minimises ``1/2 ||W (D chi - f)||^2 + alpha ||grad chi||_1`` with splittings ``z = grad chi``
    and ``z2 = D chi``. local_field_ppm : float ``[i, j, k]`` ppm; mask : bool; weights : ``W``
    (rms 1 inside the mask, 0 outside; default the mask); alpha : TV weight (see
    :func:`regularisation_weight`); mu_gradient : ADMM penalty of the gradient split (default
    ``100 alpha``, as FANSI); mu_data : penalty of the data split. Gradients per mm.

    Returns ``(chi_ppm, info)``: chi in ppm, 0 outside the mask; info = {iterations, update}.
    """
    xp = array_module(local_field_ppm)
    shape = tuple(local_field_ppm.shape)
    pshape = padded_shape(shape, voxel_size_mm, pad_mm)
    m = xp.asarray(mask, dtype=xp.float32)
    f = pad_to(xp.asarray(local_field_ppm, dtype=xp.float32) * m, pshape)
    w = m if weights is None else xp.asarray(weights, dtype=xp.float32) * m
    w2 = pad_to(w * w, pshape)
    d = half_spectrum(dipole_kernel(pshape, voxel_size_mm, b0_direction, xp=xp))
    g2 = _gradient_symbol(pshape, voxel_size_mm, xp)
    mu1 = float(mu_gradient) if mu_gradient is not None else 100.0 * float(alpha)
    mu2 = float(mu_data)
    denom = (mu1 * g2 + mu2 * d * d).astype(xp.float32)
    denom = xp.where(denom < 1e-12, 1e-12, denom).astype(xp.float32)
    w2f = w2 * f
    thr = xp.float32(float(alpha) / mu1)

    chi = xp.zeros(pshape, dtype=xp.float32)
    z = [xp.zeros(pshape, dtype=xp.float32) for _ in range(3)]
    s = [xp.zeros(pshape, dtype=xp.float32) for _ in range(3)]
    z2 = xp.where(w2 > 0, f, 0.0).astype(xp.float32)  # unreliable data must not seed the solution
    s2 = xp.zeros(pshape, dtype=xp.float32)
    update = float("inf")
    it = 0
    g = None
    for it in range(1, int(iterations) + 1):
        rhs = _grad_adjoint([zi - si for zi, si in zip(z, s)], voxel_size_mm, xp)
        rhs *= xp.float32(mu1)
        chi_hat = (rfftn(rhs, xp) + mu2 * d * rfftn(z2 - s2, xp)) / denom
        chi_new = irfftn(chi_hat, pshape, xp)
        d_chi = irfftn(d * chi_hat, pshape, xp)
        diff = float(xp.linalg.norm((chi_new - chi).ravel()))
        norm = float(xp.linalg.norm(chi_new.ravel())) or 1.0
        chi = chi_new
        update = diff / norm
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
        if update < tolerance and it > 5:
            break
    out = crop_to(chi, shape) * m
    return out.astype(xp.float32), {"iterations": it, "update": update, "alpha": float(alpha)}
