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


def region_accuracy(chi_ppm, mask, truth_ppm, labels, lesions, voxel_size_mm, label_ids) -> dict:
    """Deep-grey slope, vein ratio and each lesion's sign, all referenced to the mask's mean.

    labels / label_ids : the truth's label map and its name -> id table; lesions : dicts with
    ``kind`` (``microbleed`` | ``calcification``), ``centre_ijk`` and ``radius_mm``.
    deep_grey_slope : least-squares slope through the origin of estimated against true nucleus
    means; vein_ratio : estimated / true vein mean; lesions : per lesion its estimated and true
    mean over the voxels within its radius, whether it is in the mask and has the right sign.
    """
    m = np.asarray(mask, bool)
    est = chi_ppm - chi_ppm[m].mean()
    tru = truth_ppm - truth_ppm[m].mean()
    nuclei = ("caudate", "putamen", "globus_pallidus", "thalamus", "substantia_nigra", "red_nucleus")
    pairs = [(tru[sel].mean(), est[sel].mean()) for name in nuclei
             if (sel := m & (labels == label_ids[name])).any()]
    t, e = (np.array(v) for v in zip(*pairs))
    vein = m & (labels == label_ids["vein"])
    out = {"deep_grey_slope": float(np.dot(t, e) / np.dot(t, t)),
           "vein_ratio": float(est[vein].mean() / tru[vein].mean()) if vein.any() else float("nan"),
           "lesions": []}
    grid = np.indices(m.shape, sparse=True)
    for les in lesions:
        r2 = sum(((g - c) * v) ** 2 for g, c, v in zip(grid, les["centre_ijk"], voxel_size_mm))
        ball = r2 <= (les["radius_mm"] + 0.5 * min(voxel_size_mm)) ** 2
        inside = ball & m
        sign = 1.0 if les["kind"] == "microbleed" else -1.0
        est_mean = float(est[inside].mean()) if inside.any() else 0.0
        out["lesions"].append({"kind": les["kind"], "site": les.get("site", ""), "in_mask": bool(m[tuple(les["centre_ijk"])]),
                               "estimated_ppm": est_mean, "true_ppm": float(tru[ball].mean()),
                               "right_sign": bool(inside.any() and sign * est_mean > 0)})
    return out


#: what a report should call each kind of simulated lesion (:class:`qsmnode.report.findings.Focus` kind)
FOCUS_KIND = {"microbleed": "paramagnetic", "calcification": "diamagnetic"}


def foci_near_lesions(foci, lesions, voxel_size_mm, reach_mm=2.0) -> list[list]:
    """Per lesion (dicts with ``centre_ijk`` and ``radius_mm``), the foci (objects with
    ``centroid_ijk``) whose centre lies within the lesion's radius + ``reach_mm`` (mm)."""
    vox = np.asarray(voxel_size_mm, dtype=float)
    return [[f for f in foci
             if np.linalg.norm((np.asarray(f.centroid_ijk) - les["centre_ijk"]) * vox) <= les["radius_mm"] + reach_mm]
            for les in lesions]
