"""Which received instances the node takes: the checks made before a C-STORE is acknowledged.

An acknowledged instance is one the node promises to process, so every check here stands for
something the loader (:mod:`qsmnode.dicom.load`, which reads the spool file with pydicom and
decodes its pixels) would otherwise trip over later, when the sender can no longer be told. The
checks read only the header the receiver's walk picked out (:mod:`qsmnode.node.instance_header`)
and never decode pixels. Each refusal is a :class:`Refusal`: a DICOM status and a reason that says
what was wrong and what the sender can do.

========  ======================================================================
0xA700    Out of Resources: larger than the node takes (``max_instance_mb``)
0x0122    SOP Class not supported: not an MR image (only MR / Enhanced MR are taken)
0xA900    Data Set does not match SOP Class: a required attribute is missing or
          impossible, the data set names another SOP class or instance than the
          command, or the pixel data do not match what the header declares
0xC000    Cannot understand: the data set cannot be walked (:mod:`qsmnode.node.instance_header`)
========  ======================================================================
"""

from __future__ import annotations

import re

from qsmnode.node.instance_header import EXPLICIT_VR_BE, DataSetTooLarge, InstanceHeader, MalformedDataset, read_header

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

MR_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}

#: Transfer syntaxes whose Pixel Data is native (not encapsulated).
NATIVE_TRANSFER_SYNTAXES = frozenset(("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99",
                                      EXPLICIT_VR_BE))

#: Default of ``max_instance_mb`` (see deploy/qsmnode.toml for why this size).
DEFAULT_MAX_INSTANCE_BYTES = 1024 << 20

_UID = re.compile(r"^[0-9.]{1,64}$")
_BITS_ALLOCATED = (8, 16, 32)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class Refusal(Exception):
    """An instance the receiver will not take: a DICOM status and a reason for the sender."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def admit(data: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, *,
          max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> InstanceHeader:
    """The header of a received data set (``data``, as sent in ``transfer_syntax``) that passes every
    check; else the :class:`Refusal` that says why. ``sop_class_uid``/``sop_instance_uid`` are the
    C-STORE command's; ``max_bytes`` bounds the decoded pixel data and a deflated data set inflated."""
    check_sop_class(InstanceHeader(), sop_class_uid)  # before any parsing: the cheapest refusal first
    try:
        header = read_header(data, transfer_syntax, max_inflated=max_bytes)
    except DataSetTooLarge as err:
        raise Refusal(STATUS_OUT_OF_RESOURCES, f"{err}, more than the node takes ({max_bytes >> 20} MiB, "
                      "max_instance_mb); send it uncompressed or in smaller instances") from None
    except MalformedDataset as err:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"corrupt data set: {err}; re-export the series") from None
    check_instance(header, sop_class_uid, sop_instance_uid, transfer_syntax, max_bytes=max_bytes)
    return header


def check_instance(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, *,
                   max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> None:
    """Raise :class:`Refusal` unless ``header`` describes a well-formed MR image that the loader
    reads back: ``sop_class_uid``/``sop_instance_uid`` are the C-STORE command's, ``max_bytes`` the
    largest decoded pixel data taken. No pixel decoding."""
    check_sop_class(header, sop_class_uid)
    check_identity(header, sop_class_uid, sop_instance_uid)
    check_image_pixel(header)
    check_pixel_data(header, transfer_syntax, max_bytes)


def check_sop_class(header: InstanceHeader, sop_class_uid: str) -> None:
    """The command's SOP class is an MR image storage class and the data set's Modality agrees."""
    if sop_class_uid not in MR_STORAGE_CLASSES:
        raise Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                      f"not an MR image (SOP class {sop_class_uid}); qsmnode takes MR Image Storage and "
                      "Enhanced MR Image Storage only: send the multi-echo GRE series")
    if header.modality not in (None, "MR"):
        raise Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                      f"Modality is {header.modality!r}, not 'MR'; qsmnode takes MR images only")


def check_identity(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The identifying UIDs are present, valid, and the data set names the same SOP class and
    instance as the C-STORE request."""
    uids = {"SOPClassUID": header.sop_class_uid, "SOPInstanceUID": header.sop_instance_uid,
            "SeriesInstanceUID": header.series_instance_uid, "StudyInstanceUID": header.study_instance_uid}
    _require(uids)
    invalid = [name for name, uid in uids.items() if not _UID.match(uid)]
    if invalid:
        raise Refusal(STATUS_DATASET_MISMATCH, f"{', '.join(invalid)} not a valid UID (digits and dots, at most 64); "
                      "the sender's export is broken: re-export the series")
    if header.sop_class_uid != sop_class_uid:
        raise Refusal(STATUS_DATASET_MISMATCH,
                      f"the data set is of SOP class {header.sop_class_uid}, but the C-STORE request says "
                      f"{sop_class_uid}; send it under its own SOP class")
    if header.sop_instance_uid != sop_instance_uid:
        raise Refusal(STATUS_DATASET_MISMATCH, f"SOPInstanceUID in the data set ({header.sop_instance_uid}) differs "
                      f"from the C-STORE request's ({sop_instance_uid})")


def check_image_pixel(header: InstanceHeader) -> None:
    """The Image Pixel attributes (Type 1, PS3.3 C.7.6.3) are there and describe a monochrome MR image
    the loader decodes (C.8.3.1: one sample per pixel, MONOCHROME1/2; 8, 16 or 32 bits allocated;
    at least one frame)."""
    _require({"Rows": header.rows, "Columns": header.columns, "BitsAllocated": header.bits_allocated,
              "BitsStored": header.bits_stored, "PixelRepresentation": header.pixel_representation,
              "SamplesPerPixel": header.samples_per_pixel,
              "PhotometricInterpretation": header.photometric_interpretation, "PixelData": header.pixel_data_length})
    problems = []
    if not header.rows or not header.columns:
        problems.append(f"{header.rows} rows x {header.columns} columns")
    if header.pixel_data_length == 0:
        problems.append("empty PixelData")
    if header.samples_per_pixel != 1:
        problems.append(f"SamplesPerPixel {header.samples_per_pixel} (an MR image has 1)")
    if header.photometric_interpretation not in _MONOCHROME:
        problems.append(f"PhotometricInterpretation {header.photometric_interpretation!r} (an MR image is "
                        "MONOCHROME1 or MONOCHROME2)")
    if header.bits_allocated not in _BITS_ALLOCATED:
        problems.append(f"BitsAllocated {header.bits_allocated} (the node reads 8, 16 or 32)")
    elif not 1 <= header.bits_stored <= header.bits_allocated:
        problems.append(f"BitsStored {header.bits_stored} with BitsAllocated {header.bits_allocated}")
    if header.pixel_representation not in (0, 1):
        problems.append(f"PixelRepresentation {header.pixel_representation} (0 or 1)")
    if frame_count(header) < 1:
        problems.append(f"NumberOfFrames {header.number_of_frames}")
    if problems:
        raise Refusal(STATUS_DATASET_MISMATCH, f"impossible image attributes: {'; '.join(problems)}; "
                      "re-export the series from the scanner")


def check_pixel_data(header: InstanceHeader, transfer_syntax: str, max_bytes: int) -> None:
    """The pixel data is what the transfer syntax says (native, or encapsulated with a fragment per
    frame at least), holds the declared image, and the image is not larger than ``max_bytes``."""
    frames = frame_count(header)
    needed = header.rows * header.columns * (header.samples_per_pixel or 1) * frames * header.bits_allocated // 8
    if needed > max_bytes:
        raise Refusal(STATUS_OUT_OF_RESOURCES,
                      f"the image is declared {header.rows} x {header.columns} x {frames} frame(s) x "
                      f"{header.bits_allocated} bits = {needed >> 20} MiB, more than the node takes "
                      f"({max_bytes >> 20} MiB, max_instance_mb); split the series into smaller instances")
    if transfer_syntax not in NATIVE_TRANSFER_SYNTAXES:
        if header.pixel_data_length != -1:
            raise Refusal(STATUS_DATASET_MISMATCH,
                          f"native (uncompressed) pixel data sent with the compressed transfer syntax "
                          f"{transfer_syntax}; send it with the transfer syntax its pixel data are in")
        if header.pixel_fragments < frames:
            raise Refusal(STATUS_DATASET_MISMATCH,
                          f"encapsulated pixel data holds {header.pixel_fragments} fragment(s) for {frames} "
                          "frame(s); send the file again")
        return
    if header.pixel_data_length == -1:
        raise Refusal(STATUS_DATASET_MISMATCH,
                      f"encapsulated (compressed) pixel data sent with the uncompressed transfer syntax "
                      f"{transfer_syntax}; send it with the transfer syntax its pixel data are in")
    if header.pixel_data_length < needed:
        raise Refusal(STATUS_DATASET_MISMATCH,
                      f"truncated pixel data: {header.pixel_data_length} bytes, but {header.rows} x "
                      f"{header.columns} x {frames} frame(s) x {header.bits_allocated} bits needs {needed}; "
                      "send the file again")


def frame_count(header: InstanceHeader) -> int:
    """NumberOfFrames as a number (1 when absent); a value that is not a whole number is refused."""
    text = (header.number_of_frames or "").strip()
    if not text:
        return 1
    try:
        return int(text)
    except ValueError:
        raise Refusal(STATUS_DATASET_MISMATCH, f"NumberOfFrames {text!r} is not a whole number; "
                      "re-export the series") from None


def _require(attributes: dict) -> None:
    missing = [name for name, value in attributes.items() if value is None or value == ""]
    if missing:
        raise Refusal(STATUS_DATASET_MISMATCH, f"missing {', '.join(missing)}: the instance is not a complete "
                      "MR image; re-export it from the scanner")
