"""The receiver's upper layer against an independent implementation (pynetdicom as the SCU): context
negotiation, fragmented PDUs both ways, a truncated data set sent raw, an abort mid-instance."""

from __future__ import annotations

import socket
import time

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, PatientRootQueryRetrieveInformationModelFind, Verification

from conftest import make_mr_instances, require_tools
from node_helpers import NodeProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path, free_port):
    require_tools("/usr/bin/echoscu")
    n = NodeProcess(tmp_path / "node", free_port(), max_pdu_size=4096).start()
    yield n
    n.stop()


def _associate(node, contexts, max_pdu: int = 16382):
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="QSMNODE", max_pdu=max_pdu)
    assert assoc.is_established
    return assoc


def _log_with(node, text: str) -> str:
    wait_until(lambda: text in node.log(), 10, f"{text!r} in the node's log")
    return node.log()


def _stored(node, count: int = 0) -> set[str]:
    return set(node.spool_files(count))


def test_negotiation_fragmentation_and_statuses(node, tmp_path):
    assoc = _associate(node, [
        (Verification, ["1.2.840.10008.1.2"]),
        (MRImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"]),  # lossy JPEG is never chosen
        (CTImageStorage, ["1.2.840.10008.1.2.4.50"]),                          # lossy only: context refused
        (PatientRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"]),  # not a storage class
    ], max_pdu=1024)
    try:
        accepted = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert accepted == {Verification: "1.2.840.10008.1.2", MRImageStorage: "1.2.840.10008.1.2.1"}
        assert {str(cx.abstract_syntax) for cx in assoc.rejected_contexts} == {
            CTImageStorage, PatientRootQueryRetrieveInformationModelFind}
        assert assoc.acceptor.maximum_length == 4096
        assert assoc.send_c_echo().Status == 0x0000
        # 64x64 int16 (8 KiB) in PDUs of at most 4 KiB, answered in PDUs of at most 1 KiB
        paths = make_mr_instances(tmp_path / "in", 3, rows=64)
        for p in paths:
            assert assoc.send_c_store(p).Status == 0x0000
        sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
        assert _stored(node, len(sent)) == sent
        for p in paths:  # the stored files hold exactly the data set that was sent
            original = pydicom.dcmread(p)
            stored = pydicom.dcmread(next((node.storage / "spool").rglob(f"{original.SOPInstanceUID}.dcm")))
            assert stored == original and stored.file_meta.SourceApplicationEntityTitle == "PYSCU"
        assert assoc.send_c_store(paths[0]).Status == 0x0000  # a duplicate is acknowledged, stored once
        assert len(_stored(node)) == 3
    finally:
        assoc.release()
    assert "3 stored, 1 duplicate, 0 refused" in _log_with(node, "received from PYSCU")


def test_truncated_instance_is_refused_and_the_association_goes_on(node, tmp_path):
    (path,) = make_mr_instances(tmp_path / "in", 1, rows=64)
    raw = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - 5000])  # the pixel data cut short
    assoc = _associate(node, [(MRImageStorage, ["1.2.840.10008.1.2.1"])])
    try:
        status = assoc.send_c_store(cut)
        assert status.Status in (0xA900, 0xC000) and "truncated" in status.ErrorComment
        assert assoc.send_c_store(path).Status == 0x0000  # and the association goes on
    finally:
        assoc.release()
    assert _stored(node, 1) == {str(pydicom.dcmread(path).SOPInstanceUID)}
    assert "truncated" in _log_with(node, "instance refused from PYSCU")


def test_abort_mid_instance_keeps_nothing_and_the_node_serves_on(node, tmp_path):
    (path,) = make_mr_instances(tmp_path / "in", 1, rows=64)
    ds = pydicom.dcmread(path)
    assoc = _associate(node, [(MRImageStorage, ["1.2.840.10008.1.2.1"])])
    context_id = assoc.accepted_contexts[0].context_id
    # the command and the first half of the data set, then A-ABORT
    from pynetdicom.dsutils import encode

    command = pydicom.Dataset()
    command.AffectedSOPClassUID, command.CommandField, command.MessageID = MRImageStorage, 0x0001, 1
    command.Priority, command.CommandDataSetType, command.AffectedSOPInstanceUID = 0, 0x0000, ds.SOPInstanceUID
    command.CommandGroupLength = len(encode(command, True, True))
    data = encode(ds, False, True)
    sock: socket.socket = assoc.dul.socket.socket
    for fragment, control in ((encode(command, True, True), 0x03), (data[: len(data) // 2], 0x00)):
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, bytes([control]) + fragment]]
        sock.sendall(P_DATA_TF(primitive).encode())
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x00, 0x00
    sock.sendall(abort.encode())
    time.sleep(0.5)
    assoc.abort()
    assert _stored(node) == set()
    assert "aborted by the peer mid-instance" in _log_with(node, "mid-instance")
    assert node.echo().returncode == 0
