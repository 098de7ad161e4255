"""What the reconstruction returns: maps on the host, plus the record of every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StepRecord:
    """One pipeline step as it ran: enough to reproduce it and to cite it."""

    name: str  # e.g. "brain_mask", "unwrapping", "background_removal", "dipole_inversion"
    algorithm: str  # e.g. "V-SHARP"
    reference: str  # paper, e.g. "Wu B et al. MRM 2012;67:137-147"
    parameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ReconResult:
    """Maps on the array axes of DESIGN.md (``[i, j, k]``), numpy, float32 unless stated.

    chi_ppm : susceptibility in ppm, referenced (see ``reference_ppm``), 0 outside ``mask``.
    mask : bool, the brain mask the susceptibility is defined in.
    r2star_per_s : R2* in 1/s (0 where not fitted); t2star_ms : T2* in ms (0 where not fitted).
    swi : susceptibility-weighted image (magnitude units, >= 0); minip : its minimum-intensity
        projection over a slab along k (same shape as swi).
    total_field_hz, local_field_hz : fields in Hz; field_noise_hz : per-voxel noise std of the
        total field (the inverse of the weight used by the inversion).
    reference_ppm : offsets subtracted or measured, e.g. {"whole_brain": 0.0, "csf": -0.012};
        ``reference_region`` names the one the map is referenced to.
    steps : every step with algorithm, reference and parameters, in order.
    preset : the field-strength preset name and its resolved parameter values.
    quality : e.g. mask_volume_ml, unreliable_phase_fraction, fit_residual, seconds_total.
    """

    chi_ppm: np.ndarray
    mask: np.ndarray
    r2star_per_s: np.ndarray
    t2star_ms: np.ndarray
    swi: np.ndarray
    minip: np.ndarray
    total_field_hz: np.ndarray
    local_field_hz: np.ndarray
    field_noise_hz: np.ndarray
    reference_region: str
    reference_ppm: dict[str, float]
    steps: list[StepRecord]
    preset: dict[str, Any]
    quality: dict[str, float]
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
