"""Vendor conventions for multi-echo GRE input: who wrote it, which image component an image is,
how stored phase maps to radians, and the phase sign.

Each rule returns a provenance line so that the Acquisition records what was applied.

Sources for the conventions (public descriptions, not code):
- Siemens: 12-bit phase, stored 0..4095 (optionally RescaleSlope 2 / Intercept -4096, i.e.
  -4096..4094) spanning [-pi, pi); ImageType value 3 ``M``/``P``; XA Enhanced MR per-frame
  ComplexImageComponent and PixelValueTransformationSequence.
- Philips: ImageType ``M_FFE``/``P_FFE``/``R_FFE``/``I_FFE``/``PHASE MAP``; the display rescale of
  phase images gives milliradians (-3142..3142).
- GE: private (0043,102F) "GEMS_PARM_01" image type 0/1/2/3 = magnitude/phase/real/imaginary;
  opposite handedness of the phase (conjugated on input, DESIGN.md); 3D acquisitions may show a
  pi phase offset between alternate slices (the slice-direction FFT without a shift).
  Research-mode series write ScanningSequence ``RM``; the private pulse sequence name (0019,109C)
  and internal sequence name (0019,109E) say what they are (``mfgre``/``efgre3d``/``FGRE`` are
  gradient echoes; ``B0map``/``B0rf``/``3db0map`` are direct field maps: a map in Hz plus a
  magnitude, both image type 0; GE's description in rordenlab/dcm2niix issue #501).
- Li W et al., "Quantitative susceptibility mapping ... a consensus", MRM 2024 (QSM consensus):
  report the vendor phase handling that was applied.
"""

from __future__ import annotations

import math
import re

import numpy as np

VENDORS = ("siemens", "ge", "philips", "canon", "united-imaging", "unknown")

#: vendors whose phase sign (as corrected here) has been validated against known sources
VALIDATED_PHASE_SIGN = frozenset({"siemens", "ge", "philips"})


def vendor_from_manufacturer(manufacturer: str | None) -> str:
    """Normalised vendor name from Manufacturer (0008,0070)."""
    m = (manufacturer or "").strip().lower()
    if "siemens" in m:
        return "siemens"
    if m.startswith("ge") or "general electric" in m or "gems" in m:
        return "ge"
    if "philips" in m:
        return "philips"
    if "canon" in m or "toshiba" in m:
        return "canon"
    if "united imaging" in m or m.startswith("uih") or "united-imaging" in m:
        return "united-imaging"
    return "unknown"


def phase_sign_validated(vendor: str) -> bool:
    """True when the phase sign of ``vendor`` is known (after :func:`phase_sign_factor`)."""
    return vendor in VALIDATED_PHASE_SIGN


def phase_sign_factor(vendor: str) -> int:
    """+1 to use the stored phase as is, -1 to negate it (GE, DESIGN.md 'Phase sign')."""
    return -1 if vendor == "ge" else 1


def phase_sign_provenance(vendor: str) -> str:
    if vendor == "ge":
        return "ge: phase negated (signal conjugated): GE stores the opposite handedness"
    if vendor in VALIDATED_PHASE_SIGN:
        return f"{vendor}: phase sign used as stored"
    return f"{vendor}: phase sign used as stored, NOT validated for this vendor"


# --------------------------------------------------------------------------- components

_COMPONENT_WORDS = {
    "MAGNITUDE": "magnitude",
    "PHASE": "phase",
    "REAL": "real",
    "IMAGINARY": "imaginary",
    "MIXED": "mixed",
}

_IMAGE_TYPE_COMPONENT = {
    "M": "magnitude",
    "P": "phase",
    "R": "real",
    "I": "imaginary",
    "MAG": "magnitude",
    "MAGNITUDE": "magnitude",
    "PHASE": "phase",
    "REAL": "real",
    "IMAGINARY": "imaginary",
    "IMAG": "imaginary",
    "M_FFE": "magnitude",
    "P_FFE": "phase",
    "R_FFE": "real",
    "I_FFE": "imaginary",
    "M_SE": "magnitude",
    "P_SE": "phase",
    "R_SE": "real",
    "I_SE": "imaginary",
    "M_IR": "magnitude",
    "P_IR": "phase",
    "R_IR": "real",
    "I_IR": "imaginary",
    "PHASE MAP": "phase",
}

GE_IMAGE_TYPE_CODES = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


def component_from_word(word: str | None) -> str | None:
    """ComplexImageComponent (0008,9208) value -> component name, or None."""
    return _COMPONENT_WORDS.get((word or "").strip().upper())


def component_from_image_type(image_type, vendor: str) -> tuple[str | None, str]:
    """Component from ImageType / FrameType values (3rd value onwards), with the rule applied.

    Siemens writes ``M``/``P`` as value 3; Philips writes ``M_FFE``/``PHASE MAP`` and a 4th value
    ``M``/``P``/``R``/``I``. Returns ``(component or None, provenance)``.
    """
    tokens = [str(t).strip().upper() for t in (image_type or [])]
    found = []
    for t in tokens[2:]:
        c = _IMAGE_TYPE_COMPONENT.get(t)
        if c and c not in found:
            found.append(c)
    if len(found) == 1:
        return found[0], f"{vendor}: component '{found[0]}' from ImageType {'/'.join(tokens)}"
    if len(found) > 1:
        return "mixed", f"{vendor}: ImageType {'/'.join(tokens)} names several components"
    return None, ""


def ge_component(code) -> str | None:
    """GE private (0043,102F) image type code -> component."""
    try:
        return GE_IMAGE_TYPE_CODES.get(int(code))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- GE sequences

#: GE direct field-mapping sequences (pulse sequence name (0019,109C) or internal name
#: (0019,109E)): a field map in Hz and a magnitude, both stored as image type 0 (magnitude)
GE_FIELD_MAP_SEQUENCES = frozenset({"b0map", "b0rf", "3db0map"})

#: GE gradient-echo sequence families, as they begin a pulse sequence name (after any
#: ``folder/``, e.g. ``cuhpsd/mfgre_BOLD``) or an internal sequence name (``FGRE``, ``EFGRE3D``)
_GE_GRADIENT_ECHO = re.compile(r"^(?:3d)?(?:m|e|f|ef|mf|fs)*(?:gre|spgr|grass|mpgr)|^swan|^qsm", re.IGNORECASE)


def ge_sequence_base(name: str) -> str:
    """A GE sequence name without its folder: ``cuhpsd/mfgre_BOLD`` -> ``mfgre_BOLD``."""
    return name.strip().rsplit("/", 1)[-1]


def ge_is_field_map(names) -> bool:
    """True when GE sequence ``names`` (pulse and internal sequence names) are a direct field map
    (``B0map``, ``B0rf``, ``3db0map``): the scanner's field map in Hz, not per-echo phase."""
    return any(ge_sequence_base(n).lower() in GE_FIELD_MAP_SEQUENCES for n in names if n)


def ge_gradient_echo_name(names) -> str | None:
    """The first of GE sequence ``names`` that names a gradient-echo sequence (``mfgre_BOLD``,
    ``efgre3d_B0``, ``FGRE``, ``EFGRE3D``, ``fspgr``, ``SWAN`` ...), or None. GE research-mode
    series (ScanningSequence ``RM``) say what they are only here."""
    for name in names:
        if name and _GE_GRADIENT_ECHO.match(ge_sequence_base(name)):
            return name
    return None


# --------------------------------------------------------------------------- phase scaling


def phase_scale(
    vendor: str,
    slope: float,
    intercept: float,
    bits_stored: int,
    pixel_representation: int,
    observed: tuple[float, float] | None = None,
) -> tuple[float, float, str]:
    """How rescaled phase values map to radians: ``rad = v * a + b`` with
    ``v = stored * slope + intercept``; returns ``(a, b, rule)``.

    The possible range of ``v`` (from BitsStored, PixelRepresentation and the rescale) tells the
    vendor conventions apart:

    - about [-pi, pi]: radians already (a = 1).
    - about [-3142, 3142] (Philips display rescale, GE): milliradians (a = 1/1000).
    - [-4096, 4094] (Siemens, RescaleSlope 2 / Intercept -4096): ``v * pi / 4096``.
    - [0, 2^bits - 1] (Siemens without rescale, 12-bit): ``(v - 2^(bits-1)) * pi / 2^(bits-1)``.
    - [-2^(bits-1), 2^(bits-1) - 1] (signed, no rescale): ``v * pi / 2^(bits-1)``.

    When the header range is wide (16-bit signed, as GE writes) ``observed`` (min, max of the
    rescaled values) decides between radians, milliradians, +-4096 and +-32768.
    """
    bits = int(bits_stored or 12)
    if pixel_representation:
        lo_s, hi_s = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo_s, hi_s = 0, 2**bits - 1
    lo, hi = sorted([lo_s * slope + intercept, hi_s * slope + intercept])
    step = abs(slope) or 1.0
    if observed is not None and (hi - lo) > 20000 and lo < 0:
        m = max(abs(float(observed[0])), abs(float(observed[1])))
        for bound in (math.pi * 1.001, 3142.0 * 1.001, 4096.0, 32768.0):
            if m <= bound:
                break
        lo, hi = -bound, bound
    if hi <= 3.5 and lo >= -3.5 and hi - lo > 5.0:
        return 1.0, 0.0, f"{vendor}: phase already in radians (rescaled range {lo:.3f}..{hi:.3f})"
    if 2800 <= max(abs(lo), abs(hi)) <= 3300 and lo < 0 < hi:
        return (
            1e-3,
            0.0,
            f"{vendor}: phase in milliradians (rescale slope {slope:g}, "
            f"intercept {intercept:g}, range {lo:g}..{hi:g}) -> v / 1000",
        )
    if lo < 0 < hi:
        half = 2.0 ** round(math.log2(max(abs(lo), abs(hi) + step)))
        return (
            math.pi / half,
            0.0,
            f"{vendor}: signed phase (rescaled range {lo:g}..{hi:g}) -> v * pi / {half:g}",
        )
    half = 2.0 ** round(math.log2(hi - lo + step)) / 2.0
    centre = lo + half
    return (
        math.pi / half,
        -centre * math.pi / half,
        f"{vendor}: unsigned phase (rescaled range {lo:g}..{hi:g}) -> (v - {centre:g}) * pi / {half:g}",
    )


# --------------------------------------------------------------------------- GE slice offset


def alternate_slice_pi_offset(signal: np.ndarray) -> bool:
    """True when odd slices carry a pi phase offset relative to even ones (GE 3D recon artefact).

    ``signal``: complex ``[i, j, k, echo]``. The phase difference between neighbouring slices of
    a smooth object is small; a pi offset on alternate slices makes the magnitude-weighted mean of
    ``s[..., k+1] * conj(s[..., k])`` point near pi for (almost) every k.
    """
    if signal.shape[2] < 3:
        return False
    s = signal[..., 0]
    prod = np.sum(s[:, :, 1:] * np.conj(s[:, :, :-1]), axis=(0, 1))
    ang = np.abs(np.angle(prod[np.abs(prod) > 0]))
    if ang.size == 0:
        return False
    return bool(np.mean(ang > math.pi / 2) > 0.75)
