"""R2* and T2* maps from multi-echo GRE magnitude.

Log-linear weighted least squares: ln S(TE) = ln S0 - R2* TE, each echo weighted by S^2 (the
variance of ln S is ~ sigma^2 / S^2), which is the standard fast R2* estimator (e.g. Pei M et
al. MRM 2015;73:843 compare it with nonlinear fits; Hernando D et al. MRM 2013;70:1319 for
noise-aware weighting). Arrays ``[i, j, k, echo]``; numpy or cupy in, same backend out.
"""

from __future__ import annotations

import numpy as np

from qsmnode.errors import ReconstructionError, plain
from qsmnode.recon.backend import array_module


class R2StarNotDefined(ReconstructionError, ValueError):
    """R2* cannot be fitted from this input (for example a single echo)."""


def r2star_map(magnitude, echo_times_s, mask, *, r2star_max_per_s=500.0, t2star_max_ms=1000.0):
    """R2* (1/s) and T2* (ms) per voxel by a magnitude^2-weighted log-linear fit.

    magnitude : [i, j, k, echo] (any scale), echo_times_s : (n_echo,) s, >= 2 echoes,
    mask : bool [i, j, k] (both maps are 0 outside).
    r2star_max_per_s : R2* is clipped to [0, r2star_max_per_s] (T2* >= 2 ms by default);
    T2* = 1000 / R2* ms, clipped to [0, t2star_max_ms] (CSF, where R2* ~ 0).
    Raises :class:`R2StarNotDefined` (a ValueError) for one echo: one sample of a decay has no
    slope; send a multi-echo series to get R2*.
    Returns ``(r2star_per_s, t2star_ms)``, float32 [i, j, k].
    """
    xp = array_module(magnitude)
    mag = xp.asarray(magnitude, dtype=xp.float32)
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    if mag.ndim != 4 or mag.shape[3] != te.size:
        raise R2StarNotDefined(
            f"magnitude must be [i, j, k, echo] with one echo time per echo, got shape "
            f"{mag.shape} and {te.size} echo times", "pass all echoes with their EchoTime")
    if te.size < 2:
        raise R2StarNotDefined(
            "R2* needs at least two echoes; a single echo has no decay to fit",
            "send the multi-echo series, or disable the R2* output")
    if np.any(np.diff(te) <= 0) or np.any(te <= 0):
        raise R2StarNotDefined(f"echo times must be positive and increasing, got {plain(te)}",
                               "check EchoTime (0018,0081)")
    mask = xp.asarray(mask, dtype=bool)
    if mask.shape != mag.shape[:3]:
        raise R2StarNotDefined(f"mask {mask.shape} and magnitude {mag.shape[:3]} differ",
                               "pass a mask on the matrix of the magnitude")
    r2s_full = xp.zeros(mask.shape, xp.float32)
    t2s_full = xp.zeros(mask.shape, xp.float32)
    if not bool(mask.any()):
        return r2s_full, t2s_full
    from qsmnode.recon.phase import _bounding_box

    box = _bounding_box(mask, margin=0)  # fit only the mask's bounding box (fast, same result)
    r2s_full[box], t2s_full[box] = _fit(mag[box], te, mask[box], r2star_max_per_s, t2star_max_ms,
                                        xp.float32(1e-12) + xp.float32(1e-7) * xp.max(mag))
    return r2s_full, t2s_full


def _fit(mag, te, mask, r2star_max_per_s, t2star_max_ms, floor):
    xp = array_module(mag)
    t = xp.asarray(te, dtype=xp.float32)
    m = xp.maximum(mag, floor)
    y = xp.log(m)
    w = m * m
    sw = xp.sum(w, axis=3)
    swt = xp.sum(w * t, axis=3)
    swtt = xp.sum(w * t * t, axis=3)
    swy = xp.sum(w * y, axis=3)
    swty = xp.sum(w * t * y, axis=3)
    det = sw * swtt - swt * swt
    ok = det > xp.float32(1e-30) * xp.maximum(sw * swtt, xp.float32(1e-30))
    slope = xp.where(ok, (sw * swty - swt * swy) / xp.where(ok, det, xp.float32(1.0)), 0.0)
    r2s = xp.clip(-slope, 0.0, r2star_max_per_s).astype(xp.float32)
    inside = xp.asarray(mask, dtype=bool) & ok
    r2s = xp.where(inside, r2s, xp.float32(0.0))
    t2s = xp.where(r2s > 0, xp.float32(1000.0) / xp.where(r2s > 0, r2s, xp.float32(1.0)),
                   xp.float32(t2star_max_ms))
    t2s = xp.where(inside, xp.clip(t2s, 0.0, t2star_max_ms), xp.float32(0.0))
    return r2s.astype(xp.float32), t2s.astype(xp.float32)
