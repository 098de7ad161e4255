"""Susceptibility referencing: whole-brain mean (always) and automatically found CSF (option).

QSM is relative: the dipole kernel vanishes at k = 0, so the map's offset is arbitrary and must be
fixed by a reference region (QSM Consensus Organization Committee. MRM 2024;91:1834-1862,
recommendation: report the reference; whole brain or CSF are the common choices; see also
Straub S et al. MRM 2017;78:204-214 on CSF referencing).

* Whole brain: the mean over the brain mask is subtracted (robust, always defined).
* CSF: the lateral ventricles, found automatically as voxels that are (a) low R2* (free water),
  (b) central (inside the inner half of the brain along every axis, > 15 mm deep), and (c) of
  low local susceptibility variance (no veins or choroid plexus), keeping the largest connected
  components. Its offset relative to whole brain is always reported when found.

Arrays ``[i, j, k]`` numpy or cupy; chi in ppm, R2* in 1/s, voxel size in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmnode.recon.backend import array_module, to_host

WHOLE_BRAIN_REFERENCE = "mean over the brain mask (QSM consensus, MRM 2024;91:1834)"
CSF_REFERENCE = (
    "automatic lateral-ventricle CSF: low R2*, central, low local chi variance "
    "(Straub S et al. MRM 2017;78:204; QSM consensus MRM 2024;91:1834)"
)


def whole_brain_mean(chi_ppm, mask) -> float:
    """Mean susceptibility (ppm) over the mask, as a float."""
    xp = array_module(chi_ppm)
    m = xp.asarray(mask, dtype=bool)
    n = int(xp.count_nonzero(m))
    return float(xp.sum(xp.where(m, chi_ppm, 0.0)) / n) if n else 0.0


def find_csf(chi_ppm, mask, r2star_per_s, voxel_size_mm, *, r2star_max_per_s=15.0, min_depth_mm=15.0,
             central_fraction=0.5, min_volume_ml=0.5):
    """Lateral-ventricle CSF mask (bool numpy ``[i, j, k]``), or None when nothing qualifies.

    chi_ppm : susceptibility (ppm); mask : brain mask; r2star_per_s : R2* map (1/s; 0 where not
    fitted counts as low); r2star_max_per_s : free-water threshold (the presets scale it with B0);
    min_depth_mm : distance from the mask surface (excludes sulcal CSF); central_fraction :
    the candidate must lie within this fraction of the brain's half-extent from its centroid along
    every axis; min_volume_ml : smallest connected component kept.
    """
    chi = to_host(chi_ppm).astype(np.float32)
    m = to_host(mask).astype(bool)
    r2s = to_host(r2star_per_s).astype(np.float32)
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if not m.any():
        return None
    depth = ndimage.distance_transform_edt(m, sampling=vox)
    idx = np.argwhere(m)
    centre = idx.mean(axis=0)
    half = (idx.max(axis=0) - idx.min(axis=0) + 1) / 2.0
    grids = np.ogrid[tuple(slice(0, n) for n in m.shape)]
    central = np.ones(m.shape, bool)
    for a in range(3):
        central &= np.abs(grids[a] - centre[a]) <= central_fraction * half[a]
    candidate = m & central & (depth > min_depth_mm) & (r2s < r2star_max_per_s)
    if not candidate.any():
        return None
    # low local variance of chi (3x3x3 neighbourhood): drop veins, plexus, partial volume
    mean = ndimage.uniform_filter(chi, 3)
    var = np.maximum(ndimage.uniform_filter(chi * chi, 3) - mean * mean, 0)
    limit = np.percentile(var[candidate], 90)
    candidate &= var <= limit
    labels, n = ndimage.label(candidate)
    if n == 0:
        return None
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, n + 1)) * float(np.prod(vox)) / 1000.0
    keep = [i + 1 for i, s in enumerate(sizes) if s >= min_volume_ml]
    if not keep:
        return None
    # the two largest components (left and right lateral ventricles, or one joined)
    keep = sorted(keep, key=lambda lab: -sizes[lab - 1])[:2]
    return np.isin(labels, keep)


def reference_susceptibility(chi_ppm, mask, *, region="whole_brain", r2star_per_s=None, voxel_size_mm=None,
                             r2star_max_per_s=15.0):
    """Reference a susceptibility map; returns ``(chi_referenced_ppm, offsets, csf_mask, notes)``.

    chi_referenced_ppm : chi minus the reference region's mean, 0 outside the mask (same backend).
    offsets : {"whole_brain": mean of the brain in the output map, "csf": mean of the CSF region in
    the output map (present when CSF was found)}; the reference region's value is 0.
    csf_mask : numpy bool or None. notes : what a reader must know (e.g. CSF not found -> whole
    brain used). region : "whole_brain" or "csf" (needs ``r2star_per_s`` and ``voxel_size_mm``).
    """
    xp = array_module(chi_ppm)
    m = xp.asarray(mask, dtype=bool)
    notes: list[str] = []
    wb = whole_brain_mean(chi_ppm, m)
    chi_wb = xp.where(m, chi_ppm - xp.float32(wb), 0.0).astype(xp.float32)
    offsets = {"whole_brain": 0.0}
    csf_mask = None
    if r2star_per_s is not None and voxel_size_mm is not None:
        csf_mask = find_csf(chi_wb, m, r2star_per_s, voxel_size_mm, r2star_max_per_s=r2star_max_per_s)
        if csf_mask is not None:
            offsets["csf"] = float(np.mean(to_host(chi_wb)[csf_mask]))
    if region == "csf":
        if csf_mask is None:
            why = ("no ventricular CSF was found" if r2star_per_s is not None
                   else "finding the ventricles needs R2* (two or more echoes)")
            notes.append(f"CSF reference requested but {why}; referenced to whole brain")
            return chi_wb, offsets, None, notes
        c = offsets["csf"]
        chi_csf = xp.where(m, chi_wb - xp.float32(c), 0.0).astype(xp.float32)
        return chi_csf, {"whole_brain": -c, "csf": 0.0}, csf_mask, notes
    if region != "whole_brain":
        raise ValueError(f"unknown reference region {region!r}; use whole_brain or csf")
    return chi_wb, offsets, csf_mask, notes
