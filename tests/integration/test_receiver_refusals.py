"""Robust at the door (issue 13, items 3-6), against a real ``qsmnode serve``: each malformed instance
gets a DIMSE failure status with a reason and an audit "rejected" line, the association goes on
serving, and no library message writes the patient's identifiers into the node's log."""

from __future__ import annotations

import pytest

from conftest import require_tools
from node_helpers import ECHOSCU_BIN, NodeProcess, wait_until
from raw_scu import RawStoreSCU
from tests import malformed

pytestmark = pytest.mark.integration

CASES = {
    "nested-500": (lambda: malformed.deeply_nested(500), 0xC000, "nested more than"),
    "le-on-be": (malformed.little_endian_on_big_endian_context, 0xC000, "Little Endian"),
    "native-on-rle": (malformed.native_pixels_on_rle_context, 0xA900, "native"),
    "frames-0": (lambda: malformed.impossible_attributes("frames-0"), 0xA900, "NumberOfFrames"),
    "frames-negative": (lambda: malformed.impossible_attributes("frames-negative"), 0xA900, "NumberOfFrames"),
    "samples-0": (lambda: malformed.impossible_attributes("samples-0"), 0xA900, "SamplesPerPixel"),
    "bits-1": (lambda: malformed.impossible_attributes("bits-1"), 0xA900, "BitsAllocated"),
    "ct-under-mr": (malformed.ct_class_mr_modality_under_mr_command, 0xA900, "SOP class"),
    "enormous": (malformed.enormous_compressed, 0xA700, "max_instance_mb"),
    "deflate-bomb": (lambda: malformed.deflate_bomb(64), 0xA700, "inflates to more than"),
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require_tools(ECHOSCU_BIN)
    from node_helpers import free_port

    n = NodeProcess(tmp_path_factory.mktemp("door") / "node", free_port(), max_instance_mb=16.0).start()
    yield n
    n.stop()


def _association(node) -> RawStoreSCU:
    examples = [make() for make, _, _ in CASES.values()] + [malformed.valid(ts) for ts in malformed.NATIVE_SYNTAXES]
    pairs = sorted({(s.sop_class_uid, s.transfer_syntax) for s in examples})
    return RawStoreSCU(node.port, pairs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_malformed_instance_is_refused_and_the_association_serves_on(node, name):
    make, status, words = CASES[name]
    sent = make()
    scu = _association(node)
    try:
        response = scu.store(sent.sop_class_uid, sent.sop_instance_uid, sent.transfer_syntax, sent.data)
        assert response.status == status, response
        assert words.split()[0] in response.comment or words in node.log(), response
        control = malformed.valid()
        assert scu.store(control.sop_class_uid, control.sop_instance_uid, control.transfer_syntax,
                         control.data).status == 0x0000  # the same association goes on
    finally:
        scu.release()
    rejected = wait_until(lambda: [e for e in node.audit() if e["event"] == "rejected"
                                   and e.get("sop_instance_uid") == sent.sop_instance_uid], 10, "the audit line")
    assert rejected[0]["status"] == f"0x{status:04X}" and words in rejected[0]["reason"]
    assert sent.sop_instance_uid not in node.spool_files()


def test_library_messages_never_write_patient_identifiers_to_the_log(node):
    """Item 6: pydicom's "Invalid value for VR IS: '...'" quoted header bytes that held the patient's
    name and ID, straight to stderr (the node's log); so did a classification error's message."""
    scu = _association(node)
    try:
        for keyword in malformed.QUOTED_WHEN_READ:
            sent = malformed.identifiers_in_a_value(keyword)
            assert scu.store(sent.sop_class_uid, sent.sop_instance_uid, sent.transfer_syntax, sent.data).status == 0
    finally:
        scu.release()
    # the tracker's classifier reads the headers: pydicom warns then, and the node logs it
    wait_until(lambda: "Invalid value for VR IS" in node.log() and "invalid literal" in node.log(), 20,
               "pydicom's warning and the classification error in the node's log", detail=node.log_tail)
    texts = {"node log (stdout and stderr)": node.log(), "audit log": (node.storage / "audit.log").read_text()}
    for where, text in texts.items():
        for value in malformed.PATIENT.values():
            assert value not in text, f"{value!r} in the {where}:\n{text[-3000:]}"
    assert "details withheld" in node.log()
