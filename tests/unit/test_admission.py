"""What the receiver admits (issue 13, items 3-5): every instance it would acknowledge is one the
loader reads back, and everything else is refused with a status and a reason, never an exception."""

from __future__ import annotations

import io
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from qsmnode.dicom import load
from qsmnode.node import upper_layer as ul
from qsmnode.node.admission import (STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES,
                                    Refusal, admit)
from qsmnode.node.instance_header import MAX_NESTING
from tests import malformed

CAP = 16 << 20  # a small max_instance_mb for the tests


def refusal(sent: malformed.Sent, max_bytes: int = CAP) -> Refusal | None:
    """The receiver's refusal of ``sent`` (None: it would be acknowledged)."""
    try:
        admit(sent.data, sent.sop_class_uid, sent.sop_instance_uid, sent.transfer_syntax, max_bytes=max_bytes)
    except Refusal as err:
        return err
    return None


def read_back(sent: malformed.Sent):
    """What the loader reads from the spool file the receiver would write for ``sent``: the
    Dataset and its stored pixels (raises where the loader fails)."""
    meta = ul.file_meta(sent.sop_class_uid, sent.sop_instance_uid, sent.transfer_syntax,
                        implementation_class_uid="1.2.3", implementation_version="T")
    ds = pydicom.dcmread(io.BytesIO(meta + sent.data), defer_size=load.DEFER_SIZE_BYTES)
    assert str(ds.SOPInstanceUID) == sent.sop_instance_uid
    return ds, load._stored_pixels(ds)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_sequences_nested_500_deep_are_refused_not_a_recursion_error(syntax):
    """Item 3: the header walk raised RecursionError, which closed the association without a status."""
    status = refusal(malformed.deeply_nested(500, syntax))
    assert status is not None and status.status == STATUS_CANNOT_UNDERSTAND
    assert f"nested more than {MAX_NESTING} deep" in status.reason


def test_nesting_up_to_the_bound_is_taken_and_read_back():
    sent = malformed.deeply_nested(MAX_NESTING - 1)
    assert refusal(sent) is None
    read_back(sent)


def test_little_endian_data_on_a_big_endian_context_is_refused():
    """Item 4a: the bytes are little endian, the stored file would say big endian."""
    status = refusal(malformed.little_endian_on_big_endian_context())
    assert status is not None and status.status == STATUS_CANNOT_UNDERSTAND
    assert "encoded in Explicit VR Little Endian" in status.reason


def test_native_pixel_data_on_an_rle_context_is_refused():
    """Item 4b: uncompressed pixel data where the context says RLE."""
    status = refusal(malformed.native_pixels_on_rle_context())
    assert status is not None and status.status == STATUS_DATASET_MISMATCH
    assert "native (uncompressed) pixel data" in status.reason


@pytest.mark.parametrize("name", sorted(malformed.IMPOSSIBLE_ATTRIBUTES))
def test_impossible_image_attributes_are_refused(name):
    """Item 4c: NumberOfFrames <= 0, SamplesPerPixel 0, BitsAllocated 1."""
    status = refusal(malformed.impossible_attributes(name))
    assert status is not None and status.status == STATUS_DATASET_MISMATCH
    assert "impossible image attributes" in status.reason


@pytest.mark.parametrize("make", [malformed.ct_data_set_under_mr_command,
                                  malformed.ct_class_mr_modality_under_mr_command])
def test_a_data_set_of_another_sop_class_than_the_command_is_refused(make):
    """Item 4d: a CT data set sent under an MR Image Storage command."""
    status = refusal(make())
    assert status is not None and status.status in (0x0122, STATUS_DATASET_MISMATCH)
    assert "CT" in status.reason or "1.2.840.10008.5.1.4.1.1.2" in status.reason


def test_an_enormous_compressed_image_is_refused():
    """Item 4e: a 65535 x 65535 image declared in a few bytes of RLE."""
    status = refusal(malformed.enormous_compressed())
    assert status is not None and status.status == STATUS_OUT_OF_RESOURCES
    assert "max_instance_mb" in status.reason


def test_a_deflate_bomb_is_refused_cheaply():
    """Item 5: 64 KiB inflating to 64 MiB took 2.5 s to take; beyond the cap it is refused after
    inflating no more than the cap."""
    bomb = malformed.deflate_bomb(64)
    assert len(bomb.data) < 128 << 10
    t0 = time.perf_counter()
    status = refusal(bomb, max_bytes=4 << 20)
    seconds = time.perf_counter() - t0
    assert status is not None and status.status == STATUS_OUT_OF_RESOURCES
    assert "inflates to more than" in status.reason and "max_instance_mb" in status.reason
    assert seconds < 0.2, f"refusing took {seconds:.2f} s"


def test_a_deflated_instance_under_the_cap_is_taken_and_read_back():
    sent = malformed.valid(malformed.DeflatedExplicitVRLittleEndian)
    assert refusal(sent) is None
    read_back(sent)


@pytest.mark.parametrize("syntax", [*malformed.NATIVE_SYNTAXES, malformed.RLELossless])
def test_valid_instances_are_taken_and_read_back(syntax):
    sent = malformed.valid(syntax)
    assert refusal(sent) is None
    ds, pixels = read_back(sent)
    assert pixels.shape == (1, ds.Rows, ds.Columns)
