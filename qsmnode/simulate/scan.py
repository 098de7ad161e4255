"""Simulate a complete multi-echo GRE scan as vendor-flavoured DICOM, with the truth beside it.

``simulate_scan`` builds the numerical head phantom (:mod:`qsmnode.simulate.phantom`) on the
slab's array axes, runs the GRE forward model (:mod:`qsmnode.simulate.forward`) with the B0
direction that the slab geometry implies (``b0_direction_from_affine``), and writes DICOM in the
conventions of one vendor (:mod:`qsmnode.simulate.dicom_writer`).

Field strength: the scanner's real field, not the label. A Siemens "3 T" runs at about 2.89 T
(ImagingFrequency 123.2 MHz); the writer stores the label in MagneticFieldStrength and the real
frequency in ImagingFrequency, and the truth records the real B0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsmnode.acquisition import GYROMAGNETIC_RATIO_MHZ_PER_T, b0_direction_from_affine
from qsmnode.simulate.dicom_writer import (
    VENDOR_FLAVOURS,
    SlabGeometry,
    WriterOptions,
    write_gre_dicom,
)

#: real field (T) of scanners sold under a nominal label, per vendor family
_REAL_FIELD = {
    "siemens": {1.5: 1.4955, 3.0: 2.8936, 7.0: 6.9809},
    "ge": {1.5: 1.4998, 3.0: 3.0007, 7.0: 7.0},
    "philips": {1.5: 1.4996, 3.0: 3.0004, 7.0: 6.9990},
    "canon": {1.5: 1.4990, 3.0: 2.9950, 7.0: 7.0},
}


@dataclass
class SimulatedScan:
    """Where a simulated scan went. ``signal``: the complex signal that was written (internal
    phase convention, array axes, before quantisation; in memory only)."""

    dicom_dir: Path
    truth_dir: Path
    paths: list[Path]
    vendor: str
    b0_tesla: float
    imaging_frequency_mhz: float
    echo_times_s: np.ndarray
    affine: np.ndarray
    b0_direction: np.ndarray
    signal: np.ndarray | None = None


def default_echo_times_ms(field_tesla: float) -> list[float]:
    """Five echoes suited to the field: longer at 1.5 T, shorter at 7 T (ms)."""
    if field_tesla <= 2.0:
        return [6.0, 14.0, 22.0, 30.0, 38.0]
    if field_tesla <= 4.5:
        return [4.0, 10.0, 16.0, 22.0, 28.0]
    return [3.0, 7.0, 11.0, 15.0, 19.0]


def real_field_tesla(vendor: str, field_label: float) -> float:
    """The field a scanner of ``vendor`` labelled ``field_label`` T really runs at (T)."""
    family = vendor.split("-")[0]
    table = _REAL_FIELD.get(family, {})
    for label, real in table.items():
        if abs(label - field_label) < 1e-6:
            return real
    return float(field_label) * 0.999


def slab_orientation(orientation: str, oblique_deg: float) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial, coronal or sagittal slab tilted by ``oblique_deg``
    about its row direction (the column cosine turns toward the slice normal)."""
    base = {
        "axial": ([1, 0, 0], [0, 1, 0]),
        "coronal": ([1, 0, 0], [0, 0, -1]),
        "sagittal": ([0, 1, 0], [0, 0, -1]),
    }
    if orientation not in base:
        raise ValueError(f"orientation must be axial, coronal or sagittal, got {orientation!r}")
    row, col = (np.asarray(v, dtype=np.float64) for v in base[orientation])
    normal = np.cross(row, col)
    t = math.radians(float(oblique_deg))
    col_t = col * math.cos(t) + normal * math.sin(t)
    return tuple(float(round(v, 10)) + 0.0 for v in np.concatenate([row, col_t]))


def _anatomical_axes(orientation: tuple[float, ...]) -> tuple[list[int], list[int]]:
    """For each array axis, the LPS axis it runs along and its sign (give the untilted slab)."""
    row = np.asarray(orientation[:3])
    col = np.asarray(orientation[3:])
    dirs = [row, col, np.cross(row, col)]
    axes = [int(np.argmax(np.abs(d))) for d in dirs]
    signs = [int(np.sign(d[a])) for d, a in zip(dirs, axes)]
    return axes, signs


def _phantom_on_slab(matrix, voxel_size_mm, orientation, seed):
    """Head phantom on the slab's array axes (anatomy stays upright in patient space for
    coronal and sagittal slabs; an oblique slab tilts the head with it)."""
    from qsmnode.simulate.phantom import head_phantom

    axes, signs = _anatomical_axes(orientation)
    anat_shape = [0, 0, 0]
    anat_vox = [0.0, 0.0, 0.0]
    for a, p in enumerate(axes):
        anat_shape[p] = int(matrix[a])
        anat_vox[p] = float(voxel_size_mm[a])
    ph = head_phantom(tuple(anat_shape), tuple(anat_vox), seed)
    if axes == [0, 1, 2] and signs == [1, 1, 1]:
        return ph

    def to_slab(arr):
        out = np.transpose(arr, axes)
        flips = tuple(a for a, s in enumerate(signs) if s < 0)
        return np.ascontiguousarray(np.flip(out, axis=flips) if flips else out)

    def centre(c):
        return tuple(
            int(anat_shape[axes[a]] - 1 - c[axes[a]]) if signs[a] < 0 else int(c[axes[a]])
            for a in range(3)
        )

    return dataclasses.replace(
        ph,
        chi_ppm=to_slab(ph.chi_ppm),
        labels=to_slab(ph.labels),
        brain_mask=to_slab(ph.brain_mask),
        m0=to_slab(ph.m0),
        voxel_size_mm=tuple(float(v) for v in voxel_size_mm),
        microbleeds=[(centre(c), r) for c, r in ph.microbleeds],
        calcifications=[(centre(c), r) for c, r in ph.calcifications],
    )


def simulate_scan(
    outdir,
    *,
    vendor="siemens",
    field_tesla=3.0,
    oblique_deg=0.0,
    orientation="axial",
    matrix=(96, 96, 72),
    voxel_size_mm=(2.0, 2.0, 2.0),
    echo_times_ms=None,
    seed=0,
    snr=100.0,
    transfer_syntax=None,
    writer_options: WriterOptions | None = None,
    head="simple",
) -> SimulatedScan:
    """Simulate a multi-echo GRE head scan and write it as ``vendor`` DICOM under ``outdir/dicom``
    with the truth under ``outdir/truth``.

    vendor : one of ``siemens``, ``siemens-enhanced``, ``ge``, ``philips``, ``philips-enhanced``,
        ``canon``. field_tesla : nominal field label (1.5, 3, 7; the written ImagingFrequency is
        the vendor's real field, e.g. 123.2 MHz for a Siemens 3 T). oblique_deg : slab tilt (deg)
        about the row direction. orientation : ``axial`` | ``coronal`` | ``sagittal``.
        matrix / voxel_size_mm : along the array axes (i = columns, j = rows, k = slices), mm.
        echo_times_ms : default five echoes suited to the field. snr : first-echo brain
        magnitude over noise std. transfer_syntax : a transfer syntax UID (default explicit VR
        little endian; lossless compressed ones are encoded by pydicom). head : ``simple`` (the
        phantom of :mod:`qsmnode.simulate.phantom`) or ``realistic``
        (:mod:`qsmnode.simulate.realistic_head`, simulated below the voxel; axial slabs, tilted
        by ``oblique_deg``), whose truth ``chi_ppm`` is the brain tissue's and ``truth.json``
        adds each lesion's depth and site.

    Truth (array axes of DESIGN.md): ``chi_ppm.npy`` (ppm), ``labels.npy``, ``brain_mask.npy``,
    ``truth.json`` (labels map, B0 in T, ImagingFrequency, echo times in s, b0 direction,
    affine, microbleed and calcification centres in voxels with radii in mm).
    """
    from qsmnode.simulate.forward import simulate_gre

    if vendor not in VENDOR_FLAVOURS:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {', '.join(VENDOR_FLAVOURS)}")
    matrix = tuple(int(n) for n in matrix)
    vox = tuple(
        float(v) for v in (voxel_size_mm if np.ndim(voxel_size_mm) else (voxel_size_mm,) * 3)
    )
    te_ms = [float(t) for t in (echo_times_ms or default_echo_times_ms(float(field_tesla)))]
    outdir = Path(outdir)
    dicom_dir, truth_dir = outdir / "dicom", outdir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)

    iop = slab_orientation(orientation, oblique_deg)
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    centre_mm = np.array([1.5, -12.0, 18.0])  # slab centre in LPS, near the isocentre
    origin = centre_mm - sum(
        d * v * (n - 1) / 2 for d, v, n in zip((row, col, normal), vox, matrix)
    )
    geom = SlabGeometry(
        orientation=iop, origin_mm=tuple(float(v) for v in origin), voxel_size_mm=vox, shape=matrix
    )
    b0_dir = b0_direction_from_affine(geom.affine)
    b0 = real_field_tesla(vendor, float(field_tesla))
    frequency = round(b0 * GYROMAGNETIC_RATIO_MHZ_PER_T, 6)
    b0 = frequency / GYROMAGNETIC_RATIO_MHZ_PER_T

    lesions = None
    if head == "realistic":
        from qsmnode.simulate.realistic_head import realistic_head, simulate_gre_subvoxel

        if orientation != "axial":
            raise ValueError("the realistic head is simulated on axial slabs (tilt them with oblique_deg)")
        realistic = realistic_head(matrix, vox, seed=seed)
        signal = simulate_gre_subvoxel(realistic, b0, np.asarray(te_ms) / 1000.0, b0_dir, snr=snr, seed=seed)
        phantom = realistic.as_phantom()
        lesions = [{k: (list(v) if k == "centre_ijk" else v) for k, v in les.items()} for les in realistic.lesions]
    elif head == "simple":
        phantom = _phantom_on_slab(matrix, vox, slab_orientation(orientation, 0.0), seed)
        signal = simulate_gre(phantom, b0, np.asarray(te_ms) / 1000.0, b0_dir, snr=snr, seed=seed)
    else:
        raise ValueError(f"head must be simple or realistic, got {head!r}")
    paths = write_gre_dicom(
        dicom_dir,
        signal,
        geom,
        vendor=vendor,
        echo_times_ms=te_ms,
        frequency_mhz=frequency,
        field_label=float(field_tesla),
        seed=seed,
        transfer_syntax=transfer_syntax,
        options=writer_options,
    )

    from qsmnode.simulate.phantom import LABELS

    np.save(truth_dir / "chi_ppm.npy", phantom.chi_ppm.astype(np.float32))
    labels = phantom.labels
    np.save(
        truth_dir / "labels.npy",
        labels.astype(np.uint8) if 0 <= labels.min() and labels.max() < 256 else labels,
    )
    np.save(truth_dir / "brain_mask.npy", phantom.brain_mask.astype(bool))
    truth = {
        "vendor": vendor,
        "labels": {k: int(v) for k, v in LABELS.items()},
        "b0_tesla": b0,
        "field_label_tesla": float(field_tesla),
        "imaging_frequency_mhz": frequency,
        "echo_times_s": [t / 1000.0 for t in te_ms],
        "b0_direction": [float(v) for v in b0_dir],
        "affine": np.asarray(geom.affine).tolist(),
        "orientation": orientation,
        "oblique_deg": float(oblique_deg),
        "matrix": list(matrix),
        "voxel_size_mm": list(vox),
        "snr": snr,
        "seed": int(seed),
        "microbleeds": [
            {"center_ijk": list(c), "radius_mm": float(r)} for c, r in phantom.microbleeds
        ],
        "calcifications": [
            {"center_ijk": list(c), "radius_mm": float(r)} for c, r in phantom.calcifications
        ],
        "units": {"chi": "ppm", "echo_times": "s", "b0": "T", "affine": "LPS mm"},
        "head": head,
    }
    if lesions is not None:
        truth["lesions"] = lesions
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return SimulatedScan(
        dicom_dir=dicom_dir,
        truth_dir=truth_dir,
        paths=paths,
        vendor=vendor,
        b0_tesla=b0,
        imaging_frequency_mhz=frequency,
        echo_times_s=np.asarray(te_ms) / 1000.0,
        affine=geom.affine,
        b0_direction=b0_dir,
        signal=signal,
    )
