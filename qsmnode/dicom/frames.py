"""One record per 2D image, for classic single-frame instances and Enhanced MR multi-frame ones.

A classic MR Image Storage instance is one image; an Enhanced MR (or Legacy Converted Enhanced
MR) instance holds many frames whose geometry, echo time, image component and rescale live in
the Shared and Per-frame Functional Groups (PS3.3 C.7.6.16, C.8.13.5). :func:`image_records`
flattens both into :class:`ImageRecord` so that the loader groups and sorts them alike.

Header only: nothing here touches pixel data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from qsmnode.dicom import vendors

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
CLASSIC_MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class ImageRecord:
    """One 2D image: a classic instance (``frame is None``) or one frame (0-based) of an
    enhanced instance. Units: mm for geometry, ms for ``echo_time_ms``."""

    frame: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    echo_time_ms: float | None
    echo_number: int | None
    component: str | None
    component_rule: str
    slope: float
    intercept: float
    image_type: tuple[str, ...]
    units: str | None  # Real World Value Mapping units code (e.g. 'Hz'), when present


def text_values(ds: Dataset, keyword: str) -> list[str] | None:
    """The values of a string element (CS, DS, IS, LO, SH, UI ...) as ``str`` without pydicom's
    value conversion (fast path for headers read from files: the raw bytes are split on '\\').
    None when absent or empty."""
    try:
        elem = ds.get_item(keyword)
    except (KeyError, ValueError):
        return None
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip(" \x00")
        return [v.strip(" \x00") for v in text.split("\\")] if text else None
    if isinstance(value, str):
        return [value] if value != "" else None
    try:
        values = [str(v) for v in value]
    except TypeError:
        values = [str(value)]
    return values or None


def float_values(ds: Dataset, keyword: str, n: int | None = None) -> tuple[float, ...] | None:
    """Numeric values of a DS/IS/FD element as floats (fast path, see :func:`text_values`)."""
    values = text_values(ds, keyword)
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except ValueError:
        return None
    if n is not None and len(out) != n:
        return None
    return out


def float_value(ds: Dataset, keyword: str, default=None):
    values = float_values(ds, keyword)
    return values[0] if values else default


def is_enhanced(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES or (
        "PerFrameFunctionalGroupsSequence" in ds
    )


def _first(seq_owner, keyword):
    seq = seq_owner.get(keyword) if seq_owner is not None else None
    if seq:
        return seq[0]
    return None


def _fg(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The functional group item ``keyword`` from the per-frame item, else the shared one."""
    item = _first(per_frame, keyword)
    return item if item is not None else _first(shared, keyword)


def _floats(values, n: int | None = None) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(
            float(v)
            for v in (
                values if hasattr(values, "__len__") and not isinstance(values, str) else [values]
            )
        )
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def private_value(ds: Dataset, group: int, creator: str, offset: int):
    """The value of private element ``offset`` (0x00-0xFF) of ``creator``'s block in ``group``,
    or None. Where the group has no creator at all (an export that dropped them), the first
    block (``gggg,10xx``), where scanners put it, is read."""
    try:
        return ds.get_private_item(group, offset, creator).value
    except (KeyError, AttributeError, ValueError):
        pass
    if (group, 0x0010) in ds:
        return None  # the first block is another creator's
    elem = ds.get((group, 0x1000 | offset))
    return elem.value if elem is not None else None


def private_text(ds: Dataset, group: int, creator: str, offset: int) -> str:
    """:func:`private_value` as text ('' when absent): bytes (implicit VR without a private
    dictionary) are decoded, padding is stripped."""
    value = private_value(ds, group, creator, offset)
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


def ge_image_type_code(ds: Dataset):
    """GE private (0043,102F) image type (0 mag, 1 phase, 2 real, 3 imaginary), or None."""
    return private_value(ds, 0x0043, "GEMS_PARM_01", 0x2F)


def ge_sequence_names(ds: Dataset) -> tuple[str, str]:
    """GE pulse sequence name (0019,109C), e.g. ``cuhpsd/mfgre_BOLD``, and internal pulse
    sequence name (0019,109E), e.g. ``FGRE``; '' where absent."""
    return (
        private_text(ds, 0x0019, "GEMS_ACQU_01", 0x9C),
        private_text(ds, 0x0019, "GEMS_ACQU_01", 0x9E),
    )


def classic_component(ds: Dataset, vendor: str) -> tuple[str | None, str]:
    """Image component of a classic instance: GE private tag, ComplexImageComponent, ImageType."""
    if vendor == "ge":
        code = ge_image_type_code(ds)
        if code is not None:
            if isinstance(code, bytes):  # implicit VR without a private dictionary: SS
                code = int.from_bytes(code[:2], "little", signed=True)
            comp = vendors.ge_component(code)
            if comp:
                return comp, f"ge: component '{comp}' from private (0043,102F) = {code}"
    word = text_values(ds, "ComplexImageComponent")
    comp = vendors.component_from_word(word[0] if word else None)
    if comp:
        return comp, f"{vendor}: component '{comp}' from ComplexImageComponent"
    return vendors.component_from_image_type(text_values(ds, "ImageType"), vendor)


def _units(item: Dataset | None) -> str | None:
    if item is None:
        return None
    units = _first(item, "MeasurementUnitsCodeSequence")
    if units is not None and units.get("CodeValue"):
        return str(units.CodeValue)
    return None


def image_records(ds: Dataset, vendor: str) -> list[ImageRecord]:
    """Records for every image of ``ds`` (header only)."""
    if not is_enhanced(ds):
        comp, rule = classic_component(ds, vendor)
        echo_numbers = float_values(ds, "EchoNumbers")
        return [
            ImageRecord(
                frame=None,
                position=float_values(ds, "ImagePositionPatient", 3) or (0.0, 0.0, 0.0),
                orientation=float_values(ds, "ImageOrientationPatient", 6) or (),
                pixel_spacing=float_values(ds, "PixelSpacing", 2) or (1.0, 1.0),
                echo_time_ms=float_value(ds, "EchoTime"),
                echo_number=int(echo_numbers[0]) if echo_numbers else None,
                component=comp,
                component_rule=rule,
                slope=float_value(ds, "RescaleSlope", 1.0) or 1.0,
                intercept=float_value(ds, "RescaleIntercept", 0.0),
                image_type=tuple(text_values(ds, "ImageType") or ()),
                units=(
                    _units(_first(ds, "RealWorldValueMappingSequence"))
                    if "RealWorldValueMappingSequence" in ds
                    else None
                ),
            )
        ]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    top_comp = vendors.component_from_word(ds.get("ComplexImageComponent"))
    records = []
    for index, pf in enumerate(per_frames):
        pos = _fg(pf, shared, "PlanePositionSequence")
        ori = _fg(pf, shared, "PlaneOrientationSequence")
        meas = _fg(pf, shared, "PixelMeasuresSequence")
        echo = _fg(pf, shared, "MREchoSequence")
        ftype = _fg(pf, shared, "MRImageFrameTypeSequence")
        pvt = _fg(pf, shared, "PixelValueTransformationSequence")
        rwv = _fg(pf, shared, "RealWorldValueMappingSequence")
        frame_type = tuple(
            str(t) for t in ((ftype.get("FrameType") if ftype is not None else None) or [])
        )
        comp = vendors.component_from_word(
            ftype.get("ComplexImageComponent") if ftype is not None else None
        )
        rule = f"{vendor}: component '{comp}' from per-frame ComplexImageComponent" if comp else ""
        if comp is None or comp == "mixed":
            c2, r2 = vendors.component_from_image_type(frame_type, vendor)
            if c2:
                comp, rule = c2, r2
        if comp is None and top_comp and top_comp != "mixed":
            comp, rule = top_comp, f"{vendor}: component '{top_comp}' from ComplexImageComponent"
        te = echo.get("EffectiveEchoTime") if echo is not None else None
        slope = pvt.get("RescaleSlope") if pvt is not None else ds.get("RescaleSlope")
        intercept = pvt.get("RescaleIntercept") if pvt is not None else ds.get("RescaleIntercept")
        records.append(
            ImageRecord(
                frame=index,
                position=_floats(pos.get("ImagePositionPatient") if pos is not None else None, 3)
                or (0.0, 0.0, 0.0),
                orientation=_floats(
                    ori.get("ImageOrientationPatient") if ori is not None else None, 6
                )
                or (),
                pixel_spacing=_floats(meas.get("PixelSpacing") if meas is not None else None, 2)
                or (1.0, 1.0),
                echo_time_ms=float(te) if te not in (None, "") else None,
                echo_number=None,  # enhanced frames are matched to echoes by EffectiveEchoTime
                component=comp,
                component_rule=rule,
                slope=float(slope if slope not in (None, "") else 1.0),
                intercept=float(intercept if intercept not in (None, "") else 0.0),
                image_type=frame_type,
                units=_units(rwv),
            )
        )
    return records


def imaging_frequency_mhz(ds: Dataset) -> float | None:
    """ImagingFrequency (MHz): top level (classic), else TransmitterFrequency in the MR Imaging
    Modifier functional group (Enhanced MR), else Philips' private per-frame copy."""
    value = float_value(ds, "ImagingFrequency")
    if value is not None:
        return value
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    for owner in [shared] + list(per_frames[:1]):
        mod = _first(owner, "MRImagingModifierSequence")
        if mod is not None and mod.get("TransmitterFrequency") not in (None, ""):
            freq = mod.TransmitterFrequency
            freq = freq[0] if hasattr(freq, "__len__") and not isinstance(freq, str) else freq
            return float(freq)
        if owner is not None:
            for elem in owner:  # Philips keeps a classic copy in a private sequence (2005,140F)
                if elem.tag.is_private and elem.VR == "SQ" and elem.value:
                    inner = elem.value[0]
                    if inner.get("ImagingFrequency") not in (None, ""):
                        return float(inner.ImagingFrequency)
    return None


def acquisition_attributes(ds: Dataset) -> dict:
    """Acquisition-level attributes that every image of one acquisition shares (classic or
    enhanced): TR (ms), flip angle (deg), acquisition type, slice thickness (mm)."""
    tr = float_value(ds, "RepetitionTime")
    flip = float_value(ds, "FlipAngle")
    thickness = float_value(ds, "SliceThickness")
    if is_enhanced(ds):
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        per = (ds.get("PerFrameFunctionalGroupsSequence") or [None])[0]
        timing = _fg(per, shared, "MRTimingAndRelatedParametersSequence")
        if timing is not None:
            tr = timing.get("RepetitionTime", tr)
            flip = timing.get("FlipAngle", flip)
        meas = _fg(per, shared, "PixelMeasuresSequence")
        if meas is not None:
            thickness = meas.get("SliceThickness", thickness)

    def num(v):
        try:
            return None if v in (None, "") else float(v)
        except (TypeError, ValueError):
            return None

    return {
        "repetition_time_ms": num(tr),
        "flip_angle_deg": num(flip),
        "acquisition_type": (text_values(ds, "MRAcquisitionType") or [""])[0],
        "slice_thickness_mm": num(thickness),
    }
