"""Background field removal: total field -> local field inside the brain mask.

Algorithms
----------
* V-SHARP: variable-radius sophisticated harmonic artifact reduction for phase data.
  Li W, Wu B, Liu C. NeuroImage 2011;55:1645-1656; Wu B, Li W, Guidon A, Liu C.
  MRM 2012;67:137-147. Erodes the mask by the smallest sphere radius.
* PDF: projection onto dipole fields. Liu T, Khalidov I, de Rochefort L, et al.
  NMR Biomed 2011;24:1129-1136. Keeps the whole mask; uses the field-noise weights.

Conventions: arrays ``[i, j, k]`` on one backend (numpy or cupy, found from the input); fields in
any unit (Hz or ppm, returned in the same unit: both methods are linear); radii and padding in mm;
float32 / complex64 internally (PDF: float64 on request, for reference computations). FFTs are
zero-padded by ``pad_mm`` on every side to a fast length so that circular convolution does not
wrap the head onto itself.
"""

from __future__ import annotations

import math

import numpy as np

from qsmnode.recon.backend import array_module
from qsmnode.recon.dipole import dipole_kernel

# --------------------------------------------------------------------------------------------
# FFT helpers shared with inversion.py (scipy.fft with worker threads on the CPU, cupy.fft on GPU)


def _fft_module(xp):
    if xp is np:
        import scipy.fft as sfft

        return sfft, {"workers": -1}
    return xp.fft, {}


def complex_dtype(dtype):
    """The complex dtype of a real precision: float32 -> complex64, float64 -> complex128."""
    return np.result_type(dtype, np.complex64)


def rfftn(x, xp=None, dtype=np.float32):
    """Real-to-complex n-D FFT computed in ``dtype`` (float32 -> complex64 out, float64 -> complex128)."""
    xp = xp or array_module(x)
    mod, kw = _fft_module(xp)
    return mod.rfftn(x.astype(dtype, copy=False), **kw).astype(complex_dtype(dtype), copy=False)


def irfftn(x, shape, xp=None, dtype=np.float32):
    """Inverse of :func:`rfftn` for a real array of ``shape``, returned in ``dtype`` (float32 default)."""
    xp = xp or array_module(x)
    mod, kw = _fft_module(xp)
    return mod.irfftn(x.astype(complex_dtype(dtype), copy=False), s=tuple(shape), **kw).astype(dtype, copy=False)


def half_spectrum(kernel_full):
    """The rfftn half (last axis 0..n//2) of a Hermitian-symmetric full-grid kernel."""
    n = kernel_full.shape[-1]
    return kernel_full[..., : n // 2 + 1]


def padded_shape(shape, voxel_size_mm, pad_mm):
    """Shape padded by ``pad_mm`` on each side, rounded up to a fast FFT length."""
    import scipy.fft as sfft

    out = []
    for n, v in zip(shape, voxel_size_mm):
        extra = 2 * int(math.ceil(float(pad_mm) / float(v)))
        out.append(int(sfft.next_fast_len(int(n) + extra, real=True)))
    return tuple(out)


def pad_to(x, shape):
    """Zero-pad ``x`` at the high end of every axis to ``shape`` (cropping is ``x[:n0, :n1, :n2]``)."""
    xp = array_module(x)
    if tuple(x.shape) == tuple(shape):
        return x
    out = xp.zeros(shape, dtype=x.dtype)
    out[: x.shape[0], : x.shape[1], : x.shape[2]] = x
    return out


def crop_to(x, shape):
    return x[: shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------------------------


def sphere_kernel(shape, voxel_size_mm, radius_mm, xp=np):
    """Normalised spherical-mean-value kernel (sum 1), centred on voxel (0,0,0) with wrap-around.

    Includes voxels whose centre is within ``radius_mm`` (mm, anisotropic voxels honoured).
    """
    axes = []
    for n, v in zip(shape, voxel_size_mm):
        idx = np.arange(n)
        idx = np.where(idx > n // 2, idx - n, idx).astype(np.float32) * float(v)
        axes.append(idx)
    di = axes[0][:, None, None]
    dj = axes[1][None, :, None]
    dk = axes[2][None, None, :]
    ball = (di * di + dj * dj + dk * dk) <= float(radius_mm) ** 2 + 1e-6
    kernel = ball.astype(np.float32)
    kernel /= kernel.sum()
    return xp.asarray(kernel)


def default_vsharp_radii_mm(voxel_size_mm, radius_max_mm=12.0, radius_min_mm=2.0):
    """Radii (mm) from ``radius_max_mm`` down to ``max(radius_min_mm, largest voxel)`` in steps of
    the smallest voxel size (the smallest sphere always holds at least the 6 face neighbours)."""
    vox = [float(v) for v in voxel_size_mm]
    r_min = max(float(radius_min_mm), max(vox))
    r_max = max(float(radius_max_mm), r_min)
    step = min(vox)
    radii = []
    r = r_max
    while r > r_min + 1e-6:
        radii.append(round(r, 4))
        r -= step
    radii.append(round(r_min, 4))
    return radii


def vsharp(total_field, mask, voxel_size_mm, *, radii_mm=None, threshold=0.05, pad_mm=None):
    """V-SHARP background removal (Li W et al. NeuroImage 2011; Wu B et al. MRM 2012;67:137).

    total_field : float ``[i, j, k]`` (Hz or ppm); mask : bool ``[i, j, k]``;
    voxel_size_mm : (3,); radii_mm : sphere radii in mm, largest first (default
    :func:`default_vsharp_radii_mm`); threshold : TSVD threshold of the deconvolution by the
    largest-radius kernel ``1 - S``; pad_mm : zero padding per side (default the largest radius).

    Returns ``(local_field, eroded_mask)``: the local field (same unit, 0 outside the eroded mask)
    and the mask eroded by the smallest sphere. The field mean is not determined (reference later).
    """
    xp = array_module(total_field)
    shape = tuple(total_field.shape)
    radii = sorted(radii_mm or default_vsharp_radii_mm(voxel_size_mm), reverse=True)
    pshape = padded_shape(shape, voxel_size_mm, pad_mm if pad_mm is not None else radii[0])
    m = pad_to(xp.asarray(mask, dtype=xp.float32), pshape)
    f = pad_to(xp.asarray(total_field, dtype=xp.float32), pshape) * m
    f_hat = rfftn(f, xp)
    m_hat = rfftn(m, xp)
    local_hp = xp.zeros(pshape, dtype=xp.float32)
    assigned = xp.zeros(pshape, dtype=bool)
    highpass_max = None
    eroded = None
    for r in radii:
        s_hat = xp.real(rfftn(sphere_kernel(pshape, voxel_size_mm, r, xp), xp)).astype(xp.float32)
        eroded = irfftn(m_hat * s_hat, pshape, xp) > 0.999
        hp = irfftn(f_hat * (1.0 - s_hat), pshape, xp)
        new = eroded & ~assigned
        local_hp = xp.where(new, hp, local_hp)
        assigned = assigned | eroded
        if highpass_max is None:
            highpass_max = 1.0 - s_hat
    inverse = xp.where(xp.abs(highpass_max) > threshold, 1.0 / xp.where(highpass_max == 0, 1, highpass_max), 0.0)
    local = irfftn(rfftn(local_hp, xp) * inverse.astype(xp.float32), pshape, xp)
    final_mask = crop_to(eroded, shape)
    local = crop_to(local, shape) * final_mask
    return local.astype(xp.float32), final_mask


def _dot(a, b, xp):
    """Inner product of two real arrays of one shape, accumulated in float64 (plain float)."""
    return float(xp.sum(a * b, dtype=xp.float64))


class _Basis:
    """Orthonormal vectors of one length, kept as rows of preallocated blocks (one BLAS call per block)."""

    def __init__(self, n, dtype, xp, block=8):
        self.n, self.dtype, self.xp, self.block = n, dtype, xp, block
        self.blocks, self.used = [], 0

    def add(self, v):
        """Append ``v / ||v||`` (flat array of length n); ignored when ``v`` is 0."""
        norm = math.sqrt(_dot(v, v, self.xp))
        if norm == 0:
            return
        if self.used == len(self.blocks) * self.block:
            self.blocks.append(self.xp.empty((self.block, self.n), dtype=self.dtype))
        self.blocks[-1][self.used % self.block] = v / self.dtype.type(norm)
        self.used += 1

    def project_out(self, r):
        """Remove from the flat array ``r`` (in place) its components along the stored vectors."""
        for i, block in enumerate(self.blocks):
            rows = block[: min(self.block, self.used - i * self.block)]
            r -= (rows @ r) @ rows


def _cg(apply_a, b, x0, tol, max_iterations, xp, consecutive=2):
    """Conjugate gradients with full reorthogonalisation, for a symmetric positive semi-definite operator.

    Stops after ``max_iterations`` or once ``rel = ||b - A x|| / ||b||`` has stayed below ``tol`` for
    ``consecutive`` iterations in a row (a single dip of a plateauing residual does not decide).

    In floating point, CG's residuals lose their orthogonality, first to the earliest (largest)
    residuals, and convergence is delayed by an amount that depends on rounding (Meurant G,
    Strakos Z. Acta Numerica 2006;15:471-542; Greenbaum A. Iterative Methods for Solving Linear
    Systems, SIAM 1997, ch. 4). In PDF the first residual, dominated by the background field, is
    ~300 times the one where CG stops, and float32 iterates differed from float64 ones by ~2 % of
    the local field after 30 iterations (CPU from GPU likewise). Each new residual is therefore
    re-orthogonalised against all previous ones (classical Gram-Schmidt, one block product per 8
    residuals), which restores the exact-arithmetic iterates to ~1e-5 relative in float32. Cost:
    one stored array per iteration. Inner products are accumulated in float64.

    Returns ``(x, iterations, rel, converged)``.
    """
    x = x0
    r = b - apply_a(x)
    p = r.copy()
    rs = _dot(r, r, xp)
    b_norm = math.sqrt(_dot(b, b, xp)) or 1.0
    basis = _Basis(r.size, r.dtype, xp)
    basis.add(r.ravel())
    it = 0
    below = 0
    rel = math.sqrt(rs) / b_norm
    while it < max_iterations and below < consecutive and rs > 0:
        ap = apply_a(p)
        denom = _dot(p, ap, xp)
        if denom <= 0:
            break
        a = r.dtype.type(rs / denom)
        x = x + a * p
        r = r - a * ap
        basis.project_out(r.reshape(-1))
        basis.add(r.ravel())
        rs_new = _dot(r, r, xp)
        p = r + r.dtype.type(rs_new / rs) * p
        rs = rs_new
        it += 1
        rel = math.sqrt(rs) / b_norm
        below = below + 1 if rel < tol else 0
    return x, it, rel, below >= consecutive or rs == 0


def pdf(total_field, mask, voxel_size_mm, b0_direction, *, weights=None, tolerance=0.01,
        max_iterations=60, pad_mm=24.0, dtype=np.float32):
    """Projection onto dipole fields (Liu T et al. NMR Biomed 2011;24:1129).

    Finds susceptibility sources ``x`` outside the mask whose field best matches the total field
    inside it, in the weighted least-squares sense, by conjugate gradients on the normal equations
    ``(1-M) D M W^2 M D (1-M) x = (1-M) D M W^2 f``; the local field is ``M (f - D (1-M) x)``.

    total_field : float ``[i, j, k]`` (Hz or ppm); mask : bool; voxel_size_mm : (3,);
    b0_direction : (3,) array axes; weights : data weights ``[i, j, k]`` (e.g. 1 / field noise,
    any scale), default uniform; tolerance : CG relative residual; pad_mm : padding per side;
    dtype : working precision (float32 default; float64 for reference computations).

    Stopping (see :func:`_cg`): the early stop is PDF's regularisation (a tighter fit starts to
    explain local field by outside sources). The residual of the normal equations,
    ``(1-M) D M W^2 (local field)``, is a function of the weighted data misfit inside the mask only;
    CG stops when it has been below ``tolerance`` (relative to its start) on 2 consecutive
    iterations, or after ``max_iterations``. The CG iterates are reorthogonalised, so the residual
    sequence, and with it the iteration where it crosses the tolerance, does not depend on rounding.

    Returns ``(local_field, mask, info)``: the mask is not eroded; info = {iterations, residual,
    converged}.
    """
    xp = array_module(total_field)
    dt = np.dtype(dtype)
    shape = tuple(total_field.shape)
    pshape = padded_shape(shape, voxel_size_mm, pad_mm)
    m = pad_to(xp.asarray(mask, dtype=dt), pshape)
    outside = 1.0 - m
    f = pad_to(xp.asarray(total_field, dtype=dt), pshape) * m
    if weights is None:
        w2 = m
    else:
        w = pad_to(xp.asarray(weights, dtype=dt), pshape) * m
        w = w / (math.sqrt(_dot(w, w, xp) / max(float(xp.sum(m)), 1.0)) or 1.0)
        w2 = w * w
    d = half_spectrum(dipole_kernel(pshape, voxel_size_mm, b0_direction, xp=xp, dtype=dt))

    def conv_d(x):
        return irfftn(rfftn(x, xp, dt) * d, pshape, xp, dt)

    def apply_a(x):
        return outside * conv_d(w2 * conv_d(outside * x))

    b = outside * conv_d(w2 * f)
    x, iters, rel, converged = _cg(apply_a, b, xp.zeros(pshape, dtype=dt), tolerance, max_iterations, xp)
    background = conv_d(outside * x)
    local = crop_to((f - background) * m, shape)
    info = {"iterations": iters, "residual": rel, "converged": bool(converged)}
    return local.astype(dt), xp.asarray(mask, dtype=bool), info
