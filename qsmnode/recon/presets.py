"""Field-strength presets: one documented table for 1.5 T, 3 T and 7 T, interpolated in between.

Every value can be overridden with a flat dict (``{"inversion_method": "tkd"}``); unknown keys are
refused with the list of known ones, so a typo never silently does nothing.

The table (``FIELD_TABLE``) and why each value varies with B0:

=============================  ========  ========  ========  ==========================================
key                            1.5 T     3 T       7 T       why / rule between fields
=============================  ========  ========  ========  ==========================================
echo_max_te_s                  0.060     0.040     0.025     T2* shortens ~1/B0; later echoes add noise to the
                                                             field (scales ~1/B0 beyond the table; the
                                                             first 2 echoes are always kept). R2* uses all.
unwrap_method                  romeo     romeo     romeo     single-echo spatial unwrapping (multi-echo:
                                                             MCPC-3D-S template + temporal, always)
phase_offset_sigma_mm          4.0       4.0       4.0       smoothing of the MCPC-3D-S offset, mm
mask_threshold                 0.30      0.30      0.30      fraction of the bias-normalised head level
mask_erosion_mm                4.0       4.0       4.0       brain/scalp separation radius, mm
mask_scalp_mm                  6.0       6.0       6.0       outer head depth never taken as brain, mm (adults;
                                                             lower it for infants, whose scalp and skull
                                                             are thinner)
mask_r2star_max_per_s          30.0      60.0      140.0     apparent R2* above which edge tissue leaves the
                                                             mask (muscle, marrow, skull base); ~2x deep
                                                             grey R2* (scales ~B0)
mask_quality_threshold         0.30      0.30      0.25      phase reliability below which edge voxels are
                                                             dropped (7 T: stronger, noisier phase)
background_method              pdf       pdf       pdf       category; PDF keeps the whole brain mask
qsm_edge_peel_voxels           1         1         1         outermost mask layers left out of the QSM after
                                                             background removal (partial volume with CSF, bone
                                                             and air; least certain background): on the
                                                             realistic head NRMSE 68 -> 50 %, edge RMS
                                                             0.046 -> 0.025 ppm, veins 0.44 -> 0.82 of truth
vsharp_radius_max_mm           12.0      12.0      10.0      V-SHARP largest sphere, mm
vsharp_radius_min_mm           2.0       2.0       2.0       smallest sphere (>= 1 voxel enforced)
vsharp_threshold               0.05      0.05      0.05      TSVD threshold of the deconvolution
pdf_tolerance                  0.003     0.003     0.003     CG relative residual (early stop regularises:
                                                             tighter fits start to remove local field)
pdf_max_iterations             100       100       100
inversion_method               fansi_wtv fansi_wtv fansi_wtv category (``tkd`` = fast preview)
tv_gradient_scale_ppm_per_mm   0.05      0.05      0.05      Laplace-prior scale b: alpha = sigma_eff^2 / b,
                                                             :func:`qsmnode.recon.inversion.regularisation_weight`
model_error_ppm                0.003     0.003     0.003     field-noise floor for model error, ppm (the
                                                             measured noise carries the field dependence)
admm_iterations                60        60        60
admm_tolerance                 0.005     0.005     0.005     relative change of chi inside the mask that stops
                                                             ADMM (3 iterations in a row)
tkd_threshold                  0.19      0.19      0.19      TKD truncation of |D| (Shmueli 2009)
swi_mask_power                 4         4         3         phase-mask power; fewer at 7 T (strong phase)
minip_slab_mm                  16.0      14.0      10.0      thinner slabs at higher field (more veins)
csf_r2star_max_per_s           6.0       10.0      20.0      ventricles: R2* below this (scales ~B0)
=============================  ========  ========  ========  ==========================================

Rules: numbers are interpolated linearly in B0 between the two nearest table fields; beyond the
table (e.g. 0.55 T, 9.4 T) they are held at the end value, except the keys in ``SCALES_WITH_B0``
(proportional to B0) and ``SCALES_INVERSE_B0`` (proportional to 1/B0), which are extrapolated by
that rule. Integers stay integers. Categories take the nearest table field in log(B0).
Named presets (``NAMED_PRESETS``) are field-independent override sets applied after the table.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from qsmnode.errors import ReconstructionError

TABLE_FIELDS_T = (1.5, 3.0, 7.0)

FIELD_TABLE: dict[str, tuple[Any, Any, Any]] = {
    "echo_max_te_s": (0.060, 0.040, 0.025),
    "unwrap_method": ("romeo", "romeo", "romeo"),
    "phase_offset_sigma_mm": (4.0, 4.0, 4.0),
    "mask_threshold": (0.30, 0.30, 0.30),
    "mask_erosion_mm": (4.0, 4.0, 4.0),
    "mask_scalp_mm": (6.0, 6.0, 6.0),
    "mask_r2star_max_per_s": (30.0, 60.0, 140.0),
    "mask_quality_threshold": (0.30, 0.30, 0.25),
    "background_method": ("pdf", "pdf", "pdf"),
    "qsm_edge_peel_voxels": (1, 1, 1),
    "vsharp_radius_max_mm": (12.0, 12.0, 10.0),
    "vsharp_radius_min_mm": (2.0, 2.0, 2.0),
    "vsharp_threshold": (0.05, 0.05, 0.05),
    "pdf_tolerance": (0.003, 0.003, 0.003),
    "pdf_max_iterations": (100, 100, 100),
    "inversion_method": ("fansi_wtv", "fansi_wtv", "fansi_wtv"),
    "tv_gradient_scale_ppm_per_mm": (0.05, 0.05, 0.05),
    "model_error_ppm": (0.003, 0.003, 0.003),
    "admm_iterations": (60, 60, 60),
    "admm_tolerance": (0.005, 0.005, 0.005),
    "tkd_threshold": (0.19, 0.19, 0.19),
    "swi_mask_power": (4, 4, 3),
    "minip_slab_mm": (16.0, 14.0, 10.0),
    "csf_r2star_max_per_s": (6.0, 10.0, 20.0),
}

# Field-independent settings (same at every field; still overridable).
COMMON: dict[str, Any] = {
    "reference_region": "whole_brain",  # or "csf"
    "background_pad_mm": 16.0,
    "inversion_pad_mm": 16.0,
}

SCALES_WITH_B0 = {"csf_r2star_max_per_s", "mask_r2star_max_per_s"}
SCALES_INVERSE_B0 = {"echo_max_te_s"}

BACKGROUND_METHODS = ("pdf", "vsharp")
UNWRAP_METHODS = ("romeo", "laplacian", "skimage")
INVERSION_METHODS = ("fansi_wtv", "tkd")
REFERENCE_REGIONS = ("whole_brain", "csf")

NAMED_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"inversion_method": "tkd", "background_method": "vsharp"},
    "accurate": {"admm_iterations": 150, "admm_tolerance": 0.002},
    "csf_reference": {"reference_region": "csf"},
}


def _interp_number(key: str, values, b0: float):
    f = TABLE_FIELDS_T
    if b0 <= f[0]:
        v = values[0] * (b0 / f[0] if key in SCALES_WITH_B0 else f[0] / b0 if key in SCALES_INVERSE_B0 else 1.0)
    elif b0 >= f[-1]:
        v = values[-1] * (b0 / f[-1] if key in SCALES_WITH_B0 else f[-1] / b0 if key in SCALES_INVERSE_B0 else 1.0)
    else:
        i = max(n for n in range(len(f) - 1) if f[n] <= b0)
        t = (b0 - f[i]) / (f[i + 1] - f[i])
        v = values[i] * (1 - t) + values[i + 1] * t
    if all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        return int(round(v))
    return float(v)


def _nearest_category(values, b0: float):
    dist = [abs(math.log(b0 / f)) for f in TABLE_FIELDS_T]
    return values[dist.index(min(dist))]


def known_keys() -> list[str]:
    return sorted(set(FIELD_TABLE) | set(COMMON))


def preset_for_field(b0_tesla: float, overrides: dict[str, Any] | None = None, name: str | None = None) -> dict:
    """Resolved parameters for a field strength (T), with a named preset and overrides applied.

    Returns a flat dict of every key in the table plus ``preset_name`` and ``b0_tesla``.
    Raises ``ReconstructionError`` for a non-positive field, an unknown preset name, an unknown
    override key, or an invalid method name.
    """
    b0 = float(b0_tesla)
    if not math.isfinite(b0) or b0 <= 0:
        raise ReconstructionError(f"field strength {b0_tesla!r} T is not positive", "check ImagingFrequency")
    out: dict[str, Any] = {}
    for key, values in FIELD_TABLE.items():
        if isinstance(values[0], str):
            out[key] = _nearest_category(values, b0)
        else:
            out[key] = _interp_number(key, values, b0)
    out.update(copy.deepcopy(COMMON))
    name = name or "default"
    if name not in NAMED_PRESETS:
        raise ReconstructionError(
            f"unknown preset {name!r}", f"use one of {', '.join(sorted(NAMED_PRESETS))}"
        )
    for source in (NAMED_PRESETS[name], overrides or {}):
        unknown = sorted(set(source) - set(out))
        if unknown:
            raise ReconstructionError(
                f"unknown reconstruction parameter(s) {unknown}", f"known parameters: {', '.join(known_keys())}"
            )
        out.update(copy.deepcopy(source))
    for key, allowed in (
        ("background_method", BACKGROUND_METHODS),
        ("inversion_method", INVERSION_METHODS),
        ("reference_region", REFERENCE_REGIONS),
        ("unwrap_method", UNWRAP_METHODS),
    ):
        if out[key] not in allowed:
            raise ReconstructionError(f"{key} {out[key]!r} is not supported", f"use one of {', '.join(allowed)}")
    out["preset_name"] = name
    out["b0_tesla"] = b0
    return out
