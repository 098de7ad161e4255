"""Malformed MR instances, built in memory, for the receiver's refusal and fuzz tests.

Every builder returns a :class:`Sent`: what goes in the C-STORE request (SOP class and instance
UID, presentation context transfer syntax) and the data set bytes exactly as put on the wire (no
File Meta). Each instance carries the patient identifiers in :data:`PATIENT`, so that a test can
look for them in every log the node writes.

Classes of damage (issue 13): sequences nested too deep, the wrong byte order for the context,
native pixel data on a compressed context, impossible image attributes, a data set of another
SOP class than the command's, enormous compressed images, deflate bombs; and for the fuzz test
truncations, wrong VRs, bad lengths and garbage.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid)

#: Planted patient identifiers: none may appear in clear in any log of the node.
PATIENT = {"PatientName": "ZZPLANTED^ALICE", "PatientID": "PID-ZZ-4711", "PatientBirthDate": "19120623"}
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)


@dataclass
class Sent:
    """One C-STORE: the command's SOP class and instance UID, the context's transfer syntax, the bytes."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes


def mr_dataset(rows: int = 8, columns: int = 8, *, series_uid: str | None = None) -> Dataset:
    """A small, complete MR Image Storage data set with the planted patient identifiers."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", "fuzz", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4000).tobytes()
    return ds


def encode(ds: Dataset, syntax: str) -> bytes:
    """The data set's bytes as a sender puts them on the wire in ``syntax`` (RLE: compressed here)."""
    if syntax == RLELossless:
        ds = _copy(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, generate_instance_uid=False)
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    return deflate(raw) if syntax == DeflatedExplicitVRLittleEndian else raw


def deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


def sent(kind: str, ds: Dataset, syntax: str, *, data: bytes | None = None, sop_class_uid: str | None = None) -> Sent:
    return Sent(kind, sop_class_uid or str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax),
                encode(ds, syntax) if data is None else data)


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    out.update(ds)
    return out


# ------------------------------------------------------------------------------ the classes
def valid(syntax: str = ExplicitVRLittleEndian) -> Sent:
    """A complete instance (the control: acknowledged)."""
    return sent("valid", mr_dataset(), syntax)


def deeply_nested(depth: int = 500, syntax: str = ExplicitVRLittleEndian) -> Sent:
    """Sequences of undefined length nested ``depth`` deep, in a private element before the pixel data."""
    ds = mr_dataset()
    raw = encode(ds, syntax)
    at = raw.index(b"\xe0\x7f\x10\x00")  # the Pixel Data element: the nest goes right before it
    implicit = syntax == ImplicitVRLittleEndian
    head = (struct.pack("<HHL", 0x0029, 0x1010, 0xFFFFFFFF) if implicit
            else struct.pack("<HH2sHL", 0x0029, 0x1010, b"SQ", 0, 0xFFFFFFFF))
    item, item_end = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    creator = (struct.pack("<HHL", 0x0029, 0x0010, 4) if implicit else struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 4))
    nest = (head + item) * depth + (item_end + sequence_end) * depth
    return sent(f"nested-{depth}", ds, syntax, data=raw[:at] + creator + b"FUZZ" + nest + raw[at:])


def little_endian_on_big_endian_context() -> Sent:
    """Explicit VR Little Endian bytes sent on an Explicit VR Big Endian presentation context."""
    ds = mr_dataset()
    return sent("le-on-be", ds, ExplicitVRBigEndian, data=encode(ds, ExplicitVRLittleEndian))


def native_pixels_on_rle_context() -> Sent:
    """Uncompressed pixel data sent on an RLE Lossless context."""
    ds = mr_dataset()
    return sent("native-on-rle", ds, RLELossless, data=encode(ds, ExplicitVRLittleEndian))


IMPOSSIBLE_ATTRIBUTES = {"frames-0": {"NumberOfFrames": 0}, "frames-negative": {"NumberOfFrames": -3},
                         "samples-0": {"SamplesPerPixel": 0}, "bits-1": {"BitsAllocated": 1, "BitsStored": 1,
                                                                         "HighBit": 0}}


def impossible_attributes(name: str, syntax: str = ExplicitVRLittleEndian) -> Sent:
    """An MR image with one of :data:`IMPOSSIBLE_ATTRIBUTES` (pixel data long enough for any of them)."""
    ds = mr_dataset()
    for keyword, value in IMPOSSIBLE_ATTRIBUTES[name].items():
        setattr(ds, keyword, value)
    return sent(name, ds, syntax)


def ct_data_set_under_mr_command() -> Sent:
    """A CT data set (SOP class and Modality) sent with an MR Image Storage command."""
    ds = mr_dataset()
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    return sent("ct-under-mr", ds, ExplicitVRLittleEndian, sop_class_uid=MRImageStorage)


def ct_class_mr_modality_under_mr_command() -> Sent:
    """A data set of SOP class CT but Modality MR, sent with an MR command: the class differs."""
    ds = mr_dataset()
    ds.SOPClassUID = CTImageStorage
    return sent("ct-class-under-mr", ds, ExplicitVRLittleEndian, sop_class_uid=MRImageStorage)


def enormous_compressed(rows: int = 65535, columns: int = 65535) -> Sent:
    """A ``rows`` x ``columns`` RLE image whose one fragment is a few bytes."""
    ds = mr_dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    return sent(f"enormous-{rows}x{columns}", ds, RLELossless, data=encode(ds, ExplicitVRLittleEndian))


def deflate_bomb(inflated_mib: int = 64) -> Sent:
    """A complete MR image whose pixel data are ``inflated_mib`` MiB of zeros, deflated (~1000:1)."""
    ds = mr_dataset()
    side = int((inflated_mib * (1 << 20) // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    return sent(f"deflate-bomb-{inflated_mib}MiB", ds, DeflatedExplicitVRLittleEndian)


#: Attributes whose garbage value pydicom quotes when it reads it (a warning; for InstanceNumber
#: also the error message of the int() conversion).
QUOTED_WHEN_READ = {"EchoNumbers": 0x00180086, "InstanceNumber": 0x00200013}


def identifiers_in_a_value(keyword: str = "EchoNumbers") -> Sent:
    """A well-formed MR image whose IS value ``keyword`` is garbage holding a copy of the patient
    module's bytes (name, ID): pydicom warns when it reads it, quoting the value."""
    ds = mr_dataset()
    patient = Dataset()
    for name, value in PATIENT.items():
        setattr(patient, name, value)
    value = encode(patient, ExplicitVRLittleEndian)
    value += b" " * (len(value) % 2)
    tag = Tag(QUOTED_WHEN_READ[keyword])
    ds[tag] = RawDataElement(tag, "IS", len(value), value, 0, False, True)
    return sent(f"identifiers-in-{keyword}", ds, ExplicitVRLittleEndian)


# ------------------------------------------------------------------------------ fuzz mutations
def truncated(rng: random.Random, syntax: str) -> Sent:
    """A valid instance cut anywhere."""
    base = valid(syntax)
    base.data, base.kind = base.data[:rng.randrange(0, len(base.data))], "truncated"
    return base


def wrong_vr(rng: random.Random) -> Sent:
    """One element's explicit VR replaced by another (or by two arbitrary bytes)."""
    base = valid(ExplicitVRLittleEndian)
    offsets = _explicit_element_offsets(base.data)
    at = rng.choice(offsets)
    vr = rng.choice([b"US", b"UL", b"LO", b"SQ", b"OB", b"UN", b"DS", b"FD", b"AT", b"\x00\x00",
                     bytes(rng.randrange(256) for _ in range(2))])
    base.data, base.kind = base.data[:at + 4] + vr + base.data[at + 6:], "wrong-vr"
    return base


def bad_length(rng: random.Random, syntax: str) -> Sent:
    """One element's length field replaced (off by a little, odd, huge, undefined)."""
    base = valid(syntax)
    if syntax == ExplicitVRLittleEndian:
        at = rng.choice(_explicit_element_offsets(base.data))
        vr = base.data[at + 4:at + 6]
        delta = rng.choice([-7, -2, -1, 1, 2, 3, 64, 480, 0x7FFF])
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            (length,) = struct.unpack_from("<L", base.data, at + 8)
            new = rng.choice([0xFFFFFFFF, 0xFFFFFFFE, max(0, length + delta) & 0xFFFFFFFF])
            patch, start = struct.pack("<L", new), at + 8
        else:
            (length,) = struct.unpack_from("<H", base.data, at + 6)
            patch, start = struct.pack("<H", max(0, length + delta) & 0xFFFF), at + 6
    else:  # implicit: a 32-bit length after every tag
        at = rng.choice(_implicit_element_offsets(base.data))
        (length,) = struct.unpack_from("<L", base.data, at + 4)
        new = rng.choice([0xFFFFFFFF, length + 1, length + 2, length + 480, max(0, length - 2), 0x7FFFFFFF])
        patch, start = struct.pack("<L", new & 0xFFFFFFFF), at + 4
    base.data, base.kind = base.data[:start] + patch + base.data[start + len(patch):], "bad-length"
    return base


def garbage(rng: random.Random) -> Sent:
    """Random bytes, or a valid instance with a run of random bytes written over part of it."""
    base = valid(rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if rng.random() < 0.3:
        base.data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
    else:
        start = rng.randrange(len(base.data))
        run = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        base.data = base.data[:start] + run + base.data[start + len(run):]
    base.kind = "garbage"
    return base


def mixed_attributes(rng: random.Random) -> Sent:
    """A valid instance with image attributes set to arbitrary (often impossible) values."""
    ds = mr_dataset()
    keyword = rng.choice(["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PixelRepresentation",
                          "NumberOfFrames", "PhotometricInterpretation", "Modality", "SOPClassUID"])
    value = rng.choice({"PhotometricInterpretation": ["RGB", "MONOCHROME1", "PALETTE COLOR", ""],
                        "Modality": ["CT", "MR", "", "OT"],
                        "SOPClassUID": [CTImageStorage, "1.2.3", "", MRImageStorage + ".9"]}.get(
        keyword, [0, 1, 2, 3, 7, 8, 12, 16, 17, 32, 64, 255, 65535]))
    setattr(ds, keyword, value)
    return sent(f"attr-{keyword}", ds, rng.choice(NATIVE_SYNTAXES[:3]), sop_class_uid=MRImageStorage)


def _explicit_element_offsets(data: bytes) -> list[int]:
    """Offsets of the top-level elements of an explicit VR little-endian data set."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        out.append(pos)
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return out


def _implicit_element_offsets(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 8 <= len(data):
        out.append(pos)
        pos += 8 + struct.unpack_from("<L", data, pos + 4)[0]
    return out
