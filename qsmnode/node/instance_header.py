"""What the receiver must know of an instance before acknowledging it, read fast from its encoded bytes.

:func:`read_header` walks a received data set without building a pydicom Dataset: it checks that
every element, sequence, item and pixel-data fragment ends inside the data (a truncated or
garbled stream fails here), that the structure is one pydicom reads back the same way later, and
picks out the few attributes the receiver checks and indexes. At ~150 elements per scanner image
that is several times cheaper than ``pydicom.dcmread``, which matters at 1,000 instances/s.
Every accepted transfer syntax is walked in its own encoding (implicit or explicit VR, little or
big endian, deflated, encapsulated pixel data).

What the walk refuses (:class:`MalformedDataset`), beyond truncation:

* elements out of ascending tag order, or repeated (PS3.5 §7.1): a reader keeps one of two copies;
  this also stops a data set padded with millions of empty elements from costing seconds;
* an explicit VR that is not a DICOM VR (a data set in another encoding than the one announced);
* File Meta or command elements (groups 0000-0007) in the data set: a reader would take a
  Transfer Syntax UID found there for the stored file's own;
* sequences nested more than :data:`MAX_NESTING` deep (readers recurse once per level);
* a deflated data set that inflates to more than the caller's limit (:class:`DataSetTooLarge`);
  it is inflated with that bound, so refusing a "zip bomb" costs at most the limit.

Encoding rules: PS3.5 §7.1 (element headers), §7.5 (sequences and items, defined or undefined
length), §6.2.2 (UN with undefined length holds Implicit VR Little Endian), §A.4 (encapsulated
pixel data: a Basic Offset Table item, then one item per fragment, then a sequence delimiter).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

#: Deepest nesting of sequences taken. Scanner MR images nest 4 deep at most (Enhanced MR: per-frame
#: functional groups > a functional group > a code sequence); pydicom reads a sequence with a
#: handful of recursive calls per level, so 32 levels keep far from Python's recursion limit.
MAX_NESTING = 32

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))
_VRS = _LONG_VRS | frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
                              b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"SV", b"TM", b"UI", b"UL", b"US",
                              b"UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
_FIRST_DATA_SET_GROUP = 0x0008

# attribute -> (field of InstanceHeader, the VR it must have when the encoding names one)
_TEXT = {0x00080016: ("sop_class_uid", b"UI"), 0x00080018: ("sop_instance_uid", b"UI"),
         0x0020000E: ("series_instance_uid", b"UI"), 0x0020000D: ("study_instance_uid", b"UI"),
         0x00080060: ("modality", b"CS"), 0x00280008: ("number_of_frames", b"IS"),
         0x00280004: ("photometric_interpretation", b"CS")}
_US = {0x00280010: "rows", 0x00280011: "columns", 0x00280100: "bits_allocated", 0x00280002: "samples_per_pixel",
       0x00280101: "bits_stored", 0x00280103: "pixel_representation"}


class MalformedDataset(ValueError):
    """The encoded data set cannot be walked: an element runs past the end, or an item is misplaced."""


class DataSetTooLarge(MalformedDataset):
    """A deflated data set inflates to more than the receiver takes."""


@dataclass
class InstanceHeader:
    """The attributes the receiver checks, as read from the data set (None when absent).

    ``pixel_data_length``: bytes of native Pixel Data, ``-1`` for encapsulated (compressed) pixel data.
    ``pixel_fragments``: encapsulated pixel data: fragment items after the Basic Offset Table.
    ``pixel_data_offset``: where the top-level Pixel Data element starts in the encoded data set
    (None when absent, or when the data set was not walked as sent: deflated).
    """

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    modality: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    pixel_representation: int | None = None
    samples_per_pixel: int | None = None
    photometric_interpretation: str | None = None
    number_of_frames: str | None = None
    pixel_data_length: int | None = None
    pixel_fragments: int | None = None
    pixel_data_offset: int | None = None


def read_header(data: bytes | memoryview, transfer_syntax: str, *, max_inflated: int | None = None) -> InstanceHeader:
    """Walk an encoded data set (no File Meta) in ``transfer_syntax``; raise :class:`MalformedDataset`.

    ``max_inflated``: most bytes a deflated data set may inflate to (:class:`DataSetTooLarge` beyond).
    """
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        data = inflate(data, max_inflated)
    try:
        header = _walk_data_set(data, transfer_syntax)
    except MalformedDataset as err:
        raise MalformedDataset(f"{err}{_misencoding_hint(data, transfer_syntax)}") from None
    if header.sop_instance_uid is None:
        hint = _misencoding_hint(data, transfer_syntax)
        if hint:
            raise MalformedDataset(f"no SOPInstanceUID found{hint}")
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        header.pixel_data_offset = None  # an offset into the inflated data, not into what was sent
    return header


def inflate(data: bytes | memoryview, limit: int | None) -> bytes:
    """A deflated data set's bytes (raw deflate, PS3.5 §A.5), refused beyond ``limit`` bytes
    without inflating more than that."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, 0 if limit is None else limit + 1)
    except zlib.error as err:
        raise MalformedDataset(f"the deflated data set does not inflate ({err})") from None
    if limit is not None and (len(out) > limit or inflater.unconsumed_tail):
        raise DataSetTooLarge(f"the deflated data set inflates to more than {limit} bytes")
    if not inflater.eof:
        raise MalformedDataset("the deflated data set is cut short (its deflate stream does not end)")
    return out


def header_from_dataset(ds) -> InstanceHeader:
    """The same attributes from a pydicom Dataset (files read back from the spool)."""
    pixel = ds.get("PixelData")
    frames = ds.get("NumberOfFrames")
    encapsulated = pixel is not None and ds["PixelData"].is_undefined_length
    fragments = None
    if encapsulated:
        from pydicom.encaps import generate_fragments

        fragments = sum(1 for _ in generate_fragments(pixel))
    return InstanceHeader(
        sop_class_uid=_str_or_none(ds.get("SOPClassUID")), sop_instance_uid=_str_or_none(ds.get("SOPInstanceUID")),
        series_instance_uid=_str_or_none(ds.get("SeriesInstanceUID")),
        study_instance_uid=_str_or_none(ds.get("StudyInstanceUID")), modality=_str_or_none(ds.get("Modality")),
        rows=ds.get("Rows"), columns=ds.get("Columns"), bits_allocated=ds.get("BitsAllocated"),
        bits_stored=ds.get("BitsStored"), pixel_representation=ds.get("PixelRepresentation"),
        samples_per_pixel=ds.get("SamplesPerPixel"),
        photometric_interpretation=_str_or_none(ds.get("PhotometricInterpretation")),
        number_of_frames=None if frames is None else str(frames),
        pixel_data_length=None if pixel is None else (-1 if encapsulated else len(pixel)),
        pixel_fragments=None if not encapsulated else max(0, fragments - 1))


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def _walk_data_set(data: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    header = InstanceHeader()
    view = memoryview(data)
    _Walker(view, big_endian=transfer_syntax == EXPLICIT_VR_BE, header=header).data_set(
        0, len(view), implicit=transfer_syntax == IMPLICIT_VR_LE, depth=0)
    return header


def _misencoding_hint(data: bytes | memoryview, transfer_syntax: str) -> str:
    """When a data set that fails to walk in ``transfer_syntax`` walks in another native encoding,
    the words that say so (checked only on the refusal path); else ""."""
    names = {IMPLICIT_VR_LE: "Implicit VR Little Endian", EXPLICIT_VR_LE: "Explicit VR Little Endian",
             EXPLICIT_VR_BE: "Explicit VR Big Endian"}
    for other, name in names.items():
        if other == transfer_syntax:
            continue
        try:
            if _walk_data_set(data, other).sop_instance_uid:
                return (f"; the data set is encoded in {name}, not in the transfer syntax it was sent with "
                        f"({transfer_syntax}): send it with the transfer syntax its bytes are in")
        except MalformedDataset:
            continue
    return ""


class _Walker:
    """One walk over an encoded data set (see the module docstring); fills ``header`` from the top level."""

    def __init__(self, view: memoryview, *, big_endian: bool, header: InstanceHeader):
        order = ">" if big_endian else "<"
        self.view = view
        self.header = header
        self.tag_length32 = struct.Struct(order + "HHL")
        self.tag_vr_length16 = struct.Struct(order + "HH2sH")
        self.length32 = struct.Struct(order + "L")
        self.us = struct.Struct(order + "H")

    def data_set(self, pos: int, end: int, *, implicit: bool, depth: int, until_item_end: bool = False) -> int:
        """Walk data elements from ``pos`` to ``end``. Returns the position after the last element,
        or after the item delimiter when ``until_item_end``."""
        view, previous = self.view, -1
        while pos < end:
            if end - pos < 8:
                raise MalformedDataset(f"{end - pos} stray byte(s) at offset {pos}")
            group, element, length = self.tag_length32.unpack_from(view, pos)
            tag, vr, value_at = group << 16 | element, None, pos + 8
            if tag == _ITEM_END and until_item_end:
                return pos + 8
            if group == 0xFFFE:
                raise MalformedDataset(f"item tag ({group:04X},{element:04X}) outside a sequence at offset {pos}")
            if not implicit:
                _, _, vr, length = self.tag_vr_length16.unpack_from(view, pos)
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise MalformedDataset(f"element header cut at offset {pos}")
                    length, value_at = self.length32.unpack_from(view, pos + 8)[0], pos + 12
                elif vr not in _VRS:
                    raise MalformedDataset(f"element ({group:04X},{element:04X}) at offset {pos} has VR {bytes(vr)!r}, "
                                           "which is not a DICOM VR")
            self._check_order(tag, previous, depth, pos)
            previous = tag
            if depth == 0 and tag == PIXEL_DATA:
                self.header.pixel_data_offset = pos
            if length == _UNDEFINED:
                pos = self._undefined_length_value(tag, vr, value_at, end, implicit or vr == b"UN", depth)
                continue
            next_pos = value_at + length
            if next_pos > end:
                raise MalformedDataset(f"element ({group:04X},{element:04X}) of {length} bytes runs past the end "
                                       f"of {'its item' if depth else 'the data set'} ({end} bytes): truncated")
            if vr == b"SQ":
                self.items(value_at, next_pos, implicit=implicit, depth=depth + 1, delimited=False)
            if depth == 0:
                self._pick(tag, vr, value_at, length)
            pos = next_pos
        if until_item_end:
            raise MalformedDataset("an item of undefined length has no delimiter: the data set is truncated")
        return pos

    @staticmethod
    def _check_order(tag: int, previous: int, depth: int, pos: int) -> None:
        if tag <= previous:
            raise MalformedDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos} comes after "
                                   f"({previous >> 16:04X},{previous & 0xFFFF:04X}): elements must be in ascending "
                                   "order, each once (PS3.5 §7.1)")
        if depth == 0 and tag >> 16 < _FIRST_DATA_SET_GROUP:
            raise MalformedDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of group {tag >> 16:04X} in the "
                                   "data set: File Meta and command elements do not belong there")

    def _undefined_length_value(self, tag: int, vr, pos: int, end: int, implicit: bool, depth: int) -> int:
        """Walk a value of undefined length: encapsulated pixel data, else a sequence."""
        if tag == PIXEL_DATA or vr in (b"OB", b"OW"):
            pos, fragments = self.fragments(pos, end)
            if depth == 0 and tag == PIXEL_DATA:
                self.header.pixel_data_length, self.header.pixel_fragments = -1, fragments
            return pos
        return self.items(pos, end, implicit=implicit, depth=depth + 1, delimited=True)

    def items(self, pos: int, end: int, *, implicit: bool, depth: int, delimited: bool) -> int:
        """Walk the items of a sequence: up to its delimiter (``delimited``), else exactly to ``end``."""
        if depth > MAX_NESTING:
            raise MalformedDataset(f"sequences nested more than {MAX_NESTING} deep; no MR image nests that deep")
        while delimited or pos < end:
            if end - pos < 8:
                raise MalformedDataset("a sequence has no delimiter or runs past its end: the data set is truncated")
            group, element, length = self.tag_length32.unpack_from(self.view, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_END and delimited:
                return pos
            if tag != _ITEM:
                raise MalformedDataset(f"({group:04X},{element:04X}) where an item was expected at offset {pos - 8}")
            if length == _UNDEFINED:
                pos = self.data_set(pos, end, implicit=implicit, depth=depth, until_item_end=True)
            elif pos + length > end:
                raise MalformedDataset(f"an item of {length} bytes runs past the end of its sequence: truncated")
            else:
                self.data_set(pos, pos + length, implicit=implicit, depth=depth)
                pos += length
        return pos

    def fragments(self, pos: int, end: int) -> tuple[int, int]:
        """Walk encapsulated pixel data (PS3.5 §A.4): the Basic Offset Table item, fragment items of
        defined even length, the sequence delimiter. Returns (position after it, fragments)."""
        count = -1  # the first item is the Basic Offset Table
        while True:
            if end - pos < 8:
                raise MalformedDataset("encapsulated pixel data has no sequence delimiter: the data set is truncated")
            group, element, length = self.tag_length32.unpack_from(self.view, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_END:
                if count < 0:
                    raise MalformedDataset("encapsulated pixel data has no Basic Offset Table item (PS3.5 §A.4)")
                return pos, count
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDataset(f"({group:04X},{element:04X}) where a pixel-data fragment item of defined "
                                       f"length was expected at offset {pos - 8} (PS3.5 §A.4)")
            if pos + length > end:
                raise MalformedDataset(f"a pixel-data fragment of {length} bytes runs past the end: truncated")
            pos += length
            count += 1

    def _pick(self, tag: int, vr, at: int, length: int) -> None:
        """Record a top-level attribute the receiver checks; its VR (when the encoding names one) and
        size must be the ones a reader interprets the same way."""
        if tag == PIXEL_DATA:
            self.header.pixel_data_length = length
            return
        if tag in _TEXT:
            name, expected = _TEXT[tag]
            self._expect_vr(tag, vr, expected)
            value = bytes(self.view[at:at + length]).rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")
            setattr(self.header, name, value)
        elif tag in _US:
            self._expect_vr(tag, vr, b"US")
            if length != 2:
                raise MalformedDataset(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) holds {length} bytes where one "
                                       "US value (2 bytes) belongs")
            setattr(self.header, _US[tag], self.us.unpack_from(self.view, at)[0])

    @staticmethod
    def _expect_vr(tag: int, vr, expected: bytes) -> None:
        if vr is not None and vr != expected:
            raise MalformedDataset(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR {bytes(vr)!r}, "
                                   f"not {expected.decode()}")
