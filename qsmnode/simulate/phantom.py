"""Numerical head phantom for QSM: susceptibility, proton density and R2* per tissue.

The head is built from smooth analytic shapes in millimetres (ellipsoids, tubes, spheres and a
resolution-independent texture made of random plane waves), so the same anatomy comes out at any
matrix and voxel size. Array axes follow DESIGN.md for an axial scan: ``i`` = right -> left
(patient x, LPS), ``j`` = anterior -> posterior (patient y), ``k`` = inferior -> superior
(patient z). Susceptibility is in ppm relative to water (CSF = 0).

Tissue values follow the ranges reported in the QSM literature (e.g. Deistung A et al.
NeuroImage 2013;65:299-314 for deep grey matter; Haacke EM et al. JMRI 2015;42:23-41), the
sinus air value is the air-water difference (+9.4 ppm; Schenck JF, Med Phys 1996;23:815-850),
and R2* values at 3 T follow Peran P et al. / Yao B et al. NeuroImage 2009;44:1259-1266,
scaled linearly with B0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

LABELS: dict[str, int] = {
    "air": 0,
    "scalp": 1,
    "skull": 2,
    "sinus": 3,
    "csf": 4,
    "gm": 5,
    "wm": 6,
    "caudate": 7,
    "putamen": 8,
    "globus_pallidus": 9,
    "thalamus": 10,
    "substantia_nigra": 11,
    "red_nucleus": 12,
    "dentate": 13,
    "vein": 14,
    "microbleed": 15,
    "calcification": 16,
    "marrow": 17,  # fatty bone marrow of the skull (qsmnode.simulate.realistic_head)
}

#: susceptibility in ppm relative to water, per label
CHI_PPM: dict[str, float] = {
    "air": 0.0,  # air outside the head: kept at 0 (no signal), see module docstring
    "scalp": 0.0,
    "skull": -2.0,
    "sinus": 9.4,
    "csf": 0.0,
    "gm": 0.02,
    "wm": -0.03,
    "caudate": 0.09,
    "putamen": 0.07,
    "globus_pallidus": 0.18,
    "thalamus": 0.04,
    "substantia_nigra": 0.15,
    "red_nucleus": 0.12,
    "dentate": 0.11,
    "vein": 0.45,
    "microbleed": 0.8,
    "calcification": -0.6,
    "marrow": -1.0,
}

#: proton density (relative, arbitrary units)
M0: dict[str, float] = {
    "air": 0.0,
    "scalp": 0.9,
    "skull": 0.0,
    "sinus": 0.0,
    "csf": 1.0,
    "gm": 0.85,
    "wm": 0.70,
    "caudate": 0.80,
    "putamen": 0.80,
    "globus_pallidus": 0.75,
    "thalamus": 0.78,
    "substantia_nigra": 0.75,
    "red_nucleus": 0.75,
    "dentate": 0.75,
    "vein": 0.80,
    "microbleed": 0.50,
    "calcification": 0.30,
    "marrow": 0.55,
}

#: R2* in 1/s at 3 T; other fields scale linearly with B0 (see HeadPhantom.r2star_per_s)
R2STAR_3T_PER_S: dict[str, float] = {
    "air": 0.0,
    "scalp": 30.0,
    "skull": 0.0,
    "sinus": 0.0,
    "csf": 2.0,
    "gm": 17.0,
    "wm": 20.0,
    "caudate": 24.0,
    "putamen": 27.0,
    "globus_pallidus": 40.0,
    "thalamus": 22.0,
    "substantia_nigra": 40.0,
    "red_nucleus": 35.0,
    "dentate": 33.0,
    "vein": 45.0,
    "microbleed": 100.0,
    "calcification": 80.0,
    "marrow": 80.0,
}

#: labels that make up the brain mask (everything inside the inner skull except sinuses)
BRAIN_LABELS: tuple[str, ...] = (
    "csf", "gm", "wm", "caudate", "putamen", "globus_pallidus", "thalamus",
    "substantia_nigra", "red_nucleus", "dentate", "vein", "microbleed", "calcification",
)

DEEP_GREY_NUCLEI: tuple[str, ...] = (
    "caudate", "putamen", "globus_pallidus", "thalamus", "substantia_nigra", "red_nucleus",
    "dentate",
)


@dataclass
class HeadPhantom:
    """A numerical head on the array axes ``[i, j, k]`` (i: R->L, j: A->P, k: I->S).

    chi_ppm : float32, susceptibility in ppm relative to water (CSF = 0).
    labels : int16, values from :data:`LABELS`.
    brain_mask : bool, GM, WM, CSF, nuclei, veins and foci inside the inner skull (no sinuses).
    m0 : float32, proton density (relative units; brain tissue 0.7-1.0).
    voxel_size_mm : (3,) voxel size in mm along (i, j, k).
    microbleeds / calcifications : lists of ``(center_ijk, radius_mm)``.
    seed : the seed the texture and foci positions were drawn with.
    """

    chi_ppm: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    m0: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    microbleeds: list[tuple[tuple[int, int, int], float]] = field(default_factory=list)
    calcifications: list[tuple[tuple[int, int, int], float]] = field(default_factory=list)
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def label_mask(self, name: str) -> np.ndarray:
        """Boolean mask of one tissue, by name from :data:`LABELS`."""
        return self.labels == LABELS[name]

    def r2star_per_s(self, b0_tesla: float) -> np.ndarray:
        """R2* in 1/s at field ``b0_tesla`` (T): the 3 T table scaled linearly with B0.

        R2* of tissue grows roughly linearly with B0 (Yao B et al. NeuroImage 2009;44:1259;
        Peters AM et al. MRI 2007;25:748). CSF keeps a floor of 1/s. Returns float32 [i, j, k].
        """
        if not b0_tesla > 0:
            raise ValueError(f"b0_tesla must be positive, got {b0_tesla!r}")
        table = np.zeros(max(LABELS.values()) + 1, dtype=np.float32)
        for name, idx in LABELS.items():
            table[idx] = R2STAR_3T_PER_S[name] * b0_tesla / 3.0
        table[LABELS["csf"]] = max(1.0, table[LABELS["csf"]])
        return table[self.labels]


def texture(x, y, z, rng, n_waves=24, wavelength_mm=(14.0, 30.0)):
    """Smooth random field (zero mean, unit variance) from random plane waves in mm."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2.0 * np.pi / rng.uniform(*wavelength_mm)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        out += np.cos(
            np.float32(k * direction[0]) * x + np.float32(k * direction[1]) * y
            + np.float32(k * direction[2]) * z + np.float32(phase)
        )
    return out * np.float32(np.sqrt(2.0 / n_waves))


def ellipsoid_rho(x, y, z, center, semi):
    """Normalised ellipsoid radius: < 1 inside."""
    return np.sqrt(
        ((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
        + ((z - center[2]) / semi[2]) ** 2
    )


def ellipsoid_sdist(x, y, z, center, semi):
    """Approximate signed distance in mm to an ellipsoid surface (< 0 inside)."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    rho = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
    grad = np.sqrt((dx / semi[0] ** 2) ** 2 + (dy / semi[1] ** 2) ** 2 + (dz / semi[2] ** 2) ** 2)
    grad = np.maximum(grad / np.maximum(rho, 1e-6), 1e-6)
    return ((rho - 1.0) / grad).astype(np.float32)


def _fraction(sdist, h):
    """Partial-volume fraction inside a surface with signed distance ``sdist`` (mm), voxel ``h``."""
    return np.clip(0.5 - sdist / h, 0.0, 1.0).astype(np.float32)


def tube(x, y, z, points, radius_mm):
    """Voxels within ``radius_mm`` of a polyline through ``points`` (mm).

    x, y, z : open grids of shapes (ni, 1, 1), (1, nj, 1), (1, 1, nk) in mm (ascending). Each
    segment is evaluated on its bounding box only.
    """
    inside = np.zeros((x.shape[0], y.shape[1], z.shape[2]), dtype=bool)
    axes = [x.ravel(), y.ravel(), z.ravel()]
    pts = np.asarray(points, dtype=np.float64)
    for a, b in zip(pts[:-1], pts[1:]):
        box = []
        for d in range(3):
            lo = min(a[d], b[d]) - radius_mm
            hi = max(a[d], b[d]) + radius_mm
            box.append(slice(int(np.searchsorted(axes[d], lo)),
                             int(np.searchsorted(axes[d], hi, side="right"))))
        if any(s.stop <= s.start for s in box):
            continue
        xs = axes[0][box[0]][:, None, None]
        ys = axes[1][box[1]][None, :, None]
        zs = axes[2][box[2]][None, None, :]
        ab = b - a
        length2 = max(float(ab @ ab), 1e-12)
        t = ((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1] + (zs - a[2]) * ab[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        d2 = ((xs - a[0] - t * ab[0]) ** 2 + (ys - a[1] - t * ab[1]) ** 2
              + (zs - a[2] - t * ab[2]) ** 2)
        inside[tuple(box)] |= d2 <= radius_mm**2
    return inside


def skull_base_z(y):
    """Height (mm) of the floor of the cranial cavity as a function of y (A->P, mm)."""
    # anterior fossa high, middle fossa lower, posterior fossa lowest
    return np.interp(y, [-100.0, -38.0, -8.0, 22.0, 40.0, 100.0],
                     [-22.0, -22.0, -44.0, -44.0, -62.0, -62.0]).astype(np.float32)


def head_phantom(matrix=(96, 96, 72), voxel_size_mm=(2.0, 2.0, 2.0), seed=0) -> HeadPhantom:
    """Build the numerical head phantom.

    matrix : (ni, nj, nk) voxels; voxel_size_mm : (3,) mm. The head measures about
    144 x 180 x 136 mm (LR x AP x SI), centred in the field of view; a smaller field of view
    crops it. seed : draws the cortical texture and the positions of the microbleeds and
    calcifications (deterministic for a seed).

    Tissues (chi in ppm, see :data:`CHI_PPM`): scalp, skull (-2), air sinuses (+9.4, no signal:
    frontal and sphenoid, the source of a strong background field), CSF (rim, sulci, lateral
    and third ventricles), textured cortex GM (+0.02) over WM (-0.03), cerebellum, brainstem,
    bilateral deep grey nuclei, veins (+0.45; superior sagittal and straight sinus, internal
    cerebral veins along j, medullary/cortical veins along k, i and oblique), three
    microbleeds (+0.8) and two calcifications (-0.6) in white matter away from veins.
    """
    shape = tuple(int(n) for n in matrix)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"matrix must be three sizes >= 8, got {matrix!r}")
    vox = tuple(float(v) for v in voxel_size_mm)
    if len(vox) != 3 or min(vox) <= 0:
        raise ValueError(f"voxel_size_mm must be three positive sizes, got {voxel_size_mm!r}")
    rng = np.random.default_rng(seed)

    x = ((np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2) * vox[0])[:, None, None]
    y = ((np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2) * vox[1])[None, :, None]
    z = ((np.arange(shape[2], dtype=np.float32) - (shape[2] - 1) / 2) * vox[2])[None, None, :]
    full = shape

    labels = np.zeros(full, dtype=np.int16)
    L = LABELS

    def paint(region, name, where=None):
        region = np.broadcast_to(region, full)
        if where is not None:
            region = region & where
        labels[region] = L[name]

    # --- head layers (signed distances in mm, for partial volume at the bone surfaces) -----
    h = float(np.mean(vox))
    sd_head = ellipsoid_sdist(x, y, z, (0, 0, 0), (72, 90, 68))
    sd_skull = ellipsoid_sdist(x, y, z, (0, 0, 0), (67, 85, 63))
    z_base = skull_base_z(y)
    sd_cranial = np.maximum(ellipsoid_sdist(x, y, z, (0, 0, 0), (61, 79, 57)), z_base - z)
    r_stem = np.sqrt(x**2 + (y - 10.0) ** 2)
    sd_stem = np.maximum(r_stem - 11.0, z + 15.0)
    sd_cranial = np.minimum(sd_cranial, np.maximum(sd_stem, sd_skull))
    head = sd_head < 0
    skull_outer = sd_skull < 0
    cranial = sd_cranial < 0  # brain + CSF region
    brainstem = np.broadcast_to((r_stem < 11.0) & (z < -15.0), full) & skull_outer
    paint(head, "scalp")
    paint(skull_outer, "skull")

    # --- brain: CSF rim, cortex with gyral texture, white matter -------------------------------
    tex_gm = texture(x, y, z, rng)
    tex_sulci = texture(x, y, z, rng, n_waves=32, wavelength_mm=(18.0, 36.0))
    rho_b = ellipsoid_rho(x, y, z, (0, 0, 0), (58.5, 76.5, 54.5))
    depth = np.minimum((1.0 - rho_b) * 63.0, z - z_base - 2.5)  # mm below the brain surface
    depth = np.where(brainstem, np.maximum(depth, 11.0 - np.sqrt(x**2 + (y - 10.0) ** 2) - 1.0),
                     depth)
    depth = depth + 0.8 * tex_gm  # a rough, textured surface
    paint(np.ones(full, bool), "csf", cranial)
    brain = cranial & (depth > 0)
    paint(np.ones(full, bool), "wm", brain)
    gm_shell = depth < (3.0 + 1.2 * tex_gm)
    gm_sulcal = (depth < 10.0) & (np.abs(tex_sulci) < 0.55)
    paint(gm_shell | gm_sulcal, "gm", brain)
    sulci = (depth < 8.0) & (np.abs(tex_sulci) < 0.15)
    fissure = (np.abs(x) < 1.2) & (z > 8.0) & (depth < 30.0)
    paint(sulci | fissure, "csf", brain)

    # cerebellum (folia: GM outside, WM core) -- below the tentorium, posterior fossa
    rho_c = ellipsoid_rho(x, y, z, (0, 50, -40), (46, 26, 18))
    cerebellum = (rho_c < 1) & cranial & (depth > 0)
    tentorium = cerebellum & (rho_c > 0.93)
    paint(np.ones(full, bool), "gm", cerebellum)
    cereb_depth = (1.0 - rho_c) * 20.0 + 0.6 * tex_sulci
    paint((cereb_depth > 5.0) & (np.abs(tex_gm) > 0.35), "wm", cerebellum)
    paint(tentorium, "csf")

    # --- ventricles -------------------------------------------------------------------------
    for s in (-1.0, 1.0):
        paint(ellipsoid_rho(x, y, z, (s * 8.0, -2.0, 12.0), (4.5, 27.0, 6.0)) < 1, "csf")
        # posterior/temporal horns
        paint(tube(x, y, z, [(s * 12, 22, 10), (s * 20, 30, -4), (s * 26, 10, -16)], 2.5), "csf",
              brain)
    paint(ellipsoid_rho(x, y, z, (0.0, 6.0, -2.0), (1.8, 10.0, 8.0)) < 1, "csf")

    # --- deep grey nuclei (bilateral) -------------------------------------------------------------
    nuclei = [
        ("caudate", (13.0, -16.0, 10.0), (4.5, 9.0, 7.0)),
        ("putamen", (24.0, -3.0, 0.0), (4.5, 13.0, 8.0)),
        ("globus_pallidus", (18.0, -1.0, -2.0), (3.0, 7.0, 5.0)),
        ("thalamus", (9.5, 13.0, 4.0), (6.5, 11.0, 7.0)),
        ("substantia_nigra", (9.0, 8.0, -18.0), (3.0, 6.0, 2.5)),
        ("red_nucleus", (4.5, 13.0, -15.0), (3.0, 3.0, 3.0)),
        ("dentate", (15.0, 50.0, -40.0), (5.0, 6.0, 4.0)),
    ]
    for name, (cx, cy, cz), semi in nuclei:
        for s in (-1.0, 1.0):
            paint(ellipsoid_rho(x, y, z, (s * cx, cy, cz), semi) < 1, name)

    # --- veins (deoxygenated blood) ---------------------------------------------------------------
    t = np.deg2rad(np.linspace(20.0, 200.0, 19))
    sss = [(0.0, -72.0 * np.cos(a), 51.0 * np.sin(a) - 0.0) for a in t]
    veins = [
        (sss, 2.5),  # superior sagittal sinus
        ([(0.0, 20.0, 10.0), (0.0, 45.0, -2.0), (0.0, 66.0, -17.0)], 2.0),  # straight sinus
        ([(-3.0, -8.0, 12.0), (-3.0, 18.0, 9.0)], 1.25),  # internal cerebral veins (along j)
        ([(3.0, -8.0, 12.0), (3.0, 18.0, 9.0)], 1.25),
        ([(-32.0, -15.0, 8.0), (-32.0, -15.0, 36.0)], 1.25),  # medullary veins along B0 (k)
        ([(33.0, 5.0, 8.0), (33.0, 5.0, 36.0)], 1.25),
        ([(22.0, 30.0, 26.0), (45.0, 30.0, 26.0)], 1.0),  # across B0, along i
        ([(-20.0, -40.0, 18.0), (-38.0, -28.0, 30.0)], 1.25),  # oblique
    ]
    vein_mask = np.zeros(full, dtype=bool)
    for points, radius in veins:
        vein_mask |= tube(x, y, z, points, radius)
    paint(vein_mask, "vein", cranial)

    # --- sinuses (air in bone, below/in front of the brain) ------------------------------------
    sd_sinus = np.minimum.reduce([
        ellipsoid_sdist(x, y, z, (0.0, -77.0, -30.0), (16.0, 6.0, 10.0)),  # frontal
        ellipsoid_sdist(x, y, z, (0.0, -30.0, -46.0), (11.0, 10.0, 8.0)),  # sphenoid
        ellipsoid_sdist(x, y, z, (0.0, -55.0, -42.0), (12.0, 12.0, 10.0)),  # ethmoid
    ])
    sd_sinus = np.maximum(sd_sinus, np.maximum(sd_skull, -sd_cranial))  # air only inside bone
    paint(sd_sinus < 0, "sinus")

    # --- focal lesions in white matter, away from veins, nuclei and each other ----------------
    microbleeds, calcifications = _place_foci(labels, vox, rng)

    def sphere(center_ijk, radius_mm):
        c = [(center_ijk[a] - (shape[a] - 1) / 2) * vox[a] for a in range(3)]
        return ellipsoid_rho(x, y, z, c, (radius_mm,) * 3) < 1

    for center, radius in microbleeds:
        paint(sphere(center, radius), "microbleed")
    for center, radius in calcifications:
        paint(sphere(center, radius), "calcification")

    chi_table = np.zeros(max(L.values()) + 1, dtype=np.float32)
    m0_table = np.zeros_like(chi_table)
    for name, idx in L.items():
        chi_table[idx] = CHI_PPM[name]
        m0_table[idx] = M0[name]
    brain_mask = np.isin(labels, [L[n] for n in BRAIN_LABELS])
    chi = chi_table[labels]
    m0 = m0_table[labels]
    # partial volume outside the brain: bone and air fractions from the smooth surfaces, so the
    # skull and sinus walls are not voxel staircases. Brain voxels keep their pure tissue value
    # (a clean ground truth for accuracy tests).
    f_sinus = _fraction(sd_sinus, h)
    f_bone = np.clip(_fraction(sd_skull, h) - _fraction(sd_cranial, h) - f_sinus, 0.0, 1.0)
    f_scalp = np.clip(_fraction(sd_head, h) - _fraction(sd_skull, h), 0.0, 1.0)
    outside = ~brain_mask
    chi_background = CHI_PPM["skull"] * f_bone + CHI_PPM["sinus"] * f_sinus
    chi[outside] = chi_background[outside]
    m0[outside] = (M0["scalp"] * f_scalp)[outside]
    return HeadPhantom(
        chi_ppm=chi,
        m0=m0,
        labels=labels,
        brain_mask=brain_mask,
        voxel_size_mm=vox,
        microbleeds=microbleeds,
        calcifications=calcifications,
        seed=int(seed),
    )


def _place_foci(labels, vox, rng):
    """Pick centres for 3 microbleeds (r 1-2 mm) and 2 calcifications (r 1.5-2.5 mm) in WM."""
    # distances on a grid of about 2 mm (fast at any matrix), candidates mapped back
    stride = [max(1, int(round(2.0 / v))) for v in vox]
    coarse = labels[::stride[0], ::stride[1], ::stride[2]]
    cvox = [v * s for v, s in zip(vox, stride)]
    wm_coarse = coarse == LABELS["wm"]
    depth_in_wm = ndimage.distance_transform_edt(wm_coarse, sampling=cvox)
    dist_vein = ndimage.distance_transform_edt(coarse != LABELS["vein"], sampling=cvox)
    candidates = np.argwhere((depth_in_wm > 4.0) & (dist_vein > 10.0)) * np.asarray(stride)
    wm = labels == LABELS["wm"]
    if len(candidates) == 0:
        candidates = np.argwhere(wm)
    if len(candidates) == 0:  # field of view too small to hold a brain
        return [], []
    order = rng.permutation(len(candidates))
    chosen: list[np.ndarray] = []
    radii = [rng.uniform(1.0, 2.0) for _ in range(3)] + [rng.uniform(1.5, 2.5) for _ in range(2)]
    for min_sep in (25.0, 15.0, 8.0, 0.0):
        for idx in order:
            if len(chosen) == 5:
                break
            c = candidates[idx]
            if all(np.linalg.norm((c - p) * np.asarray(vox)) > min_sep for p in chosen):
                chosen.append(c)
        if len(chosen) == 5:
            break
    foci = [(tuple(int(v) for v in c), float(r)) for c, r in zip(chosen, radii)]
    return foci[:3], foci[3:5]
