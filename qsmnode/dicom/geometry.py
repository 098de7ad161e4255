"""Slice geometry: orientation, slice order, slice spacing and the affine of a stack of slices.

Conventions (DESIGN.md): array axes ``[i, j, k]``; ``i`` along the row direction cosine
(ImageOrientationPatient[0:3], increasing column index), ``j`` along the column direction cosine
(IOP[3:6], increasing row index), ``k`` along the slice normal ``row x col``; slices sorted by
the projection of ImagePositionPatient on the normal. Patient coordinates are DICOM LPS in mm.

PixelSpacing (0028,0030) is ``[row spacing, column spacing]`` (PS3.3 C.7.6.2.1.1): the distance
between rows (along ``j``) first, then between columns (along ``i``).
"""

from __future__ import annotations

import numpy as np

from qsmnode.errors import InputRefused, plain

#: direction cosines that differ by less than this are the same orientation
ORIENTATION_TOLERANCE = 1e-3


def orientation_axes(image_orientation_patient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and slice-normal unit vectors (LPS) from ImageOrientationPatient (6 floats).

    The normal is ``row x col`` (right-handed). Raises :class:`InputRefused` when the two cosines
    are not unit length or not orthogonal (a broken header).
    """
    iop = np.asarray(image_orientation_patient, dtype=np.float64).ravel()
    if iop.size != 6 or not np.all(np.isfinite(iop)):
        raise InputRefused(
            f"ImageOrientationPatient must hold 6 numbers, got [{plain(iop)}]",
            "send images with a complete ImageOrientationPatient (0020,0037)",
        )
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(np.dot(row, col)) > 1e-2:
        raise InputRefused(
            f"ImageOrientationPatient [{plain(iop, 5)}] is not two orthogonal unit vectors",
            "the header geometry is broken; re-export the series from the scanner",
        )
    row, col = row / nr, col / nc
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def orientation_key(image_orientation_patient, decimals: int = 3) -> tuple[float, ...]:
    """A hashable, rounded orientation (for grouping instances that share one slab)."""
    iop = np.asarray(image_orientation_patient, dtype=np.float64).ravel()
    return tuple(float(v) + 0.0 for v in np.round(iop, decimals))


def slice_distances(positions, normal) -> np.ndarray:
    """Projection (mm) of each ImagePositionPatient ``(n, 3)`` on the slice normal ``(3,)``."""
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ np.asarray(normal, np.float64)


def check_slice_spacing(
    distances_sorted,
    *,
    slice_thickness_mm: float | None = None,
    acquisition_type: str | None = None,
    tolerance: float = 0.05,
) -> float:
    """Return the slice spacing (mm) of sorted slice distances; refuse gaps and irregular stacks.

    ``distances_sorted``: increasing distances (mm) along the normal, one per slice. A missing
    slice shows as one step about twice (or more) the usual; that is refused naming where the
    gap is. For a 2D acquisition (``acquisition_type == '2D'``) a spacing larger than the slice
    thickness (a stack with gaps between slices) is refused as well: the dipole convolution
    assumes contiguous voxels. ``tolerance`` is relative.
    """
    d = np.asarray(distances_sorted, dtype=np.float64)
    if d.size < 2:
        return float(slice_thickness_mm) if slice_thickness_mm else 1.0
    steps = np.diff(d)
    if np.any(steps <= 1e-4):
        raise InputRefused(
            "two slices share one position along the slice normal",
            "the series holds duplicate or overlapping slices; send one complete acquisition",
        )
    spacing = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - spacing) > tolerance * spacing)[0]
    if bad.size:
        where = ", ".join(f"between {d[b]:.2f} and {d[b + 1]:.2f} mm" for b in bad[:5])
        missing = int(round(float(np.sum(steps[bad]) / spacing - bad.size)))
        raise InputRefused(
            f"slice spacing is irregular ({where}; usual step {spacing:.3f} mm"
            + (f", about {missing} slice(s) missing" if missing > 0 else "")
            + ")",
            "send the complete series with every slice",
        )
    if (acquisition_type or "").upper() == "2D" and slice_thickness_mm:
        if spacing > float(slice_thickness_mm) * (1 + tolerance):
            raise InputRefused(
                f"2D stack with gaps: slice spacing {spacing:.2f} mm exceeds slice thickness "
                f"{float(slice_thickness_mm):.2f} mm",
                "QSM needs contiguous slices; acquire a 3D GRE or a gap-free 2D stack",
            )
    return spacing


def stack_affine(
    image_orientation_patient,
    first_position,
    last_position,
    n_slices: int,
    pixel_spacing,
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """4x4 affine (array index ``(i, j, k, 1)`` -> LPS mm) of a sorted stack of slices.

    The k column is the step between slice positions (``(last - first) / (n - 1)``), not
    SliceThickness; for one slice it is the normal times ``slice_spacing_mm`` (or 1 mm).
    ``pixel_spacing`` is DICOM order ``[row spacing (j), column spacing (i)]``.
    """
    row, col, normal = orientation_axes(image_orientation_patient)
    dr, dc = (float(v) for v in pixel_spacing)
    first = np.asarray(first_position, dtype=np.float64)
    if n_slices > 1:
        step = (np.asarray(last_position, dtype=np.float64) - first) / (n_slices - 1)
    else:
        step = normal * float(slice_spacing_mm or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row * dc
    affine[:3, 1] = col * dr
    affine[:3, 2] = step
    affine[:3, 3] = first
    return affine


def check_collinear(
    positions_sorted, normal, pixel_spacing, tolerance_fraction: float = 0.1
) -> None:
    """Refuse a stack whose slice positions do not lie on one line along the normal (a sheared
    or mixed-geometry stack); tolerance is a fraction of the in-plane pixel spacing."""
    p = np.asarray(positions_sorted, dtype=np.float64).reshape(-1, 3)
    if len(p) < 2:
        return
    n = np.asarray(normal, dtype=np.float64)
    inplane = (p - p[0]) - np.outer((p - p[0]) @ n, n)
    # a constant in-plane shift per slice (gantry tilt/shear) is as bad as a random one
    worst = float(np.max(np.linalg.norm(inplane, axis=1)))
    if worst > tolerance_fraction * float(min(pixel_spacing)):
        raise InputRefused(
            f"inconsistent geometry: slice positions move {worst:.2f} mm in-plane across the stack",
            "the slices do not form one rectilinear volume (sheared/tilted or mixed stacks); "
            "send one unresampled acquisition",
        )
