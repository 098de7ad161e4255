"""The Acquisition: one multi-echo GRE acquisition, decoded, on the array axes of DESIGN.md.

Axes: ``signal[i, j, k, echo]``; ``i`` along the DICOM row direction cosine
(ImageOrientationPatient[0:3]), ``j`` along the column direction cosine (IOP[3:6]), ``k`` along
the slice normal, slices sorted by the projection of ImagePositionPatient on the normal.
``vol[:, :, k] == pixel_array.T`` for slice ``k``. ``affine`` maps ``(i, j, k, 1)`` to patient
LPS coordinates in mm. Phase follows the internal sign convention: a paramagnetic source gives a
phase that grows with TE (GE data are conjugated by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pydicom

GYROMAGNETIC_RATIO_MHZ_PER_T = 42.57747892


@dataclass(frozen=True)
class SourceReference:
    """One source instance that contributed to a slice (for Source Image Sequence)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def b0_direction_from_affine(affine: np.ndarray) -> np.ndarray:
    """Unit B0 direction (patient z, LPS) in array axes: ``inv([r c s]) @ [0, 0, 1]``.

    ``affine``: 4x4, LPS mm. Returns a float64 unit vector of length 3.
    """
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0, keepdims=True)
    direction = np.linalg.solve(axes, np.array([0.0, 0.0, 1.0]))
    return direction / np.linalg.norm(direction)


def b0_tesla_from_frequency(imaging_frequency_mhz: float) -> float:
    """B0 in tesla from ImagingFrequency (0018,0084) in MHz (1H)."""
    return float(imaging_frequency_mhz) / GYROMAGNETIC_RATIO_MHZ_PER_T


@dataclass
class Acquisition:
    """One decoded multi-echo GRE acquisition (host numpy arrays).

    Attributes
    ----------
    signal : complex64 ``[i, j, k, echo]``; magnitude in scanner units, phase in radians.
    echo_times_s : float64 ``(n_echo,)``, strictly increasing, seconds.
    b0_tesla : field strength from ImagingFrequency (not MagneticFieldStrength).
    affine : float64 4x4, array index -> patient LPS mm.
    vendor : ``siemens`` | ``ge`` | ``philips`` | ``canon`` | ``united-imaging`` | ``unknown``.
    phase_sign_validated : False for vendors whose phase sign has not been validated.
    header : patient, study, equipment and frame-of-reference attributes copied from the first
        source instance (no pixel data); writers copy study/patient attributes from it.
    source_series_uids : every series that contributed (magnitude, phase, ...).
    source_instances : per slice ``k``, the instances that contributed to it.
    provenance : one line per vendor rule or decision applied while loading.
    warnings : things a reader must know (for example an unvalidated phase sign).
    """

    signal: np.ndarray
    echo_times_s: np.ndarray
    b0_tesla: float
    affine: np.ndarray
    vendor: str
    phase_sign_validated: bool
    header: pydicom.Dataset
    source_series_uids: tuple[str, ...]
    source_instances: list[list[SourceReference]]
    provenance: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.signal.shape[:3])  # type: ignore[return-value]

    @property
    def n_echoes(self) -> int:
        return int(self.signal.shape[3])

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """Voxel size along (i, j, k) in mm (k from the slice positions, not SliceThickness)."""
        return np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)

    @property
    def b0_direction(self) -> np.ndarray:
        """Unit B0 direction in array axes (see :func:`b0_direction_from_affine`)."""
        return b0_direction_from_affine(self.affine)

    @property
    def magnitude(self) -> np.ndarray:
        return np.abs(self.signal)

    @property
    def phase(self) -> np.ndarray:
        """Phase in radians, internal sign convention."""
        return np.angle(self.signal)
