"""DICOM outputs: the derived classic MR series (QSM, SWI, MINIP, R2STAR) and the top-level builder.

Output contract (``/work/shared/DESIGN.md``): every object is in the source study (same
StudyInstanceUID, patient and study attributes), on the source geometry and
FrameOfReferenceUID, in a new series with deterministic UIDs (:mod:`qsmnode.dicom.uids`).
Classic MR Image Storage, one instance per slice, ``vol[:, :, k] == pixel_array.T``:

========  ==================================================================================
KIND      pixel data
========  ==================================================================================
QSM       int16, susceptibility in ppb = ``clip(rint(chi_ppm * 1000), -32768, 32767)``, 0
          outside the mask; RescaleSlope 1, RescaleIntercept 0; window C 0 / W 300 ppb.
SWI       uint16, ``rint(swi * s)`` with ``s = 4095 / max(swi, minip)`` (arbitrary units;
          SWI and MINIP share the scale so they can be compared).
MINIP     uint16, same scale as SWI.
R2STAR    uint16, ``clip(rint(r2star_per_s * 10), 0, 65535)``; RescaleSlope 0.1 -> 1/s.
========  ==================================================================================

General Equipment names qsmnode (the equipment that made the object); the scanner and qsmnode
are both in the Contributing Equipment Sequence (acquisition and processing equipment).
"""

from __future__ import annotations

import datetime as _dt
import io
from concurrent.futures import ThreadPoolExecutor
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

import qsmnode
from qsmnode.dicom import uids
from qsmnode.errors import InputRefused

MANUFACTURER = "qsmnode"
CLASSIC_KINDS = ("QSM", "SWI", "MINIP", "R2STAR")
KIND_PARAMETRIC_MAP = "QSM_PM"
KIND_SR = "SR"
KIND_SUMMARY = "SUMMARY"
_SERIES_OFFSET = {"QSM": 1, "SWI": 2, "MINIP": 3, "R2STAR": 4, KIND_PARAMETRIC_MAP: 5,
                  KIND_SR: 6, KIND_SUMMARY: 7}
QSM_WINDOW_CENTER_PPB = 0
QSM_WINDOW_WIDTH_PPB = 300
R2STAR_RESCALE_SLOPE = 0.1
SWI_FULL_SCALE = 4095

PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "OtherPatientIDsSequence",
    "PatientIdentityRemoved", "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
)
_SCANNER_EQUIPMENT_KEYWORDS = (
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName",
    "InstitutionalDepartmentName", "ManufacturerModelName", "DeviceSerialNumber",
    "SoftwareVersions",
)
_MR_COPY_KEYWORDS = (
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName",
    "RepetitionTime", "EchoTrainLength", "FlipAngle", "ImagingFrequency", "ImagedNucleus",
    "MagneticFieldStrength", "ReceiveCoilName", "TransmitCoilName", "BodyPartExamined",
    "PatientPosition", "ProtocolName",
)


@dataclass(frozen=True)
class SliceGeometry:
    """Image Plane attributes derived from the affine (LPS mm; axes of DESIGN.md)."""

    image_orientation: list[float]  # row cosine (along i), column cosine (along j)
    pixel_spacing: list[float]  # [spacing between rows (j), spacing between columns (i)]
    slice_spacing_mm: float
    positions: np.ndarray  # (n_k, 3) ImagePositionPatient of each slice, mm
    rows: int  # n_j
    columns: int  # n_i


def slice_geometry(affine: np.ndarray, shape: tuple[int, int, int]) -> SliceGeometry:
    """Per-slice DICOM geometry of a volume ``[i, j, k]`` with ``affine`` (index -> LPS mm)."""
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    row_cos = a[:3, 0] / spacing[0]
    col_cos = a[:3, 1] / spacing[1]
    k = np.arange(shape[2], dtype=np.float64)
    positions = a[:3, 3][None, :] + k[:, None] * a[:3, 2][None, :]
    return SliceGeometry(
        image_orientation=[_ds_float(v) for v in (*row_cos, *col_cos)],
        pixel_spacing=[_ds_float(spacing[1]), _ds_float(spacing[0])],
        slice_spacing_mm=float(spacing[2]),
        positions=positions,
        rows=int(shape[1]),
        columns=int(shape[0]),
    )


def _ds_float(value: float) -> float:
    """Round to what a DS (16 characters) can hold without loss of meaning."""
    return float(f"{float(value):.10g}") if abs(value) >= 1e-6 else 0.0


def series_number(header: Dataset, kind: str) -> int:
    """Output SeriesNumber: source SeriesNumber * 100 + a fixed offset per kind."""
    try:
        base = int(header.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        base = 0
    return base * 100 + _SERIES_OFFSET.get(kind, 9)


def copy_patient_study(header: Dataset, ds: Dataset) -> None:
    """Copy patient and study attributes (and the frame of reference) from the source header."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in header:
            ds[keyword] = _copy_element(header[keyword])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, possibly empty
    ds.FrameOfReferenceUID = header.FrameOfReferenceUID
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")


def _copy_element(elem):
    import copy

    return copy.deepcopy(elem)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def contributing_equipment(header: Dataset, software_version: str, when: _dt.datetime) -> Sequence:
    """Contributing Equipment Sequence: the scanner (acquisition) and qsmnode (processing)."""
    items = []
    scanner = Dataset()
    scanner.Manufacturer = header.get("Manufacturer", "") or "UNKNOWN"
    for keyword in ("InstitutionName", "StationName", "ManufacturerModelName",
                    "DeviceSerialNumber", "SoftwareVersions"):
        if header.get(keyword):
            scanner[keyword] = _copy_element(header[keyword])
    scanner.PurposeOfReferenceCodeSequence = Sequence(
        [_code_item("109101", "DCM", "Acquisition Equipment")])
    items.append(scanner)
    processing = Dataset()
    processing.Manufacturer = MANUFACTURER
    processing.ManufacturerModelName = "qsmnode QSM reconstruction"
    processing.SoftwareVersions = str(software_version)
    processing.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    processing.ContributionDescription = (
        "Quantitative susceptibility mapping, SWI, minIP and R2* computed by qsmnode "
        f"{software_version} from the multi-echo GRE source series")
    processing.PurposeOfReferenceCodeSequence = Sequence(
        [_code_item("109102", "DCM", "Processing Equipment")])
    items.append(processing)
    return Sequence(items)


def algorithm_summary(result) -> str:
    """One line naming every step's algorithm (for DerivationDescription, <= 1024 chars)."""
    parts = [f"{s.name}: {s.algorithm}" for s in result.steps]
    text = "; ".join(parts)
    return text[:1000]


_DERIVATION = {
    "QSM": ("126396", "DCM", "Magnetic Susceptibility",
            "Quantitative susceptibility map in ppb (1 = 0.001 ppm), referenced to {ref}"),
    "SWI": ("113053", "DCM", "Pixel by pixel multiplication",
            "Susceptibility-weighted image: magnitude multiplied by a phase mask"),
    "MINIP": ("113079", "DCM", "Minimum intensity projection",
              "Minimum-intensity projection of the SWI over a slab along the slice axis"),
    "R2STAR": ("126395", "DCM", "R2*",
               "R2* map from a mono-exponential fit of the echo magnitudes, 1/s x 10"),
}

_SERIES_TEXT = {
    "QSM": "QSM susceptibility ppb",
    "SWI": "SWI susceptibility-weighted",
    "MINIP": "MINIP of SWI",
    "R2STAR": "R2STAR 1/s",
}


def _raw_sequence(keyword: str, sequence: Sequence) -> RawDataElement:
    """``sequence`` encoded once (explicit VR little endian) as a raw element.

    Hundreds of slices share their Source Image / Referenced Series / equipment sequences;
    encoding each once and writing the bytes as they are makes writing 3-4x faster. Reading the
    attribute back (``ds.SourceImageSequence``) decodes it as usual.
    """
    holder = Dataset()
    setattr(holder, keyword, sequence)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, holder)
    encoded = buffer.getvalue()
    # tag (4) + "SQ" (2) + reserved (2) + length (4), then the items and the delimiter
    return RawDataElement(Tag(keyword), "SQ", 0xFFFFFFFF, encoded[12:], 0, False, True)


def _pre_encoded(ds: Dataset) -> Dataset:
    """``ds`` encoded once (explicit VR little endian) and read back lazily: its elements stay
    raw bytes, which the writer copies as they are into each of the hundreds of slices."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return read_dataset(io.BytesIO(buffer.getvalue()), is_implicit_VR=False,
                        is_little_endian=True)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element with a defined length (value padded to even)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if vr == b"SQ":
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(content: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _raw(tag: int, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


_PURPOSE_SOURCE = _element(0x0040A170, b"SQ", _item(
    _element(0x00080100, b"SH", b"121322") + _element(0x00080102, b"SH", b"DCM")
    + _element(0x00080104, b"LO", b"Source image for image processing operation")))


def _source_sequences(acquisition) -> tuple[list[RawDataElement], list[RawDataElement]]:
    """Per slice: Source Image Sequence and Referenced Series Sequence (shared by all kinds),
    encoded once as raw explicit-VR little-endian elements (hundreds of slices x 4 series;
    pydicom's element-by-element encoding of them was the largest cost of writing)."""
    source_seqs: list[RawDataElement] = []
    series_seqs: list[RawDataElement] = []
    for refs in acquisition.source_instances:
        items = []
        by_series: dict[str, list[bytes]] = {}
        for ref in refs:
            ident = (_element(0x00081150, b"UI", ref.sop_class_uid.encode("ascii"))
                     + _element(0x00081155, b"UI", ref.sop_instance_uid.encode("ascii")))
            items.append(_item(ident + _PURPOSE_SOURCE))
            by_series.setdefault(ref.series_instance_uid, []).append(_item(ident))
        source_seqs.append(_raw(0x00082112, b"".join(items)))
        series_items = [
            _item(_element(0x0008114A, b"SQ", b"".join(inst))
                  + _element(0x0020000E, b"UI", uid.encode("ascii")))
            for uid, inst in by_series.items()
        ]
        series_seqs.append(_raw(0x00081115, b"".join(series_items)))
    return source_seqs, series_seqs


def qsm_to_ppb(chi_ppm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Stored QSM values: int16 ppb = clip(rint(chi_ppm * 1000)), 0 outside ``mask`` and at NaN/inf."""
    chi = np.array(chi_ppm, dtype=np.float64)  # one float64 copy, then in place
    chi[~(np.asarray(mask, dtype=bool) & np.isfinite(chi))] = 0.0
    np.multiply(chi, 1000.0, out=chi)
    np.rint(chi, out=chi)
    np.clip(chi, -32768, 32767, out=chi)
    return chi.astype(np.int16)


def r2star_to_stored(r2star_per_s: np.ndarray) -> np.ndarray:
    """Stored R2* values: uint16 = clip(rint(R2* [1/s] * 10), 0, 65535)."""
    r2 = np.array(r2star_per_s, dtype=np.float64)  # one float64 copy, then in place
    np.nan_to_num(r2, copy=False, nan=0.0, posinf=6553.5)
    np.divide(r2, R2STAR_RESCALE_SLOPE, out=r2)
    np.rint(r2, out=r2)
    np.clip(r2, 0, 65535, out=r2)
    return r2.astype(np.uint16)


def swi_scale(swi: np.ndarray, minip: np.ndarray) -> float:
    """Common factor mapping SWI and MINIP (magnitude units) to 0..4095."""
    peak = max(float(np.nanmax(swi)) if swi.size else 0.0,
               float(np.nanmax(minip)) if minip.size else 0.0)
    return SWI_FULL_SCALE / peak if peak > 0 else 1.0


def magnitude_to_stored(image: np.ndarray, scale: float) -> np.ndarray:
    """uint16 = clip(rint(image * scale), 0, 65535)."""
    img = np.array(image, dtype=np.float64)  # one float64 copy, then in place
    np.nan_to_num(img, copy=False, nan=0.0)
    np.multiply(img, scale, out=img)
    np.rint(img, out=img)
    np.clip(img, 0, 65535, out=img)
    return img.astype(np.uint16)


def _window(stored: np.ndarray, mask: np.ndarray, slope: float = 1.0) -> tuple[float, float]:
    values = stored[mask] if mask.any() else stored.ravel()
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99]) * slope
    width = max(float(hi - lo), slope)
    return round(float(lo + hi) / 2.0, 1), round(width, 1)


def build_classic_series(
    acquisition,
    result,
    kind: str,
    stored: np.ndarray,
    *,
    software_version: str,
    when: _dt.datetime,
    source_sequences=None,
) -> list[Dataset]:
    """One classic MR Image Storage instance per slice for ``kind`` from the stored array.

    ``stored``: int16 (QSM) or uint16 ``[i, j, k]`` stored values (see the module table).
    """
    if kind not in CLASSIC_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {CLASSIC_KINDS}")
    header = acquisition.header
    shape = stored.shape
    geometry = slice_geometry(acquisition.affine, shape)
    if source_sequences is None:
        source_sequences = _source_sequences(acquisition)
    source_seqs, series_seqs = source_sequences
    n_k = shape[2]
    if len(source_seqs) != n_k:
        raise ValueError(
            f"acquisition lists source instances for {len(source_seqs)} slices but the map "
            f"has {n_k}; the loader must give one entry per slice")
    series_uid = uids.series_uid(acquisition.source_series_uids, software_version, kind)
    signed = kind == "QSM"

    base = Dataset()
    base.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 100")
    base.ImageType = ["DERIVED", "SECONDARY", kind]
    base.SOPClassUID = MRImageStorage
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    base.InstanceCreationDate, base.InstanceCreationTime = date, time
    base.SeriesDate, base.SeriesTime = date, time
    base.ContentDate, base.ContentTime = date, time
    base.Modality = "MR"
    if header.get("Laterality"):
        base.Laterality = header.Laterality
    if not header.get("BodyPartExamined"):
        base.BodyPartExamined = "BRAIN"  # unpaired: Laterality (2C) is then absent
    base.Manufacturer = MANUFACTURER
    base.ManufacturerModelName = "qsmnode QSM reconstruction"
    base.SoftwareVersions = str(software_version)
    base.InstitutionName = header.get("InstitutionName", "")
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = series_number(header, kind)
    base.SeriesDescription = f"{_SERIES_TEXT[kind]} (qsmnode {software_version})"
    copy_patient_study(header, base)
    for keyword in _MR_COPY_KEYWORDS:
        if keyword in header:
            base[keyword] = _copy_element(header[keyword])
    if "ScanningSequence" not in base or not base.ScanningSequence:
        base.ScanningSequence = "GR"
    if "SequenceVariant" not in base or not base.SequenceVariant:
        base.SequenceVariant = "NONE"
    for keyword, default in (("ScanOptions", ""), ("MRAcquisitionType", "3D"),
                             ("EchoTrainLength", None), ("PatientPosition", "")):
        if keyword not in base:
            setattr(base, keyword, default)
    if "RepetitionTime" not in base:
        base.RepetitionTime = None
    base.EchoTime = None  # derived from all echoes: no single echo time
    base.ImagingFrequency = header.get("ImagingFrequency", round(
        acquisition.b0_tesla * 42.57747892, 6))
    base.ImageOrientationPatient = geometry.image_orientation
    base.PixelSpacing = geometry.pixel_spacing
    thickness = header.get("SliceThickness", None)
    base.SliceThickness = _ds_float(float(thickness)) if thickness else _ds_float(
        geometry.slice_spacing_mm)
    base.SpacingBetweenSlices = _ds_float(geometry.slice_spacing_mm)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = geometry.rows
    base.Columns = geometry.columns
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1 if signed else 0
    base.BurnedInAnnotation = "NO"
    base.LossyImageCompression = "00"
    code = _DERIVATION[kind]
    base.DerivationDescription = (
        code[3].format(ref=result.reference_region) + ". " + algorithm_summary(result))[:1024]
    base["DerivationCodeSequence"] = _raw_sequence(
        "DerivationCodeSequence", Sequence([_code_item(*code[:3])]))
    base["ContributingEquipmentSequence"] = _raw_sequence(
        "ContributingEquipmentSequence", contributing_equipment(header, software_version, when))
    mask = np.asarray(result.mask, dtype=bool)
    if kind == "QSM":
        base.RescaleIntercept = 0
        base.RescaleSlope = 1
        base.WindowCenter = QSM_WINDOW_CENTER_PPB
        base.WindowWidth = QSM_WINDOW_WIDTH_PPB
        base.WindowCenterWidthExplanation = "QSM -150..+150 ppb"
    elif kind == "R2STAR":
        base.RescaleIntercept = 0
        base.RescaleSlope = R2STAR_RESCALE_SLOPE
        center, width = _window(stored, mask, R2STAR_RESCALE_SLOPE)
        base.WindowCenter, base.WindowWidth = center, width
    else:
        center, width = _window(stored, mask)
        base.WindowCenter, base.WindowWidth = center, width

    charset = convert_encodings(base.SpecificCharacterSet)
    base = _pre_encoded(base)
    dtype = "<i2" if signed else "<u2"
    slices = np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(dtype, copy=False)
    datasets = []
    for k in range(n_k):
        ds = Dataset(dict(base))  # new element dict; unchanged elements are shared
        number = k + 1
        sop_uid = uids.instance_uid(acquisition.source_series_uids, software_version, kind, number)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds_float(v) for v in geometry.positions[k]]
        ds[source_seqs[k].tag] = source_seqs[k]
        ds[series_seqs[k].tag] = series_seqs[k]
        ds.add_new(0x7FE00010, "OW", slices[k].tobytes())
        ds.file_meta = _file_meta(MRImageStorage, sop_uid)
        # the raw (pre-encoded) sequences are written as they are in this encoding
        ds.set_original_encoding(False, True, charset)
        datasets.append(ds)
    return datasets


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"QSMNODE_{qsmnode.__version__}"[:16]
    return meta


def classic_stored_arrays(result) -> dict[str, np.ndarray]:
    """The stored (integer) volume of each classic kind, ``[i, j, k]``."""
    scale = swi_scale(np.asarray(result.swi), np.asarray(result.minip))
    return {
        "QSM": qsm_to_ppb(result.chi_ppm, result.mask),
        "SWI": magnitude_to_stored(result.swi, scale),
        "MINIP": magnitude_to_stored(result.minip, scale),
        "R2STAR": r2star_to_stored(result.r2star_per_s),
    }


#: the order in which :func:`iter_output_series` builds the series (and the node writes and sends
#: them): the susceptibility map first, then what is read beside it, the report, and the rest
SERIES_ORDER = ("QSM", "SWI", "MINIP", "R2STAR", KIND_SR, KIND_PARAMETRIC_MAP, KIND_SUMMARY)


def iter_output_series(
    acquisition,
    result,
    *,
    parametric_map: bool = True,
    summary_image: bool = True,
    software_version: str = qsmnode.__version__,
    on_review: Callable[[Any], None] | None = None,
) -> Iterator[tuple[str, list[Dataset]]]:
    """Every output object for one reconstructed acquisition, one series at a time.

    Yields ``(kind, datasets)`` in :data:`SERIES_ORDER`: the QSM, SWI, MINIP and R2STAR series
    (one classic MR instance per slice), the Comprehensive 3D SR (TID 1500) with findings,
    measurements, quality figures and provenance, the float32 Parametric Map of the QSM in ppm
    (if ``parametric_map``) and the summary Secondary Capture image(s) (if ``summary_image``).
    Each series is built only when the previous one has been taken, so a caller can write and
    send the QSM while the rest is built. Runs the findings detection and plausibility checks
    (:func:`qsmnode.report.review.review_result`) itself, on a thread beside the classic series,
    and hands the :class:`~qsmnode.report.review.Review` to ``on_review`` (if given) before the
    SR is built: a low-confidence result's SR and summary withhold the findings.

    Raises :class:`InputRefused` when the source cannot carry derived objects (no frame of
    reference, no study): at the call, before anything is built.
    """
    if not acquisition.header.get("FrameOfReferenceUID"):
        raise InputRefused(
            "the source series has no FrameOfReferenceUID, so derived images cannot be placed "
            "on its geometry",
            "send the original scanner series (with the Frame of Reference module)")
    if not acquisition.header.get("StudyInstanceUID"):
        raise InputRefused("the source series has no StudyInstanceUID, so outputs cannot be "
                           "filed into its study", "send the original scanner series")
    return _series(acquisition, result, parametric_map, summary_image, str(software_version),
                   on_review)


def _series(acquisition, result, parametric_map: bool, summary_image: bool,
            software_version: str, on_review) -> Iterator[tuple[str, list[Dataset]]]:
    from qsmnode.dicom.parametric_map import build_parametric_map
    from qsmnode.report.review import review_result
    from qsmnode.report.sr import build_measurement_report
    from qsmnode.report.summary_image import build_summary_images

    when = _dt.datetime.now()
    sequences = _source_sequences(acquisition)

    def classic(kind: str, stored: np.ndarray) -> list[Dataset]:
        return build_classic_series(acquisition, result, kind, stored, software_version=software_version,
                                    when=when, source_sequences=sequences)

    qsm = classic("QSM", qsm_to_ppb(result.chi_ppm, result.mask))
    yield "QSM", qsm
    # the findings (for the SR and the summary) on a thread of their own while the other classic
    # series are built (numpy and scipy.ndimage release the GIL for most of it); after the QSM,
    # which they must not delay
    findings = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsmnode-findings")
    review_future = findings.submit(review_result, acquisition, result)
    findings.shutdown(wait=False)
    scale = swi_scale(np.asarray(result.swi), np.asarray(result.minip))
    yield "SWI", classic("SWI", magnitude_to_stored(result.swi, scale))
    yield "MINIP", classic("MINIP", magnitude_to_stored(result.minip, scale))
    yield "R2STAR", classic("R2STAR", r2star_to_stored(result.r2star_per_s))
    review = review_future.result()
    if on_review is not None:
        on_review(review)
    yield KIND_SR, [build_measurement_report(acquisition, result, review, qsm,
                                             software_version=software_version)]
    if parametric_map:
        yield KIND_PARAMETRIC_MAP, [build_parametric_map(acquisition, result, qsm,
                                                         software_version=software_version)]
    if summary_image:
        yield KIND_SUMMARY, list(build_summary_images(acquisition, result, review,
                                                      software_version=software_version, when=when))


def build_output_datasets(
    acquisition,
    result,
    *,
    parametric_map: bool = True,
    summary_image: bool = True,
    software_version: str = qsmnode.__version__,
) -> list[Dataset]:
    """Every output object for one reconstructed acquisition, in one list (the series of
    :func:`iter_output_series`, in its order)."""
    return [ds for _kind, series in iter_output_series(
        acquisition, result, parametric_map=parametric_map, summary_image=summary_image,
        software_version=software_version) for ds in series]


def contributing_equipment_hd(header: Dataset, software_version: str):
    """The Contributing Equipment items of :func:`contributing_equipment` as highdicom objects
    (for the highdicom-built Parametric Map and SR)."""
    from highdicom.base_content import ContributingEquipment
    from pydicom.sr.coding import Code

    scanner_kwargs = {}
    for keyword, arg in (("ManufacturerModelName", "manufacturer_model_name"),
                         ("DeviceSerialNumber", "device_serial_number"),
                         ("InstitutionName", "institution_name"),
                         ("StationName", "station_name")):
        if header.get(keyword):
            scanner_kwargs[arg] = str(header.get(keyword))
    return [
        ContributingEquipment(
            manufacturer=str(header.get("Manufacturer", "") or "UNKNOWN"),
            purpose_of_reference=Code("109101", "DCM", "Acquisition Equipment"),
            **scanner_kwargs,
        ),
        ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=Code("109102", "DCM", "Processing Equipment"),
            manufacturer_model_name="qsmnode QSM reconstruction",
            software_versions=str(software_version),
            contribution_description=(
                f"Quantitative susceptibility mapping by qsmnode {software_version}"),
        ),
    ]
