"""A minimal C-STORE SCU that sends data set bytes exactly as given, for tests of the receiver.

pynetdicom's SCU encodes a pydicom Dataset, which cannot carry a data set that is broken on
purpose (a wrong length, the wrong byte order for its context, garbage). This one negotiates the
association with pynetdicom's PDU classes and then writes the C-STORE command and the given bytes
in P-DATA-TF PDUs itself, reading back the status (or the A-ABORT, or the closed connection).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from qsmnode.node import upper_layer as ul

_PDV_HEADER = struct.Struct(">LBB")


class Aborted(Exception):
    """The receiver aborted the association (A-ABORT) instead of answering."""


class Closed(Exception):
    """The receiver closed the connection with neither a status nor an A-ABORT."""


@dataclass
class Response:
    status: int
    comment: str


def _command(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 §9.3.1.1)."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode("ascii", "replace")
        return raw + b"\x00" * (len(raw) % 2)

    body = b"".join([element(0x00000002, uid(sop_class_uid)), element(0x00000100, struct.pack("<H", 0x0001)),
                     element(0x00000110, struct.pack("<H", message_id)), element(0x00000700, struct.pack("<H", 0)),
                     element(0x00000800, struct.pack("<H", 0x0000)), element(0x00001000, uid(sop_instance_uid))])
    return element(0x00000000, struct.pack("<L", len(body))) + body


def _response(command: bytes) -> Response:
    """Status and ErrorComment of a response command set."""
    status, comment, pos = -1, "", 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, pos)
        value = command[pos + 8:pos + 8 + length]
        if (group, element) == (0x0000, 0x0900):
            (status,) = struct.unpack("<H", value)
        elif (group, element) == (0x0000, 0x0902):
            comment = value.decode("ascii", "replace").strip()
        pos += 8 + length
    return Response(status, comment)


class RawStoreSCU:
    """One association to ``port`` proposing each (abstract syntax, transfer syntax) pair as its own
    presentation context; :meth:`store` sends one instance and returns the receiver's response."""

    def __init__(self, port: int, pairs: list[tuple[str, str]], *, calling: str = "FUZZER", called: str = "QSMNODE",
                 max_pdu: int = 16384, timeout_s: float = 30.0):
        self.max_pdu = max_pdu
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.reader = self.sock.makefile("rb")
        self.message_id = 0
        self.contexts = self._associate(pairs, calling, called)

    def _associate(self, pairs, calling: str, called: str) -> dict[tuple[str, str], int]:
        from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
        from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
        from pynetdicom.presentation import build_context

        primitive = A_ASSOCIATE()
        primitive.application_context_name = ul.APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title, primitive.called_ae_title = calling, called
        proposed, contexts = {}, []
        for n, (abstract, syntax) in enumerate(pairs):
            context = build_context(abstract, [syntax])
            context.context_id = 2 * n + 1
            proposed[context.context_id] = (abstract, syntax)
            contexts.append(context)
        primitive.presentation_context_definition_list = contexts
        length = MaximumLengthNotification()
        length.maximum_length_received = self.max_pdu
        primitive.user_information = [length]
        self.sock.sendall(A_ASSOCIATE_RQ(primitive).encode())
        pdu_type, body = ul.read_pdu(self.reader)
        if pdu_type != ul.A_ASSOCIATE_AC:
            raise ConnectionError(f"association not accepted (PDU type 0x{pdu_type:02X})")
        ac = A_ASSOCIATE_AC()
        ac.decode(ul.pdu(pdu_type, body))
        accepted = {}
        for context in ac.to_primitive().presentation_context_definition_results_list:
            if context.result == 0x00:
                accepted[proposed[context.context_id]] = context.context_id
        return accepted

    def store(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, data: bytes) -> Response:
        """Send one C-STORE; the response, or :class:`Aborted` / :class:`Closed`."""
        context_id = self.contexts[(sop_class_uid, transfer_syntax)]
        self.message_id = (self.message_id + 1) & 0xFFFF
        command = _command(sop_class_uid, sop_instance_uid, self.message_id)
        try:
            self.sock.sendall(ul.p_data(context_id, command, command=True, max_pdu=self.max_pdu)
                              + ul.p_data(context_id, data, command=False, max_pdu=self.max_pdu))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the receiver stopped reading: it aborted (read below) or closed
        return self._read_response()

    def _read_response(self) -> Response:
        parts = []
        while True:
            try:
                pdu_type, body = ul.read_pdu(self.reader)
            except (EOFError, ConnectionResetError):
                raise Closed("the connection closed without a response or an A-ABORT") from None
            if pdu_type == ul.A_ABORT:
                raise Aborted(f"A-ABORT {body.hex()}")
            if pdu_type != ul.P_DATA_TF:
                raise ConnectionError(f"unexpected PDU type 0x{pdu_type:02X}")
            for _, control, fragment in ul.iter_pdvs(body):
                parts.append(bytes(fragment))
                if control & 0x03 == 0x03:
                    return _response(b"".join(parts))

    def release(self) -> None:
        try:
            self.sock.sendall(ul.pdu(ul.A_RELEASE_RQ, b"\x00" * 4))
            ul.read_pdu(self.reader)
        except (OSError, EOFError):
            pass
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
