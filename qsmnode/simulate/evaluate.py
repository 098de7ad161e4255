"""Accuracy of a susceptibility map against a simulation's truth, overall and by depth.

Used by the tests and ``bench/edge_accuracy.py``. Errors near the brain's edge are where real
reconstructions fail (residual background field, unreliable phase next to bone and air), so the
error is also reported in three shells of the estimate's mask: the outer 2 voxels, 2-6 mm, and the
interior beyond 6 mm. Maps are compared fairly: truth and estimate are both demeaned over the
estimate's mask (the reference is arbitrary). NRMSE as the 2016 QSM challenge (Langkammer C et al.
MRM 2018;79:1661): 100 ||x - t|| / ||t||, in %.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def depth_shells(mask, voxel_size_mm):
    """Boolean shells of ``mask`` (bool ``[i, j, k]``): ``outer_2_voxels`` (city-block distance to
    the outside <= 2 voxels), ``2_to_6_mm`` and ``interior`` (Euclidean depth > 6 mm)."""
    m = np.asarray(mask, bool)
    outer = m & ~ndimage.binary_erosion(m, iterations=2, border_value=0)
    depth = ndimage.distance_transform_edt(np.pad(m, 1), sampling=voxel_size_mm)[1:-1, 1:-1, 1:-1]
    return {"outer_2_voxels": outer, "2_to_6_mm": m & ~outer & (depth <= 6.0), "interior": m & (depth > 6.0)}


def edge_accuracy(chi_ppm, truth_ppm, mask, truth_brain_mask, voxel_size_mm) -> dict[str, float]:
    """NRMSE (%) over the mask and per shell, RMS error (ppm) per shell, and the fraction of the
    mask outside the brain (``truth_brain_mask``) and of the brain missed, both in %."""
    m = np.asarray(mask, bool)
    if not m.any():
        raise ValueError("the mask is empty")
    est = np.where(m, chi_ppm - chi_ppm[m].mean(), 0.0)
    tru = np.where(m, truth_ppm - truth_ppm[m].mean(), 0.0)
    out = {"nrmse_pct": float(100 * np.linalg.norm(est[m] - tru[m]) / np.linalg.norm(tru[m]))}
    for name, shell in depth_shells(m, voxel_size_mm).items():
        if shell.any():
            err = est[shell] - tru[shell]
            out[f"rms_error_ppm_{name}"] = float(np.sqrt(np.mean(err**2)))
            out[f"nrmse_pct_{name}"] = float(100 * np.linalg.norm(err) / max(np.linalg.norm(tru[shell]), 1e-12))
    brain = np.asarray(truth_brain_mask, bool)
    out["mask_outside_brain_pct"] = float(100 * np.count_nonzero(m & ~brain) / np.count_nonzero(m))
    out["brain_missed_pct"] = float(100 * np.count_nonzero(brain & ~m) / max(np.count_nonzero(brain), 1))
    return out
