"""Cheap, header-only classification of one received instance.

The node's series tracker calls :func:`classify_instance` for every instance it receives: which
acquisition it belongs to (``acquisition_key``, independent of series UIDs and descriptions, so
that magnitude and phase series, every echo and vendor exports with odd UIDs end up together),
which image component it holds, how many instances its series should have, and whether the
series can never be a QSM input (``refusal``, a sentence a person can act on).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from qsmnode.dicom import frames, vendors

#: transfer syntaxes whose pixel data are read without loss of phase
ACCEPTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
}

MR_SOP_CLASSES = frozenset({frames.CLASSIC_MR_SOP_CLASS}) | frames.ENHANCED_MR_SOP_CLASSES

#: ImageType / FrameType values that mark an image derived from the raw echoes
_DERIVED_TOKENS = {
    "SWI": "susceptibility-weighted image (SWI)",
    "MNIP": "minimum-intensity projection (minIP)",
    "MINIP": "minimum-intensity projection (minIP)",
    "MIN IP": "minimum-intensity projection (minIP)",
    "MIP": "maximum-intensity projection",
    "PROJECTION IMAGE": "projection image",
    "MOCO": "motion-corrected (MOCO) image",
    "FIL": "filtered image (FIL)",
    "MPR": "multiplanar reformat (MPR)",
    "SUB": "subtraction image",
    "QSM": "susceptibility map (QSM output)",
    "R2STAR": "R2* map",
    "T2_STAR": "T2* map",
    "T2STAR": "T2* map",
    "LOCALIZER": "localizer",
}
_SCANNER_FIELD_MAP_TOKENS = {"FIELD_MAP", "FIELDMAP", "B0", "B0MAP", "B0_MAP"}
_SIEMENS_FIELD_MAP_SEQUENCE = re.compile(r"^\*?fm\d", re.IGNORECASE)
_SIEMENS_SINGLE_COIL = re.compile(r"^[A-Z]{1,4}\d{1,3}$")

REFUSAL_PHASE_DIFFERENCE = (
    "phase-difference field map, not per-echo phase: QSM needs the phase "
    "of every echo; send the multi-echo GRE (magnitude and phase) series"
)
REFUSAL_SCANNER_B0_MAP = (
    "a scanner-computed B0 field map, not multi-echo GRE phase; send the GRE magnitude and "
    "phase/real-imaginary series"
)
REFUSAL_SCANNER_FIELD_MAP = (
    "scanner field map (Hz), not phase: QSM needs the per-echo phase "
    "images; send the multi-echo GRE (magnitude and phase) series"
)


@dataclass(frozen=True)
class InstanceInfo:
    """What one instance is, from its header only (see module docstring)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    vendor: str
    modality: str
    component: str | None
    echo_numbers: tuple[int, ...]
    acquisition_key: str
    expected_in_series: int | None
    refusal: str | None


def transfer_syntax_refusal(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` cannot be used (lossy or unknown compression), or None."""
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not uid or uid in ACCEPTED_TRANSFER_SYNTAXES:
        return None
    name = pydicom.uid.UID(uid).name
    return (
        f"unsupported transfer syntax {name} ({uid}): lossy or unknown compression corrupts "
        "phase; send the series uncompressed or with lossless compression"
    )


def _tokens(values) -> list[str]:
    if values is None or values == "":
        return []
    if isinstance(values, (str, bytes)):
        values = [values if isinstance(values, str) else values.decode("ascii", "ignore")]
    return [str(v).strip().upper() for v in values]


def refusal_reason(
    ds: Dataset, vendor: str, records: list[frames.ImageRecord] | None = None
) -> str | None:
    """Why this instance (and so its series) can never be a QSM input, or None. Header only."""
    modality = (frames.text_values(ds, "Modality") or [""])[0]
    sop_class = (frames.text_values(ds, "SOPClassUID") or [""])[0]
    if modality != "MR" or (sop_class and sop_class not in MR_SOP_CLASSES):
        name = pydicom.uid.UID(sop_class).name if sop_class else "no SOP class"
        return (
            f"not an MR image (Modality '{modality}', {name}): QSM needs the multi-echo GRE "
            "magnitude and phase series"
        )
    reason = transfer_syntax_refusal(ds)
    if reason:
        return reason
    type_sets = [_tokens(frames.text_values(ds, "ImageType"))]
    if records:
        type_sets += list({tuple(_tokens(r.image_type)) for r in records})
    units = {r.units for r in (records or []) if r.units}
    for tokens in type_sets:
        if any(t in _SCANNER_FIELD_MAP_TOKENS for t in tokens) or "Hz" in units:
            return REFUSAL_SCANNER_FIELD_MAP
    ge_names = frames.ge_sequence_names(ds) if vendor == "ge" else ()
    if vendors.ge_is_field_map(ge_names):
        return REFUSAL_SCANNER_B0_MAP
    sequence = " ".join(
        " ".join(frames.text_values(ds, k) or []) for k in ("SequenceName", "PulseSequenceName")
    )
    if vendor == "siemens" and any(_SIEMENS_FIELD_MAP_SEQUENCE.match(s) for s in sequence.split()):
        return REFUSAL_PHASE_DIFFERENCE
    for tokens in type_sets:
        for t in tokens:
            if t in _DERIVED_TOKENS:
                return (
                    f"{_DERIVED_TOKENS[t]} (ImageType {'/'.join(tokens)}), not an original echo "
                    "image: send the original multi-echo GRE magnitude and phase series"
                )
        if tokens and tokens[0] == "DERIVED":
            return (
                f"derived image (ImageType {'/'.join(tokens)}), not an original echo image: "
                "send the original multi-echo GRE magnitude and phase series"
            )
    reason = _not_gradient_echo(ds, ge_names)
    if reason:
        return reason
    echo_pulse = str(ds.get("EchoPulseSequence", "") or "").upper()
    if echo_pulse == "SPIN":
        return (
            "not a gradient-echo acquisition (EchoPulseSequence SPIN): QSM needs a multi-echo GRE"
        )
    if vendor == "siemens":
        coil = ds.get((0x0051, 0x100F))
        coil_name = str(coil.value).strip() if coil is not None and coil.value is not None else ""
        if isinstance(coil.value if coil is not None else None, bytes):
            coil_name = coil.value.decode("ascii", "ignore").strip(" \x00")
        if coil_name and _SIEMENS_SINGLE_COIL.match(coil_name):
            return (
                f"uncombined coil image (coil element {coil_name}): send the coil-combined "
                "series (switch off 'save uncombined' or send the combined images)"
            )
    if "UNCOMBINED" in type_sets[0]:
        return "uncombined coil image (ImageType UNCOMBINED): send the coil-combined series"
    return None


def _not_gradient_echo(ds: Dataset, ge_names: tuple[str, ...]) -> str | None:
    """Why ScanningSequence says this is not a gradient echo, or None. Research-mode series
    (``RM``) name no technique there; a GE one is a gradient echo when its sequence names say so
    (``ge_names``: :func:`qsmnode.dicom.frames.ge_sequence_names`)."""
    scanning = _tokens(frames.text_values(ds, "ScanningSequence"))
    if not scanning or "GR" in scanning or "EP" in scanning:
        return None
    if scanning == ["RM"] and vendors.ge_gradient_echo_name(ge_names):
        return None
    named = "; GE sequence " + "/".join(filter(None, ge_names)) if any(ge_names) else ""
    return (
        f"not a gradient-echo acquisition (ScanningSequence {'/'.join(scanning)}{named}): QSM "
        "needs a multi-echo GRE"
    )


def _r(value, digits):
    try:
        return round(float(value), digits)
    except (TypeError, ValueError):
        return None


def acquisition_key(ds: Dataset, vendor: str, records: list[frames.ImageRecord]) -> str:
    """Key shared by every image (all components, echoes, series) of one acquisition.

    Built from FrameOfReferenceUID, orientation, pixel spacing, matrix, patient and study date,
    vendor, imaging frequency and acquisition-level timing (TR, flip angle, 2D/3D, slice
    thickness): never from Series/Study Instance UIDs or descriptions.
    """
    first = records[0] if records else None
    attrs = frames.acquisition_attributes(ds)
    freq = frames.imaging_frequency_mhz(ds)
    parts = (
        (frames.text_values(ds, "FrameOfReferenceUID") or [""])[0],
        tuple(round(v, 3) + 0.0 for v in (first.orientation if first else ())),
        tuple(round(v, 4) for v in (first.pixel_spacing if first else ())),
        int(ds.get("Rows", 0) or 0),
        int(ds.get("Columns", 0) or 0),
        (frames.text_values(ds, "PatientID") or [""])[0],
        (frames.text_values(ds, "StudyDate") or [""])[0],
        vendor,
        _r(freq, 3),
        _r(attrs["repetition_time_ms"], 2),
        _r(attrs["flip_angle_deg"], 1),
        attrs["acquisition_type"].upper(),
        _r(attrs["slice_thickness_mm"], 3),
    )
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def expected_instances(ds: Dataset, vendor: str, records: list[frames.ImageRecord]) -> int | None:
    """How many instances the complete series holds, when the header says so."""
    if frames.is_enhanced(ds):
        tes = {r.echo_time_ms for r in records}
        if len(tes) > 1 or vendor == "philips":
            return 1  # one instance holds all echoes (and components)
        return None
    value = ds.get("ImagesInAcquisition")
    try:
        if value not in (None, "") and int(value) > 0:
            return int(value)
    except (TypeError, ValueError):
        pass
    return None


def classify_instance(ds: Dataset) -> InstanceInfo:
    """Classify one instance from its header (pixel data are not touched)."""
    vendor = vendors.vendor_from_manufacturer(ds.get("Manufacturer"))
    try:
        records = frames.image_records(ds, vendor)
    except Exception as err:  # a broken functional group: refuse, do not crash the tracker
        return classify_records(
            ds,
            vendor,
            [],
            broken=(f"unreadable image header ({type(err).__name__}: {err}); re-export the series"),
        )
    return classify_records(ds, vendor, records)


def classify_records(
    ds: Dataset, vendor: str, records: list[frames.ImageRecord], broken: str | None = None
) -> InstanceInfo:
    """:func:`classify_instance` for a header whose image records were already extracted."""
    comps = {r.component for r in records}
    if len(comps) == 1:
        component = next(iter(comps))
    elif len(comps) > 1:
        component = "mixed"
    else:
        component = None
    if frames.is_enhanced(ds):
        tes = sorted({r.echo_time_ms for r in records if r.echo_time_ms is not None})
        echo_numbers = tuple(range(1, len(tes) + 1)) if len(tes) > 1 else ()
    else:
        en = ds.get("EchoNumbers")
        try:
            echo_numbers = (
                tuple(
                    int(v)
                    for v in (
                        en if isinstance(en, (list, tuple, pydicom.multival.MultiValue)) else [en]
                    )
                )
                if en not in (None, "")
                else ()
            )
        except (TypeError, ValueError):
            echo_numbers = ()
    refusal = broken or refusal_reason(ds, vendor, records)
    return InstanceInfo(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        vendor=vendor,
        modality=str(ds.get("Modality", "") or ""),
        component=component,
        echo_numbers=echo_numbers,
        acquisition_key=acquisition_key(ds, vendor, records),
        expected_in_series=expected_instances(ds, vendor, records),
        refusal=refusal,
    )
