"""Compact susceptibility foci: candidate microbleeds (paramagnetic) and calcifications (diamagnetic).

QSM separates what SWI cannot: haemosiderin in a cerebral microbleed is strongly paramagnetic
(positive susceptibility), a calcification is diamagnetic (negative). Deoxygenated venous blood
is paramagnetic too, so veins must not be reported as microbleeds; they are told apart by shape.

Method (compact-focus definition of microbleeds: round/ovoid, <= 10 mm, Greenberg SM et al.,
Lancet Neurol 2009;8:165-174; sign discrimination by QSM: Chen W et al., Radiology
2014;270:496-505; blob/tube eigenvalue reasoning: Frangi AF et al., MICCAI 1998, LNCS 1496):

1. Contrast: ``c = chi - local background`` (normalised Gaussian convolution over the mask,
   sigma ``background_sigma_mm``), so a focus is measured against the tissue around it.
   Search inside the mask eroded by ``edge_margin_mm`` (0 by default: the reconstruction
   already leaves the mask's outermost layer out, :func:`qsmnode.recon.mask.peel_edge`, and the
   report counts candidates centred at the edge apart, :mod:`qsmnode.report.review`). For each
   sign ``s`` (+1 paramagnetic, -1 diamagnetic), ``x = s * c``.
2. Connected components (6-connectivity) of ``x > t``, ``t = max(threshold_ppm,
   noise_factor * sigma)`` with ``sigma`` the robust (MAD) spread of ``c`` in the search mask;
   a component's most extreme voxel must exceed ``peak_threshold_ppm``.
3. A component is a focus when it is small (equivalent-sphere diameter <= ``max_diameter_mm``),
   compact (value-weighted principal-axis elongation ``sqrt(l_max / l_min)`` <=
   ``max_elongation``) and blob-like: at the maximum of ``x`` smoothed at ``blob_scales_mm``
   the Hessian eigenvalues are all negative with ``min|l| / max|l| >= min_blob_ratio``. A tube
   (vein) has no curvature along its axis, so a short above-threshold fragment of a vein --
   for example one bead of a thin vein sampled on a coarse grid -- fails this test even though
   the fragment alone looks round.
4. Elongated or large components (veins, deep grey-matter nuclei, or a bleed touching a vein)
   are searched for embedded nodules: voxels above ``nodule_contrast`` times the component's
   median contrast; the sub-components that pass step 3 are foci. A tube of uniform
   susceptibility has no such nodule, so vein segments are not reported.

Everything is a *candidate*: the report words them as needing a reader's confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_STRUCTURE_6 = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class Focus:
    """One compact susceptibility focus.

    kind : ``"paramagnetic"`` (candidate microbleed / haemosiderin) or ``"diamagnetic"``
        (candidate calcification).
    centroid_ijk : value-weighted centroid in array index coordinates (i, j, k), float.
    volume_mm3 : voxel count times voxel volume.
    mean_ppm, peak_ppm : mean and most extreme susceptibility in the focus, signed, ppm
        (peak is the maximum for paramagnetic, the minimum for diamagnetic foci).
    elongation : principal-axis ratio ``sqrt(l_max / l_min)`` (1 = sphere, large = tube).
    equivalent_diameter_mm : diameter of the sphere of the same volume.
    n_voxels : number of voxels.
    edge_distance_mm : distance (mm) from the focus' centre (the voxel of its centroid) to the
        nearest voxel outside the mask or the field of view (a centre in the outermost layer: one
        voxel size). A lesion just under the cortex touches the edge; its centre does not.
    """

    kind: str
    centroid_ijk: tuple[float, float, float]
    volume_mm3: float
    mean_ppm: float
    peak_ppm: float
    elongation: float
    equivalent_diameter_mm: float
    n_voxels: int
    edge_distance_mm: float = float("inf")

    @property
    def candidate_label(self) -> str:
        """Reader-facing wording of what the focus may be."""
        if self.kind == "paramagnetic":
            return "candidate microbleed / haemosiderin deposit"
        return "candidate calcification"


def principal_axis_elongation(
    coords_ijk: np.ndarray, weights: np.ndarray, voxel_size_mm
) -> float:
    """``sqrt(l_max / l_min)`` of the weighted covariance of voxel positions in mm.

    ``coords_ijk``: (n, 3) integer voxel indices; ``weights``: (n,) non-negative.
    Each voxel contributes an isotropic extent ``max(d)^2 / 12`` per axis (the largest voxel
    dimension, so an anisotropic voxel still counts as round), so one voxel is a sphere, not a
    degenerate point. Returns 1.0 for an isotropic blob.
    """
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    pts = coords_ijk.astype(np.float64) * vox
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = (pts * w[:, None]).sum(axis=0)
    centred = pts - mean
    cov = (centred * w[:, None]).T @ centred + np.eye(3) * (vox.max() ** 2 / 12.0)
    eig = np.linalg.eigvalsh(cov)
    return float(np.sqrt(max(eig[-1], 1e-12) / max(eig[0], 1e-12)))


def edge_distance_mm(mask: np.ndarray, voxel_size_mm) -> np.ndarray:
    """Per voxel of ``mask``, the Euclidean distance (mm) to the nearest voxel outside it,
    counting the array's border as outside (a cut field of view is an edge too); 0 outside."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    distance = ndimage.distance_transform_edt(padded, sampling=np.asarray(voxel_size_mm, float))
    return distance[1:-1, 1:-1, 1:-1].astype(np.float32)


def _robust_sigma(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    med = np.median(values)
    return float(1.4826 * np.median(np.abs(values - med)))


def local_contrast_ppm(chi_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm,
                       background_sigma_mm: float = 5.0) -> np.ndarray:
    """``chi - local background`` inside ``mask`` (ppm); 0 outside.

    The background is the Gaussian-weighted mean of ``chi`` over the mask (normalised
    convolution, sigma ``background_sigma_mm``), so a focus is measured against the tissue
    around it (white matter is about -0.03 ppm, not 0). The background is smooth, so on fine
    grids it is computed on blocks of ``f`` voxels per axis (``f`` about sigma / 2.5 voxels)
    and repeated back: the same result to well under 0.01 ppm, ~8x faster at 1 mm.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    sigma_vox = background_sigma_mm / np.asarray(voxel_size_mm, dtype=np.float64)
    factors = np.maximum(1, np.floor(sigma_vox / 2.5)).astype(int)
    m = mask.astype(np.float32)
    num = chi * m
    if np.any(factors > 1):
        shape = np.array(chi.shape)
        padded = -(-shape // factors) * factors
        pad = [(0, int(p - n)) for p, n in zip(padded, shape)]
        blocks = [int(x) for pair in zip(padded // factors, factors) for x in pair]

        def block_mean(a):
            return np.pad(a, pad).reshape(blocks).mean(axis=(1, 3, 5))

        num_s = ndimage.gaussian_filter(block_mean(num), sigma_vox / factors, mode="constant")
        den_s = ndimage.gaussian_filter(block_mean(m), sigma_vox / factors, mode="constant")
        background = num_s / np.maximum(den_s, 1e-3)
        for axis, f in enumerate(factors):
            background = np.repeat(background, f, axis=axis)
        background = background[: shape[0], : shape[1], : shape[2]]
    else:
        num_s = ndimage.gaussian_filter(num, sigma_vox, mode="constant")
        den_s = ndimage.gaussian_filter(m, sigma_vox, mode="constant")
        background = num_s / np.maximum(den_s, 1e-3)
    return np.where(mask, chi - background, 0.0).astype(np.float32)


def hessian_blob_ratio(x: np.ndarray, region: np.ndarray, sigma_vox, voxel_size_mm=(1, 1, 1)
                       ) -> float:
    """Blob-versus-tube measure of the bright structure ``region`` in ``x``.

    ``x`` is clipped at the region's own maximum (so a brighter neighbour does not dominate),
    smoothed with ``sigma_vox`` (voxels per axis), and at its maximum inside ``region`` the
    Hessian (in mm^-2, using ``voxel_size_mm``) is formed. Returns ``min|l| / max|l|`` of its
    eigenvalues if all are negative (a local maximum), else 0: about 1 for a sphere, about 0
    for a tube, which has no curvature along its axis (Frangi AF et al., MICCAI 1998).
    """
    x = np.minimum(x, x[region].max())
    smooth = ndimage.gaussian_filter(x, sigma_vox, mode="nearest")
    candidates = np.where(region, smooth, -np.inf)
    idx = np.unravel_index(int(np.argmax(candidates)), x.shape)
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    h = np.empty((3, 3))
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndimage.gaussian_filter(x, sigma_vox, order=order, mode="nearest")
            h[a, b] = h[b, a] = d[idx] / (vox[a] * vox[b])
    eig = np.linalg.eigvalsh(h)
    if eig.max() >= 0:
        return 0.0
    mags = np.abs(eig)
    return float(mags.min() / mags.max())


def find_foci(
    chi_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm,
    *,
    threshold_ppm: float = 0.1,
    peak_threshold_ppm: float = 0.15,
    noise_factor: float = 4.0,
    max_elongation: float = 1.9,
    max_diameter_mm: float = 10.0,
    min_blob_ratio: float = 0.5,
    blob_scales_mm: tuple[float, ...] = (2.0,),
    nodule_contrast: float = 1.5,
    background_sigma_mm: float = 5.0,
    edge_margin_mm: float = 0.0,
) -> list[Focus]:
    """Compact paramagnetic and diamagnetic foci in a susceptibility map (see module doc).

    Parameters
    ----------
    chi_ppm : float ``[i, j, k]`` susceptibility in ppm.
    mask : bool ``[i, j, k]`` brain mask.
    voxel_size_mm : voxel size along (i, j, k) in mm.
    threshold_ppm : a focus is the connected region whose contrast to the local background
        exceeds this (raised to ``noise_factor`` robust SDs of the contrast map), ppm.
    peak_threshold_ppm : its most extreme voxel must exceed this contrast, ppm.
    max_elongation : largest principal-axis ratio of a focus (a vein segment is larger). Two
        equal adjacent voxels have a ratio of 2: on a coarse grid such a pair cannot be told
        from a fragment of a thin vein, so it is not reported (a limitation, not a finding).
    max_diameter_mm : largest equivalent-sphere diameter of a focus (microbleeds: <= 10 mm).
    min_blob_ratio : smallest Hessian ``min|l|/max|l|`` at the focus peak (tube ~0, blob ~1),
        not asked of a focus centred within 2 voxels of the mask edge (the edge halves it),
        at every scale of ``blob_scales_mm`` (the larger scale bridges the beads of a thin
        vein sampled on a coarse grid, which look like isolated dots at the voxel scale).
    nodule_contrast : inside an elongated/large region, a nodule must exceed this multiple of
        the region's median contrast.
    background_sigma_mm : scale of the local background (see :func:`local_contrast_ppm`).
    edge_margin_mm : the mask is eroded by this much before searching.

    Returns the foci, paramagnetic first, each kind sorted by decreasing |peak|. Reported
    ``mean_ppm``/``peak_ppm`` are susceptibilities (not contrasts), so their sign is the sign
    of the tissue.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if chi.shape != mask.shape or chi.ndim != 3:
        raise ValueError(f"chi_ppm {chi.shape} and mask {mask.shape} must be the same 3-D shape")
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(3)
    voxel_volume = float(np.prod(vox))

    search = mask
    n_erode = int(round(edge_margin_mm / float(vox.min()))) if edge_margin_mm > 0 else 0
    if n_erode > 0:
        search = ndimage.binary_erosion(mask, _STRUCTURE_6, iterations=n_erode)
    if not search.any():
        return []
    contrast = local_contrast_ppm(chi, mask, vox, background_sigma_mm)
    sigma = _robust_sigma(contrast[search])
    threshold = max(float(threshold_ppm), noise_factor * sigma)
    peak_threshold = max(float(peak_threshold_ppm), threshold)
    sigma_vox = [float(scale) / vox for scale in blob_scales_mm]
    margin = np.ceil(3 * np.max(sigma_vox, axis=0)).astype(int)
    params = dict(max_elongation=max_elongation, max_diameter_mm=max_diameter_mm,
                  peak_threshold=peak_threshold, min_blob_ratio=min_blob_ratio,
                  sigma_vox=sigma_vox, vox=vox, voxel_volume=voxel_volume)
    edge_mm = edge_distance_mm(mask, vox)

    foci: list[Focus] = []
    for sign, kind in ((1.0, "paramagnetic"), (-1.0, "diamagnetic")):
        x = np.where(search, sign * contrast, 0.0).astype(np.float32)
        labels, _ = ndimage.label(x > threshold, structure=_STRUCTURE_6)
        found: list[Focus] = []
        for index, slc in enumerate(ndimage.find_objects(labels), start=1):
            if slc is None:
                continue
            # a box around the region, with room for the Hessian's smoothing
            box = tuple(slice(max(0, s.start - m), min(n, s.stop + m))
                        for s, m, n in zip(slc, margin, x.shape))
            offset = np.array([b.start for b in box])
            region = labels[box] == index
            xb = x[box]
            chib = sign * chi[box]
            params["edge_mm"] = edge_mm[box]
            focus = _compact_focus(region, xb, chib, offset, sign, kind, **params)
            if focus is not None:
                found.append(focus)
                continue
            if region.sum() < 2:
                continue
            # Elongated or large: look for nodules standing out of the structure.
            level = max(threshold, nodule_contrast * float(np.median(xb[region])))
            sub_labels, n_sub = ndimage.label(region & (xb > level), structure=_STRUCTURE_6)
            for sub in range(1, n_sub + 1):
                focus = _compact_focus(sub_labels == sub, xb, chib, offset, sign, kind, **params)
                if focus is not None:
                    found.append(focus)
        found.sort(key=lambda f: -abs(f.peak_ppm))
        foci.extend(found)
    return foci


def _compact_focus(region, x, chi_signed, offset, sign, kind, *, max_elongation,
                   max_diameter_mm, peak_threshold, min_blob_ratio, sigma_vox, vox,
                   voxel_volume, edge_mm) -> Focus | None:
    """``region`` (bool, in the box) as a Focus if it passes every test, else None.
    ``x``: signed contrast (bright = the focus' sign) in the box; ``chi_signed``: sign * chi;
    ``edge_mm``: :func:`edge_distance_mm` in the box."""
    coords = np.argwhere(region)
    n = coords.shape[0]
    if n == 0:
        return None
    v = x[region].astype(np.float64)
    if v.max() < peak_threshold:
        return None
    volume = n * voxel_volume
    diameter = float((6.0 * volume / np.pi) ** (1.0 / 3.0))
    if diameter > max_diameter_mm:
        return None
    elongation = principal_axis_elongation(coords, v, vox)
    if elongation > max_elongation:
        return None
    centroid = (coords * (v / v.sum())[:, None]).sum(axis=0) + offset
    centre_edge_mm = float(edge_mm[tuple(np.clip(np.round(centroid - offset).astype(int), 0,
                                                 np.asarray(edge_mm.shape) - 1))])
    # the mask edge cuts a lesion just under the cortex in half, and half a blob has no curvature
    # across the cut: there only the elongation test tells it from a vein along the surface
    near_edge = centre_edge_mm <= 2.0 * float(np.max(vox))
    if not near_edge and any(hessian_blob_ratio(x, region, sv, vox) < min_blob_ratio for sv in sigma_vox):
        return None
    c = chi_signed[region].astype(np.float64)
    return Focus(
        kind=kind,
        centroid_ijk=tuple(float(q) for q in centroid),
        volume_mm3=float(volume),
        mean_ppm=float(sign * c.mean()),
        peak_ppm=float(sign * c.max()),
        elongation=elongation,
        equivalent_diameter_mm=diameter,
        n_voxels=int(n),
        edge_distance_mm=centre_edge_mm,
    )


def whole_brain_statistics(chi_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm) -> dict[str, float]:
    """Summary of the susceptibility inside ``mask``: volume (ml), mean, standard deviation,
    median and 5th/95th percentiles (ppm)."""
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(chi_ppm, dtype=np.float64)[mask]
    voxel_volume_ml = float(np.prod(np.asarray(voxel_size_mm, dtype=np.float64))) / 1000.0
    if values.size == 0:
        return {"volume_ml": 0.0, "mean_ppm": 0.0, "std_ppm": 0.0, "median_ppm": 0.0,
                "p05_ppm": 0.0, "p95_ppm": 0.0}
    p05, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "volume_ml": float(values.size * voxel_volume_ml),
        "mean_ppm": float(values.mean()),
        "std_ppm": float(values.std()),
        "median_ppm": float(p50),
        "p05_ppm": float(p05),
        "p95_ppm": float(p95),
    }
