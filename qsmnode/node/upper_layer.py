"""The DICOM upper layer and DIMSE messages the receiver needs, as plain byte functions (PS3.8, PS3.7).

The receiver's hot path — one C-STORE request in, one response out, thousands per second — is
encoded and decoded here with ``struct`` directly; association negotiation (once per association,
rich in options: presentation contexts, roles, user information) is left to pynetdicom's PDU and
presentation classes, which implement it completely.

Why not pynetdicom's own acceptor: it runs two polling threads per association and decodes each
command into a pydicom Dataset, about 2 ms of CPU per C-STORE on two cores, which caps one
association near 400 instances/s; the node must take 1,000/s.

PDU layout (PS3.8 §9.3): ``type (1) | reserved (1) | length (4, big endian) | body``. A P-DATA-TF
body is a list of PDV items ``length (4, BE) | context id (1) | control (1) | fragment``; control bit
0 set means a command fragment, bit 1 the last fragment. Command sets are Implicit VR Little Endian
(PS3.7 §6.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101

#: Largest PDU the receiver reads, whatever the peer sends (a guard against a corrupt length field).
MAX_PDU_BODY = 64 * 1024 * 1024

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted (``reason`` per PS3.8 §9.3.8)."""

    def __init__(self, message: str, reason: int = 0x02):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------- PDUs
def read_pdu(stream: BinaryIO) -> tuple[int, bytes]:
    """Read one PDU from a buffered binary stream: ``(pdu_type, body)``.

    Raises ``EOFError`` when the peer closed the connection before a whole PDU arrived.
    """
    header = stream.read(6)
    if len(header) < 6:
        raise EOFError("connection closed")
    pdu_type, length = _PDU_HEADER.unpack(header)
    if length > MAX_PDU_BODY:
        raise ProtocolError(f"PDU length {length} exceeds {MAX_PDU_BODY}", reason=0x06)
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("connection closed inside a PDU")
    return pdu_type, body


def pdu(pdu_type: int, body: bytes) -> bytes:
    """Encode a PDU from its type and body."""
    return _PDU_HEADER.pack(pdu_type, len(body)) + body


def release_rp() -> bytes:
    return pdu(A_RELEASE_RP, b"\x00" * 4)


def abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """A-ABORT PDU; ``source`` 0 = service user, 2 = service provider (then ``reason`` applies)."""
    return pdu(A_ABORT, bytes((0, 0, source, reason)))


def iter_pdvs(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF body: ``(context_id, control_header, fragment)``."""
    view = memoryview(body)
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("truncated PDV item", reason=0x06)
        length, context_id, control = _PDV_HEADER.unpack_from(view, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit its PDU", reason=0x06)
        yield context_id, control, view[pos + 6: pos + 4 + length]
        pos += 4 + length


def p_data(context_id: int, message: bytes, *, command: bool, max_pdu: int) -> bytes:
    """One message as P-DATA-TF PDUs, fragmented to fit the peer's maximum PDU length (0: no limit)."""
    room = max(max_pdu - 6, 1) if max_pdu else len(message) or 1
    out = []
    for start in range(0, max(len(message), 1), room):
        fragment = message[start:start + room]
        last = start + room >= len(message)
        control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        out.append(pdu(P_DATA_TF, _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment))
    return b"".join(out)


# ---------------------------------------------------------------------------------------- DIMSE
@dataclass
class Command:
    """The fields of a DIMSE request the receiver acts on (PS3.7 §9.3, §E)."""

    command_field: int = 0
    message_id: int = 0
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    has_data_set: bool = False
    move_originator_ae: str = ""


_TEXT_TAGS = {0x00000002: "sop_class_uid", 0x00001000: "sop_instance_uid", 0x00001030: "move_originator_ae"}


def decode_command(data: bytes | memoryview) -> Command:
    """Decode an Implicit VR Little Endian command set (group 0000)."""
    cmd = Command()
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError("truncated command set", reason=0x06)
        group, element, length = _ELEMENT_HEADER.unpack_from(view, pos)
        value = view[pos + 8: pos + 8 + length]
        if len(value) < length:
            raise ProtocolError("command set element runs past its end", reason=0x06)
        tag = group << 16 | element
        if tag in _TEXT_TAGS:
            setattr(cmd, _TEXT_TAGS[tag], bytes(value).rstrip(b"\x00 ").decode("ascii", "replace"))
        elif tag == 0x00000100:
            cmd.command_field = _US.unpack_from(value)[0]
        elif tag == 0x00000110:
            cmd.message_id = _US.unpack_from(value)[0]
        elif tag == 0x00000800:
            cmd.has_data_set = _US.unpack_from(value)[0] != NO_DATA_SET
        pos += 8 + length
    return cmd


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def response(command_field: int, request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The command set of a response (C-STORE-RSP / C-ECHO-RSP) to ``request``, with ``status``."""
    elements = [_element(0x00000002, _text(request.sop_class_uid, b"\x00")),
                _element(0x00000100, _US.pack(command_field)),
                _element(0x00000120, _US.pack(request.message_id)),
                _element(0x00000800, _US.pack(NO_DATA_SET)),
                _element(0x00000900, _US.pack(status))]
    if error_comment:
        elements.append(_element(0x00000902, _text(error_comment[:64], b" ")))
    if request.sop_instance_uid:
        elements.append(_element(0x00001000, _text(request.sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


# ---------------------------------------------------------------------------------------- files
def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 2, group_element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, group_element, vr, len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, *, implementation_class_uid: str,
              implementation_version: str, source_ae: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 §7.1) for a data set received over the
    network, so the spool file is a valid Part 10 file holding the data set bytes exactly as sent."""
    elements = [_meta_element(0x0001, b"OB", b"\x00\x01"),
                _meta_element(0x0002, b"UI", _text(sop_class_uid, b"\x00")),
                _meta_element(0x0003, b"UI", _text(sop_instance_uid, b"\x00")),
                _meta_element(0x0010, b"UI", _text(transfer_syntax, b"\x00")),
                _meta_element(0x0012, b"UI", _text(implementation_class_uid, b"\x00")),
                _meta_element(0x0013, b"SH", _text(implementation_version, b" "))]
    if source_ae:
        elements.append(_meta_element(0x0016, b"AE", _text(source_ae, b" ")))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


# ---------------------------------------------------------------------------------------- association
@dataclass
class AssociationRequest:
    """What the receiver needs from an A-ASSOCIATE-RQ (decoded by pynetdicom)."""

    calling_ae: str
    called_ae: str
    application_context: str
    protocol_version: int
    max_pdu: int  # the peer's maximum PDU length (0: no limit)
    implementation_class_uid: str
    implementation_version: str
    primitive: object  # pynetdicom.pdu_primitives.A_ASSOCIATE


def decode_associate_rq(body: bytes) -> AssociationRequest:
    """Decode an A-ASSOCIATE-RQ PDU body with pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQ
    from pynetdicom.pdu_primitives import (ImplementationClassUIDNotification,
                                           ImplementationVersionNameNotification, MaximumLengthNotification)

    rq = AssociateRQ()
    try:
        rq.decode(pdu(A_ASSOCIATE_RQ, body))
        primitive = rq.to_primitive()
    except Exception as err:  # noqa: BLE001 - whatever pynetdicom cannot decode is a malformed PDU
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(err).__name__}: {err})", reason=0x06) from None
    max_pdu, impl_uid, impl_version = 0, "", ""
    for item in primitive.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = str(item.implementation_version_name or "")
    return AssociationRequest(
        calling_ae=str(primitive.calling_ae_title).strip(), called_ae=str(primitive.called_ae_title).strip(),
        application_context=str(primitive.application_context_name or ""), protocol_version=rq.protocol_version,
        max_pdu=max_pdu, implementation_class_uid=impl_uid, implementation_version=impl_version,
        primitive=primitive)


def negotiate(request: AssociationRequest, supported: dict[str, list[str]]) -> tuple[list, list]:
    """Presentation-context negotiation as acceptor (pynetdicom): ``supported`` maps abstract syntax
    to transfer syntaxes in order of preference. Returns (contexts with results, role replies)."""
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

    ours = []
    for abstract_syntax, syntaxes in supported.items():
        cx = PresentationContext()
        cx.abstract_syntax = abstract_syntax
        cx.transfer_syntax = list(syntaxes)
        ours.append(cx)
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
             for item in request.primitive.user_information or []
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
    return negotiate_as_acceptor(request.primitive.presentation_context_definition_list, ours, roles or None)


def associate_ac(request: AssociationRequest, contexts: list, roles: list, *, max_pdu: int,
                 implementation_class_uid: str, implementation_version: str) -> bytes:
    """The A-ASSOCIATE-AC PDU for ``request`` with the negotiated ``contexts`` (pynetdicom encodes)."""
    from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAC
    from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                           ImplementationVersionNameNotification, MaximumLengthNotification)

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.primitive.calling_ae_title
    primitive.called_ae_title = request.primitive.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    primitive.presentation_context_definition_results_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = implementation_class_uid
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version
    primitive.user_information = [length, uid, version, *roles]
    return AssociateAC(primitive).encode()


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ PDU (PS3.8 §9.3.4): result 1 permanent / 2 transient; source 1 service user,
    2 provider (ACSE), 3 provider (presentation); diagnostic e.g. 3 = calling AE title not recognised."""
    return pdu(A_ASSOCIATE_RJ, bytes((0, result, source, diagnostic)))
