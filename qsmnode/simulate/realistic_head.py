"""A harder numerical head: what real heads have at the brain's edge, simulated below the voxel.

:mod:`qsmnode.simulate.phantom` is kind to a reconstruction: every voxel is one tissue, the brain
meets the skull in a clean step, and the signal is evaluated at voxel centres. Real heads are not:

* a CSF layer of 1-4 mm (varying) between a folded cortical ribbon and the inner table, with
  cortical veins in the sulci and the superior sagittal sinus at the surface;
* a skull of outer table, fatty marrow (diploe) and inner table, under a fatty scalp (fat has a
  chemical shift of -3.4 ppm, so its phase differs from water's at every echo);
* air close to the cortex: frontal, ethmoid and sphenoid sinuses under the orbitofrontal cortex,
  mastoid air cells and ear canals beside the temporal lobes, under a thin bone floor;
* soft tissue of the face and a neck below the skull base, in a clinical field of view;
* lesions at several depths: deep white matter, within 5 mm of the cortex, beside a vein.

The anatomy is built on a grid ``supersample`` times finer than the acquisition, the field and
the complex signal are computed there, and the signal is averaged into acquisition voxels
(:func:`simulate_gre_subvoxel`): edge voxels get the partial volume, intra-voxel dephasing and
phase bias that real edge voxels have. Truth on the acquisition grid: the brain-tissue
susceptibility (mean over the brain part of each voxel) and the brain fraction.

Axes as :mod:`qsmnode.simulate.phantom` (i: R->L, j: A->P, k: I->S), mm, chi in ppm relative to
water. Tissue values as there; fat -3.4 ppm chemical shift (e.g. Hamilton G et al. NMR Biomed
2011;24:784), scalp fat and marrow susceptibility from Schenck JF, Med Phys 1996;23:815.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qsmnode.simulate.forward import simulate_gre, total_field_ppm
from qsmnode.simulate.phantom import (
    BRAIN_LABELS,
    LABELS,
    HeadPhantom,
    ellipsoid_rho,
    ellipsoid_sdist,
    skull_base_z,
    texture,
    tube,
)

FAT_SHIFT_PPM = -3.4

#: tissues outside the brain that this head adds: (label used, chi ppm, m0, fat fraction)
_OUTER_TISSUES = {
    "scalp": (0.4, 0.9, 0.7),  # mostly fat
    "soft_tissue": (0.0, 0.7, 0.1),  # face, neck, muscle (painted with the scalp label)
    "cortical_bone": (-2.2, 0.0, 0.0),
    "marrow": (-1.0, 0.55, 0.8),
    "air": (9.4, 0.0, 0.0),
}


@dataclass
class RealisticHead:
    """The head on the fine grid, plus its truth on the acquisition grid.

    fine : :class:`HeadPhantom` on the fine grid (voxel = acquisition voxel / ``supersample``);
    fat_fraction : float32 fine grid, for the chemical shift; supersample : fine voxels per
    acquisition voxel along each axis. Truth on the acquisition grid (``[i, j, k]``):
    chi_ppm : brain-tissue susceptibility (ppm; 0 where no brain); brain_fraction : [0, 1];
    brain_mask : fraction >= 0.5; labels : label at each voxel's centre; depth_mm : depth below
    the brain surface (mm, < 0 outside); lesions : dicts with kind, centre_ijk (acquisition
    voxels), radius_mm, chi_ppm, depth_mm and where it sits.
    """

    fine: HeadPhantom
    fat_fraction: np.ndarray
    supersample: int
    chi_ppm: np.ndarray
    brain_fraction: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    depth_mm: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    lesions: list[dict] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain_mask.shape)  # type: ignore[return-value]

    def label_mask(self, name: str) -> np.ndarray:
        return self.labels == LABELS[name]

    def as_phantom(self) -> HeadPhantom:
        """The acquisition-grid truth as a :class:`HeadPhantom` (for code that takes one)."""
        mb = [(tuple(l["centre_ijk"]), l["radius_mm"]) for l in self.lesions if l["kind"] == "microbleed"]
        ca = [(tuple(l["centre_ijk"]), l["radius_mm"]) for l in self.lesions if l["kind"] == "calcification"]
        return HeadPhantom(chi_ppm=self.chi_ppm, labels=self.labels, brain_mask=self.brain_mask,
                           m0=block_mean(self.fine.m0, self.supersample), voxel_size_mm=self.voxel_size_mm,
                           microbleeds=mb, calcifications=ca, seed=self.fine.seed)


def block_mean(a, factor):
    """Mean over blocks of ``factor``^3 fine voxels (``a``'s shape divisible by ``factor``)."""
    f = int(factor)
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def realistic_head(matrix=(96, 112, 88), voxel_size_mm=(2.0, 2.0, 2.0), supersample=2, seed=0) -> RealisticHead:
    """Build the head (see the module docstring) for an acquisition of ``matrix`` voxels of
    ``voxel_size_mm`` (mm). The default is a clinical field of view: 192 x 224 x 176 mm with
    the vertex near the top and the neck below. ``seed`` draws the cortical folding texture.
    """
    s = int(supersample)
    shape = tuple(int(n) * s for n in matrix)
    vox = tuple(float(v) / s for v in voxel_size_mm)
    rng = np.random.default_rng(seed)
    x, y, z = (((np.arange(n, dtype=np.float32) - (n - 1) / 2) * v).reshape([-1 if a == d else 1 for d in range(3)])
               for a, (n, v) in enumerate(zip(shape, vox)))
    zc = float(matrix[2] * voxel_size_mm[2]) / 2 - 74.0  # head centre: vertex 4 mm below the top
    zr = z - np.float32(zc)  # z relative to the head centre

    L = LABELS
    labels = np.zeros(shape, np.int16)
    chi = np.zeros(shape, np.float32)
    m0 = np.zeros(shape, np.float32)
    fat = np.zeros(shape, np.float32)

    def paint(region, label, chi_ppm, m0_value, fat_fraction=0.0):
        region = np.broadcast_to(region, shape)
        labels[region] = L[label]
        chi[region] = chi_ppm
        m0[region] = m0_value
        fat[region] = fat_fraction

    # --- head, neck, scalp, skull layers ---------------------------------------------------------
    r_neck = np.sqrt(x**2 + ((y - 12.0) / 1.15) ** 2)
    neck = (r_neck < 52.0) & (zr < -30.0)
    head = (ellipsoid_sdist(x, y, zr, (0, 0, 0), (74, 92, 70)) < 0) | neck
    paint(head, "scalp", *_OUTER_TISSUES["scalp"])
    z_floor = skull_base_z(y) + 2.0
    sd_cranial = np.maximum(ellipsoid_sdist(x, y, zr, (0, 0, 0), (62.5, 80.5, 58.5)), z_floor - zr)
    # skull: 1.5 mm outer table, 3.5 mm marrow, 1.5 mm inner table over the vault
    sd_outer = ellipsoid_sdist(x, y, zr, (0, 0, 0), (69, 87, 65))
    vault = (sd_outer < 0) & (zr > z_floor - 6.0)
    paint(vault, "skull", *_OUTER_TISSUES["cortical_bone"])
    paint(vault & (sd_outer < -1.5) & (sd_cranial > 1.5), "marrow", *_OUTER_TISSUES["marrow"])
    # below the skull base: face and neck soft tissue, a 3 mm bone floor under the brain
    below = (sd_outer < 0) & (zr <= z_floor - 6.0)
    paint(below, "scalp", *_OUTER_TISSUES["soft_tissue"])
    paint((sd_outer < 0) & (zr > z_floor - 6.0) & (zr <= z_floor), "skull", *_OUTER_TISSUES["cortical_bone"])
    # vertebral ring around the spinal cord in the neck
    r_spine = np.sqrt(x**2 + (y - 20.0) ** 2)
    paint((r_spine > 8.0) & (r_spine < 15.0) & (zr < z_floor - 6.0) & head, "skull", *_OUTER_TISSUES["cortical_bone"])

    # --- air: sinuses under the orbitofrontal cortex, mastoids and ear canals by the temporal lobes -
    air = np.zeros(shape, bool)
    for centre, semi in (((0, -80, -14), (14, 6, 9)),  # frontal sinus
                         ((0, -56, -34), (11, 14, 8)),  # ethmoid
                         ((0, -26, -47), (12, 10, 8)),  # sphenoid
                         ((-50, 26, -50), (9, 10, 9)), ((50, 26, -50), (9, 10, 9))):  # mastoid cells
        air |= ellipsoid_rho(x, y, zr, centre, semi) < 1
    for side in (-1.0, 1.0):  # ear canals, from the outside of the head inwards
        air |= tube(x, y, zr, [(side * 80.0, 14.0, -50.0), (side * 46.0, 14.0, -50.0)], 3.5)
    paint(air & (sd_cranial > 1.0), "sinus", *_OUTER_TISSUES["air"])

    # --- brain in the cranial cavity: CSF layer 1-4 mm, folded cortex, white matter --------------
    cranial = sd_cranial < 0
    csf_thickness = 2.5 + 1.5 * np.clip(texture(x, y, zr, rng, n_waves=12, wavelength_mm=(40.0, 80.0)), -1, 1)
    depth = -(sd_cranial + csf_thickness)  # mm below the brain surface
    tex_sulci = texture(x, y, zr, rng, n_waves=32, wavelength_mm=(16.0, 32.0))
    paint(cranial, "csf", 0.0, 1.0)
    brain = cranial & (depth > 0)
    paint(brain, "wm", -0.03, 0.70)
    ribbon = (depth < 3.0) | ((depth < 14.0) & (np.abs(tex_sulci) < 0.45))
    paint(brain & ribbon, "gm", 0.02, 0.85)
    sulci = (depth < 12.0) & (np.abs(tex_sulci) < 0.12)
    paint(brain & sulci, "csf", 0.0, 1.0)
    paint(cranial & (np.abs(x) < 1.5) & (zr > 5.0) & (depth < 35.0), "csf", 0.0, 1.0)  # interhemispheric

    for sgn in (-1.0, 1.0):
        paint(ellipsoid_rho(x, y, zr, (sgn * 8.0, -2.0, 12.0), (4.5, 26.0, 6.0)) < 1, "csf", 0.0, 1.0)
    for name, centre, semi, chi_v in (
        ("caudate", (13.0, -16.0, 10.0), (4.5, 9.0, 7.0), 0.09),
        ("putamen", (24.0, -3.0, 0.0), (4.5, 13.0, 8.0), 0.07),
        ("globus_pallidus", (18.0, -1.0, -2.0), (3.0, 7.0, 5.0), 0.18),
        ("thalamus", (9.5, 13.0, 4.0), (6.5, 11.0, 7.0), 0.04),
        ("substantia_nigra", (9.0, 8.0, -18.0), (3.0, 6.0, 2.5), 0.15),
        ("red_nucleus", (4.5, 13.0, -15.0), (3.0, 3.0, 3.0), 0.12),
    ):
        for sgn in (-1.0, 1.0):
            paint(ellipsoid_rho(x, y, zr, (sgn * centre[0], centre[1], centre[2]), semi) < 1, name, chi_v, 0.78)

    # --- veins: sinuses at the surface, internal veins, cortical veins in sulci ---------------------
    t = np.deg2rad(np.linspace(15.0, 195.0, 25))
    # the superior sagittal sinus runs in the dura against the inner table (outside the arachnoid),
    # its lumen half in the groove of the bone: painted where it is inside the cranial cavity
    sss = [(0.0, -80.0 * np.cos(a), 58.5 * np.sin(a)) for a in t]
    vein_paths = [
        (sss, 3.0),
        ([(0.0, 22.0, 10.0), (0.0, 48.0, -4.0), (0.0, 70.0, -20.0)], 2.0),  # straight sinus
        ([(-3.0, -8.0, 12.0), (-3.0, 18.0, 9.0)], 1.25), ([(3.0, -8.0, 12.0), (3.0, 18.0, 9.0)], 1.25),
        ([(-32.0, -15.0, 8.0), (-32.0, -15.0, 36.0)], 1.25), ([(33.0, 5.0, 8.0), (33.0, 5.0, 36.0)], 1.25),
        ([(22.0, 30.0, 26.0), (45.0, 30.0, 26.0)], 1.0),
        ([(-40.0, -30.0, 42.0), (-52.0, -5.0, 30.0), (-58.0, 20.0, 12.0)], 1.25),  # cortical, lateral
    ]
    veins = np.zeros(shape, bool)
    for points, radius in vein_paths:
        veins |= tube(x, y, zr, points, radius)
    paint(veins & cranial, "vein", 0.45, 0.80)

    # --- lesions at chosen depths ----------------------------------------------------------------
    lesions = _lesions(depth, labels, veins, vox, rng)
    for les in lesions:
        ball = ellipsoid_rho(x, y, z, les["centre_mm"], (les["radius_mm"],) * 3) < 1
        paint(ball, les["kind"], les["chi_ppm"], 0.5 if les["kind"] == "microbleed" else 0.3)

    brain_fine = np.isin(labels, [L[n] for n in BRAIN_LABELS])
    fine = HeadPhantom(chi_ppm=chi, labels=labels, brain_mask=brain_fine, m0=m0, voxel_size_mm=vox, seed=int(seed))

    fraction = block_mean(brain_fine.astype(np.float32), s)
    brain_chi_sum = block_mean(np.where(brain_fine, chi, 0.0).astype(np.float32), s)
    chi_truth = np.where(fraction > 0, brain_chi_sum / np.maximum(fraction, 1e-6), 0.0).astype(np.float32)
    centre = s // 2
    coarse_vox = tuple(float(v) for v in voxel_size_mm)
    for les in lesions:
        les["centre_ijk"] = tuple(int(round((c / v) + (n - 1) / 2)) for c, v, n in
                                  zip(les.pop("centre_mm"), coarse_vox, matrix))
    return RealisticHead(
        fine=fine, fat_fraction=fat, supersample=s, chi_ppm=chi_truth, brain_fraction=fraction.astype(np.float32),
        brain_mask=fraction >= 0.5, labels=labels[centre::s, centre::s, centre::s].copy(),
        depth_mm=block_mean(np.broadcast_to(depth, shape).astype(np.float32), s),
        voxel_size_mm=coarse_vox, lesions=lesions)


def _lesions(depth, labels, veins, vox, rng):
    """Microbleeds (+0.8 ppm) and calcifications (-0.6 ppm) at set depths below the cortex.

    Radii 2-2.5 mm (4-5 mm across: small microbleeds are 2-10 mm, Greenberg SM et al.
    Lancet Neurol 2009;8:165), so each covers several voxels of a 2 mm scan.

    Places each lesion at a voxel of brain tissue whose depth is in the wanted range, away from
    the other lesions; one microbleed 2.5 mm from a vein's wall. Returns dicts with kind,
    centre_mm, radius_mm, chi_ppm, depth_mm, site.
    """
    wanted = [
        ("microbleed", 2.0, 0.8, (2.5, 4.0), "cortex, within 5 mm of the surface"),
        ("microbleed", 2.0, 0.8, (20.0, 40.0), "deep white matter"),
        ("microbleed", 2.0, 0.8, None, "beside a vein"),
        ("calcification", 2.0, -0.6, (6.5, 7.5), "7 mm beneath the cortex"),
        ("calcification", 2.0, -0.6, (3.0, 4.5), "within 5 mm of the surface"),
        ("calcification", 2.5, -0.6, (22.0, 40.0), "deep white matter"),
    ]
    stride = max(1, int(round(2.0 / min(vox))))
    sub = (slice(None, None, stride),) * 3
    d = np.broadcast_to(depth, labels.shape)[sub]
    lab = labels[sub]
    tissue = np.isin(lab, [LABELS["gm"], LABELS["wm"]])
    vein_sub = veins[sub]
    dist_vein = ndimage.distance_transform_edt(~vein_sub, sampling=[v * stride for v in vox])
    shape = labels.shape
    chosen: list[np.ndarray] = []
    out = []
    for kind, radius, chi_v, depth_range, site in wanted:
        if depth_range is None:
            ok = tissue & (np.abs(dist_vein - (1.25 + radius + 1.0)) < 0.8) & (d > 8.0)
        else:
            ok = tissue & (d > depth_range[0]) & (d < depth_range[1]) & (dist_vein > 8.0)
        # lesions stay away from the sinuses' air and the skull base by staying above the ventricles
        idx = np.argwhere(ok)
        idx = idx[idx[:, 2] * stride * vox[2] > 0.4 * shape[2] * vox[2]] if len(idx) else idx
        order = rng.permutation(len(idx))
        for n in order:
            c_mm = np.array([(idx[n][a] * stride - (shape[a] - 1) / 2) * vox[a] for a in range(3)])
            if all(np.linalg.norm(c_mm - p) > 25.0 for p in chosen):
                chosen.append(c_mm)
                out.append({"kind": kind, "centre_mm": tuple(float(v) for v in c_mm), "radius_mm": radius,
                            "chi_ppm": chi_v, "depth_mm": float(d[tuple(idx[n])]), "site": site})
                break
    return out


def simulate_gre_subvoxel(head: RealisticHead, b0_tesla, echo_times_s, b0_direction, *, snr=100.0, seed=0,
                          receive_bias=None, susceptibility_field_ppm=None):
    """Multi-echo complex GRE of ``head`` on the acquisition grid, with sub-voxel physics.

    The field (susceptibility plus the fat chemical shift) and the signal are computed on the
    fine grid (:func:`qsmnode.simulate.forward.simulate_gre`, receive phase offset included) and
    the complex signal is averaged over each acquisition voxel, so edge voxels dephase. Complex
    Gaussian noise is added on the acquisition grid (``snr`` = mean first-echo brain magnitude /
    noise std). ``susceptibility_field_ppm``: the fine grid's field for this ``b0_direction``
    when already computed (it does not depend on the field strength). Returns complex64
    ``[i, j, k, echo]``, phase as DESIGN.md.
    """
    if susceptibility_field_ppm is None:
        susceptibility_field_ppm = total_field_ppm(head.fine.chi_ppm, head.fine.voxel_size_mm, b0_direction)
    field_ppm = susceptibility_field_ppm + np.float32(FAT_SHIFT_PPM) * head.fat_fraction
    fine = simulate_gre(head.fine, b0_tesla, echo_times_s, b0_direction, snr=None, field_ppm=field_ppm,
                        receive_bias=receive_bias)
    del field_ppm
    signal = np.stack([block_mean(fine[..., e], head.supersample) for e in range(fine.shape[-1])], axis=-1)
    del fine
    signal = signal.astype(np.complex64)
    if snr is not None and np.isfinite(snr):
        sigma = float(np.mean(np.abs(signal[..., 0][head.brain_mask]))) / float(snr)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(signal.shape, dtype=np.float32) + 1j * rng.standard_normal(signal.shape, dtype=np.float32)
        signal += (np.float32(sigma / np.sqrt(2.0)) * noise).astype(np.complex64)
    return signal
