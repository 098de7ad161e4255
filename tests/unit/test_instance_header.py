"""The receiver's fast header walk agrees with pydicom on real and simulated files in every accepted
transfer syntax, and never lets a truncated data set through."""

from __future__ import annotations

import dataclasses
import io
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGLSLossless, RLELossless)

from qsmnode.node.instance_header import MalformedDataset, header_from_dataset, read_header
from qsmnode.node.scp import Refusal, check_instance

ROOT = Path(__file__).resolve().parents[2]
REALDATA = ROOT.parent / "shared" / "realdata"


def _real_files() -> list[Path]:
    """One file per real-data folder (classic and enhanced, three vendors' exports) and the samples."""
    files = []
    for folder in sorted(REALDATA.glob("*/*")) if REALDATA.is_dir() else []:
        found = sorted(p for p in folder.rglob("*.dcm"))
        files += found[:1]
    for sample in sorted((ROOT / "sample_dicom").glob("*/dicom/*")):
        files += sorted(sample.iterdir())[:1]
    return files


FILES = _real_files()


def _encode(ds: pydicom.Dataset, syntax) -> tuple[bytes, str]:
    """The data set bytes (no File Meta) as a sender puts them on the wire in ``syntax``."""
    ds = pydicom.dcmread(io.BytesIO(_file_bytes(ds)))  # a private copy
    if syntax in (RLELossless, JPEGLSLossless):
        ds.compress(syntax, generate_instance_uid=False)
    elif ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = packer.compress(raw) + packer.flush()
    return raw, str(syntax)


def _file_bytes(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.skipif(not FILES, reason="no real or sample DICOM files found")
@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    ExplicitVRBigEndian, RLELossless])
def test_walk_agrees_with_pydicom(path, syntax):
    ds = pydicom.dcmread(path)
    if syntax == RLELossless and ds.get("BitsAllocated") not in (8, 16):
        pytest.skip("RLE needs 8 or 16 bits")
    data, ts = _encode(ds, syntax)
    header = read_header(data, ts)
    expected = header_from_dataset(ds)
    if syntax == RLELossless:
        expected.pixel_data_length = -1
        expected.pixel_fragments = int(ds.get("NumberOfFrames", 1))  # RLE: one fragment per frame
    assert dataclasses.replace(header, pixel_data_offset=None) == expected
    check_instance(header, header.sop_class_uid, header.sop_instance_uid, ts)  # a whole MR image passes
    if syntax == DeflatedExplicitVRLittleEndian:
        assert header.pixel_data_offset is None  # not an offset into the bytes as sent
    else:  # the bytes up to its element header are all that a header reader needs
        at = header.pixel_data_offset
        assert data[at:at + 4] == (b"\x7f\xe0\x00\x10" if syntax == ExplicitVRBigEndian else b"\xe0\x7f\x10\x00")
        assert _header_of(data[:at + 12], ts) == _header_of(data, ts)


def _header_of(data: bytes, ts: str) -> pydicom.Dataset:
    """pydicom's reading (up to the pixel data) of a data set sent in ``ts``."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return pydicom.dcmread(io.BytesIO(out.getvalue() + data), stop_before_pixels=True)


@pytest.mark.skipif(not FILES, reason="no real or sample DICOM files found")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
def test_no_truncation_passes(syntax):
    """Cut anywhere before the end of the pixel data: refused, never accepted as an image."""
    enhanced = [p for p in FILES if "enhanced" in str(p)] or FILES
    ds = pydicom.dcmread(enhanced[0])  # nested sequences, many frames
    if syntax == JPEGLSLossless and ds.BitsAllocated != 16:
        pytest.skip("JPEG-LS sample needs 16 bits")
    data, ts = _encode(ds, syntax)
    pixel_end = len(data)
    while data[pixel_end - 8:pixel_end - 4] != b"\xfe\xff\xdd\xe0" and syntax == JPEGLSLossless:
        pixel_end -= 1  # encapsulated: the sequence delimiter closes the pixel data
    for cut in range(1, pixel_end, max(1, pixel_end // 997)):
        try:
            header = read_header(data[:cut], ts)
            check_instance(header, ds.SOPClassUID, ds.SOPInstanceUID, ts)
        except (MalformedDataset, Refusal):
            continue
        pytest.fail(f"a data set cut at {cut} of {len(data)} bytes was accepted")


def test_misplaced_item_and_stray_bytes_are_malformed():
    with pytest.raises(MalformedDataset, match="outside a sequence"):
        read_header(b"\xfe\xff\x00\xe0\x00\x00\x00\x00", str(ImplicitVRLittleEndian))
    with pytest.raises(MalformedDataset, match="stray"):
        read_header(b"\x08\x00\x60\x00\x02\x00\x00\x00MR\x01\x02", str(ImplicitVRLittleEndian))
    with pytest.raises(MalformedDataset, match="inflate"):
        read_header(b"not deflated at all", str(DeflatedExplicitVRLittleEndian))
