"""Plausibility of a reconstruction: reasons not to trust a result that ran without error.

A reconstruction can finish and still be wrong in ways a reader cannot see on one slice: a mask
that took the scalp, echoes too short for the field to rise above the phase noise, a map whose
values are out of physiological range, hundreds of "foci" that are noise. Each check below
measures one such thing and returns a :class:`Concern` (or ``None``); any concern makes the
result *low-confidence* (DESIGN.md, "Process boundaries"): its warnings travel in the SR, the
summary image, the log and the job record, and its findings are withheld
(:mod:`qsmnode.report.review`).

Checks and thresholds (each constant is documented where it is defined):

- :func:`check_mask_volume`: mask volume against the intracranial volume expected for the
  patient's age, with the lower limit relaxed when the slab does not cover the whole brain.
- :func:`check_echo_times`: the last echo used for the field times B0 (ms T).
- :func:`check_susceptibility_range`: fraction of mask voxels beyond +-0.5 ppm.
- :func:`check_foci_count`: number of automated candidate foci.

Units: mm, ml, seconds (echo times), tesla, ppm. Arrays are host (numpy) ``[i, j, k]``.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Concern:
    """One reason to distrust a result.

    check : which check raised it (``mask_volume``, ``echo_times``, ``susceptibility_range``,
        ``foci_count``).
    message : full sentence for the SR, the log and the job record (what, measured vs limit,
        and what it means).
    headline : short form (<= ~100 characters) for the summary image.
    value : the measured figure, in the unit the message names.
    """

    check: str
    message: str
    headline: str
    value: float


# ------------------------------------------------------------------------------- patient age
_AGE_UNIT_YEARS = {"D": 1.0 / 365.25, "W": 7.0 / 365.25, "M": 1.0 / 12.0, "Y": 1.0}


def patient_age_years(header) -> float | None:
    """The patient's age in years from PatientAge (0010,1010, ``nnnD|W|M|Y``), else from
    PatientBirthDate and StudyDate (or AcquisitionDate / SeriesDate); None when unknown."""
    text = str(header.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY])", text)
    if match:
        return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    born = _dicom_date(header.get("PatientBirthDate"))
    for keyword in ("StudyDate", "AcquisitionDate", "SeriesDate"):
        when = _dicom_date(header.get(keyword))
        if born and when and when >= born:
            return (when - born).days / 365.25
    return None


def _dicom_date(value) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


# ------------------------------------------------------------------------------- mask volume
#: Intracranial volume (ICV, litres) by age, both sexes, about +-2 SD, as (upper age in years,
#: (low, high)). Adults: ~1.1-1.9 L (Buckner RL et al., NeuroImage 2004;23:724-738, eTIV of
#: 147 adults 18-93 y). Infants: total brain volume ~0.45 L at 2-4 weeks, doubling in the first
#: year to ~0.9 L and ~1.0 L at 2 y (Knickmeyer RC et al., J Neurosci 2008;28:12176-12182);
#: the brain reaches ~95 % of its adult size by about 6 y (Lenroot RK, Giedd JN, Neurosci
#: Biobehav Rev 2006;30:718-729; Courchesne E et al., Radiology 2000;216:672-682). The bands
#: are deliberately wide: the check is for a wrong mask (scalp, neck, half a brain), not for
#: atrophy or macrocephaly.
INTRACRANIAL_VOLUME_L_BY_AGE: tuple[tuple[float, tuple[float, float]], ...] = (
    (1.0, (0.35, 1.0)),   # infants (< 1 y)
    (3.0, (0.8, 1.45)),   # 1-3 y
    (12.0, (1.0, 1.8)),   # 3-12 y
    (float("inf"), (1.1, 1.9)),  # adolescents and adults, and unknown age
)
#: A QSM mask holds less than the intracranial volume (extra-axial CSF is left out, the edge is
#: eroded; in old age brain tissue is ~70-75 % of ICV): its lower limit is this fraction of the
#: ICV lower limit (adults: 0.8 L).
MASK_LOW_FRACTION_OF_ICV = 0.75
#: ... and its upper limit this multiple of the ICV upper limit (a mask edge drawn one voxel
#: out; adults: 2.0 L).
MASK_HIGH_FRACTION_OF_ICV = 1.05
#: Full extent (mm) of an adult intracranial ellipsoid along patient L-R, A-P and S-I
#: (pi/6 x 140 x 170 x 125 mm = 1.56 L), used to judge how much of the brain a slab covers.
ADULT_INTRACRANIAL_EXTENT_MM = np.array([140.0, 170.0, 125.0])


def intracranial_volume_l(age_years: float | None) -> tuple[float, float]:
    """(low, high) intracranial volume in litres for ``age_years`` (None: adult)."""
    age = float("inf") if age_years is None else float(age_years)
    for upper_age, band in INTRACRANIAL_VOLUME_L_BY_AGE:
        if age < upper_age:
            return band
    return INTRACRANIAL_VOLUME_L_BY_AGE[-1][1]


def age_band_text(age_years: float | None) -> str:
    """The age band whose range applies, in words (the band, not the age: no patient detail
    in logs)."""
    if age_years is None:
        return "adult range; patient age unknown"
    lower = 0.0
    for upper_age, _band in INTRACRANIAL_VOLUME_L_BY_AGE:
        if age_years < upper_age:
            break
        lower = upper_age
    if upper_age == float("inf"):
        return f"adult range, age {lower:g} y or more"
    return f"range for age {lower:g}-{upper_age:g} y"


def plausible_mask_volume_ml(age_years: float | None) -> tuple[float, float]:
    """(low, high) plausible brain-mask volume in ml for a patient of ``age_years`` (None:
    adult): the ICV band times the mask allowances."""
    low_l, high_l = intracranial_volume_l(age_years)
    return low_l * 1000.0 * MASK_LOW_FRACTION_OF_ICV, high_l * 1000.0 * MASK_HIGH_FRACTION_OF_ICV


def covered_fraction(mask: np.ndarray, voxel_size_mm, affine=None,
                     age_years: float | None = None) -> float:
    """Smallest fraction of the brain the field of view can hold, judged from the mask (0..1].

    Along each array axis where the mask touches the first or last index, the brain is cut by
    the field of view: the part inside then holds at least the cap of an ellipsoidal brain
    whose height is the mask's extent along that axis, ``h = extent / D`` of the brain's full
    extent ``D`` in that direction, which is ``h^2 (3 - 2h)`` of its volume (exact for an
    ellipsoid cut by parallel planes). The fractions of the cut axes are multiplied. ``D``
    comes from :data:`ADULT_INTRACRANIAL_EXTENT_MM` (scaled to the age's ICV) along the axis
    direction in patient space (``affine``, LPS; None: axes i, j, k = L-R, A-P, S-I).
    Returns 1.0 when the mask touches no edge (whole brain covered).
    """
    mask = np.asarray(mask, dtype=bool)
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(3)
    axes = (np.eye(3) if affine is None else
            np.asarray(affine, dtype=np.float64)[:3, :3] / vox[None, :])
    scale = (sum(intracranial_volume_l(age_years)) / sum(intracranial_volume_l(None))) ** (1 / 3)
    fraction = 1.0
    for axis in range(3):
        profile = mask.any(axis=tuple(a for a in range(3) if a != axis))
        if not profile.any() or not (profile[0] or profile[-1]):
            continue
        occupied = np.flatnonzero(profile)
        extent_mm = (occupied[-1] - occupied[0] + 1) * vox[axis]
        direction = axes[:, axis] / np.linalg.norm(axes[:, axis])
        brain_extent_mm = scale * float(np.linalg.norm(ADULT_INTRACRANIAL_EXTENT_MM * direction))
        h = min(1.0, extent_mm / brain_extent_mm)
        fraction *= h * h * (3.0 - 2.0 * h)
    return max(fraction, 1e-6)


def check_mask_volume(mask: np.ndarray, voxel_size_mm, *, affine=None,
                      age_years: float | None = None) -> Concern | None:
    """Concern when the mask volume is outside the plausible range for the age.

    Too large is judged always (a cut field of view only makes a mask smaller). Too small is
    judged against the lower limit times :func:`covered_fraction`, so a thin slab (a mask that
    touches its first/last slice) is not flagged only because it holds part of the brain.
    """
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(3)
    volume_ml = float(np.count_nonzero(mask)) * float(np.prod(vox)) / 1000.0
    low_ml, high_ml = plausible_mask_volume_ml(age_years)
    who = age_band_text(age_years)
    if volume_ml > high_ml:
        return Concern(
            "mask_volume",
            f"brain mask {volume_ml:.0f} ml is larger than a plausible intracranial volume "
            f"(at most {high_ml:.0f} ml, {who}): it likely includes scalp, skull or neck, where "
            "the susceptibility map is not valid",
            f"mask {volume_ml:.0f} ml > {high_ml:.0f} ml: includes scalp/skull?", volume_ml)
    coverage = covered_fraction(mask, vox, affine, age_years)
    limit_ml = low_ml * coverage
    if volume_ml < limit_ml:
        covered = "" if coverage >= 1.0 else f", scaled to the {coverage:.0%} of the brain the slab can hold"
        return Concern(
            "mask_volume",
            f"brain mask {volume_ml:.0f} ml is smaller than plausible (at least {limit_ml:.0f} ml, "
            f"{who}{covered}): parts of the brain are missing from the map",
            f"mask {volume_ml:.0f} ml < {limit_ml:.0f} ml: brain missing?", volume_ml)
    return None


# ------------------------------------------------------------------------------- echo times
#: The field a susceptibility difference leaves in the phase grows with TE x B0; the phase
#: noise does not. Below this product (ms T) of the last echo used for the field the local field
#: of tissue is buried in phase noise. It is the TE at which an echo gets about half the best
#: phase-to-noise ratio for brain tissue: the phase CNR of one echo goes as
#: ``(TE/T2*) exp(1 - TE/T2*)`` (maximum at TE = T2*), with tissue T2* ~ 45 ms at 3 T scaling
#: as 1/B0 (~135 ms T / B0; Peran P et al., JMRI 2007;26:1413; Yao B et al., NeuroImage
#: 2009;44:1259), and 30 ms T gives (0.22) e^0.78 ~ 0.48. Standard protocols pass with margin:
#: 3 T last TE >= ~20 ms (58 ms T), 7 T >= ~12 ms (84 ms T), 1.5 T >= ~30 ms (45 ms T)
#: (QSM consensus: Bilgic B et al., MRM 2024;91:1834-1862); a 2.3/4.6 ms field map at 3 T
#: (13.8 ms T, ~25 %) does not.
MIN_ECHO_TIME_FIELD_PRODUCT_MS_T = 30.0
#: tissue T2* times B0 (ms T) used to state the phase-to-noise efficiency in the message
TISSUE_T2STAR_FIELD_PRODUCT_MS_T = 135.0


def phase_cnr_efficiency(te_s: float, b0_tesla: float) -> float:
    """Phase contrast-to-noise of one echo at ``te_s`` relative to the best echo (TE = tissue
    T2*): ``x exp(1 - x)``, ``x = TE / T2*``, T2* = ``TISSUE_T2STAR_FIELD_PRODUCT_MS_T / B0``."""
    x = float(te_s) * 1000.0 * float(b0_tesla) / TISSUE_T2STAR_FIELD_PRODUCT_MS_T
    return float(x * np.exp(1.0 - x))


def check_echo_times(field_echo_times_s: Sequence[float], b0_tesla: float) -> Concern | None:
    """Concern when the last echo used for the field is too short for ``b0_tesla``:
    ``TE_max [ms] * B0 [T] < MIN_ECHO_TIME_FIELD_PRODUCT_MS_T``.

    ``field_echo_times_s``: the echo times (s) the field was estimated from (the pipeline may
    leave late echoes out; those add nothing to the field).
    """
    te = np.asarray(field_echo_times_s, dtype=np.float64).ravel()
    if te.size == 0:
        return None
    te_max_ms = float(te.max()) * 1000.0
    product = te_max_ms * float(b0_tesla)
    if product >= MIN_ECHO_TIME_FIELD_PRODUCT_MS_T:
        return None
    needed_ms = MIN_ECHO_TIME_FIELD_PRODUCT_MS_T / float(b0_tesla)
    efficiency = phase_cnr_efficiency(te.max(), b0_tesla)
    echoes = ", ".join(f"{t * 1000:.3g}" for t in te)
    return Concern(
        "echo_times",
        f"echo times too short for the field: the last echo used for the field is "
        f"{te_max_ms:.3g} ms at {b0_tesla:.2f} T (echoes {echoes} ms; TE x B0 = {product:.1f} ms T, "
        f"below {MIN_ECHO_TIME_FIELD_PRODUCT_MS_T:g} ms T, i.e. a last echo of at least "
        f"{needed_ms:.0f} ms at this field): the phase carries about {efficiency:.0%} of the "
        "tissue contrast-to-noise of an echo at the tissue T2*, so the map is dominated by "
        "noise; QSM protocols use a last echo of >= ~20 ms at 3 T",
        f"echoes too short: last TE {te_max_ms:.3g} ms at {b0_tesla:.1f} T "
        f"(TE x B0 {product:.1f} < {MIN_ECHO_TIME_FIELD_PRODUCT_MS_T:g} ms T)", product)


# ------------------------------------------------------------------------------- value range
#: |chi| beyond this (ppm) is outside the range of brain tissue; only veins/sinuses reach it
#: (venous blood ~0.3-0.5 ppm, deep grey nuclei <= ~0.2 ppm).
RANGE_LIMIT_PPM = 0.5
#: ... and more than this fraction of the mask beyond it marks a failed map (streaks,
#: unwrapping errors, background residue, scalp). Healthy brains have < 1 % (veins); a
#: haematoma of ~25 ml or more in a 1.2 L mask also reaches 2 %, and is then read on the map.
RANGE_MAX_FRACTION = 0.02


def check_susceptibility_range(chi_ppm: np.ndarray, mask: np.ndarray) -> Concern | None:
    """Concern when more than :data:`RANGE_MAX_FRACTION` of the mask has
    ``|chi| > RANGE_LIMIT_PPM`` (the message gives the 1st/99th percentiles in ppb)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    values = np.asarray(chi_ppm)[mask]
    fraction = float(np.count_nonzero(np.abs(values) > RANGE_LIMIT_PPM)) / values.size
    if fraction <= RANGE_MAX_FRACTION:
        return None
    p1, p99 = (float(v) * 1000.0 for v in np.percentile(values, [1, 99]))
    return Concern(
        "susceptibility_range",
        f"susceptibility out of physiological range: {fraction:.1%} of the mask is beyond "
        f"+-{RANGE_LIMIT_PPM * 1000:.0f} ppb (healthy brain < 1 %, limit "
        f"{RANGE_MAX_FRACTION:.0%}); 1st-99th percentile {p1:+.0f} to {p99:+.0f} ppb",
        f"{fraction:.1%} of mask beyond +-{RANGE_LIMIT_PPM * 1000:.0f} ppb "
        f"(p1/p99 {p1:+.0f}/{p99:+.0f} ppb)", fraction)


# ------------------------------------------------------------------------------- foci count
#: More automated candidate foci than this (all sizes and positions, before the report's
#: size and edge rules) means the detection is reading noise or artefact: a typical patient
#: with microbleeds has a handful (Greenberg SM et al., Lancet Neurol 2009;8:165-174). Severe
#: cerebral amyloid angiopathy can exceed it; its findings are then withheld and the map read.
MAX_PLAUSIBLE_FOCI = 50


def check_foci_count(n_candidates: int) -> Concern | None:
    """Concern when ``n_candidates`` (automated candidate foci) exceeds
    :data:`MAX_PLAUSIBLE_FOCI`."""
    if n_candidates <= MAX_PLAUSIBLE_FOCI:
        return None
    return Concern(
        "foci_count",
        f"implausible number of candidate foci: {n_candidates} found (more than "
        f"{MAX_PLAUSIBLE_FOCI}); noise or artefact is far likelier than this many lesions",
        f"{n_candidates} candidate foci (> {MAX_PLAUSIBLE_FOCI}): noise?", float(n_candidates))


# ------------------------------------------------------------------------------- all checks
def field_echo_times_s(result, echo_times_s) -> list[float]:
    """The echo times (s) the field was estimated from: the pipeline's echo-selection step
    record when present, else every echo time."""
    for step in getattr(result, "steps", []) or []:
        if step.name == "echo_selection" and step.parameters.get("echo_times_ms"):
            return [float(t) / 1000.0 for t in step.parameters["echo_times_ms"]]
    return [float(t) for t in np.asarray(echo_times_s, dtype=np.float64).ravel()]


def assess_result(result, echo_times_s, b0_tesla: float, voxel_size_mm, *, affine=None,
                  age_years: float | None = None,
                  n_candidate_foci: int | None = None) -> list[Concern]:
    """Every concern about a :class:`~qsmnode.recon.result.ReconResult` (empty: plausible).

    ``echo_times_s`` (s), ``b0_tesla`` (T), ``voxel_size_mm`` (mm, along i, j, k) and
    ``affine`` (4x4 LPS, optional) are the acquisition's; ``age_years`` the patient's (None:
    adult ranges); ``n_candidate_foci`` the automated focus count (None: not checked).
    """
    concerns = [
        check_mask_volume(result.mask, voxel_size_mm, affine=affine, age_years=age_years),
        check_echo_times(field_echo_times_s(result, echo_times_s), b0_tesla),
        check_susceptibility_range(result.chi_ppm, result.mask),
    ]
    if n_candidate_foci is not None:
        concerns.append(check_foci_count(n_candidate_foci))
    return [c for c in concerns if c is not None]
