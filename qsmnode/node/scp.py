"""The DICOM receiver: C-ECHO and C-STORE SCP, one thread per association.

Every instance is made durable by the spool (:meth:`qsmnode.node.spool.Spool.store`: an append
and ``fdatasync`` to the receive journal, or for large instances a file created with ``O_EXCL``
and ``fdatasync``ed) BEFORE the success status goes back, so an acknowledged instance survives a
crash. The bytes are stored exactly as received, behind a File Meta header; pixels are never
decoded here. A batching thread (:class:`_IndexFeeder`) indexes the instance right after the
response and writes its spool file when the burst pauses; a crash in between is repaired at
start-up by :meth:`qsmnode.node.spool.Spool.open` (journal replay) and
:meth:`qsmnode.node.spool.Spool.reconcile` (indexing files the index lacks).

The upper layer is :mod:`qsmnode.node.upper_layer` (pynetdicom negotiates the association; the
per-instance path is plain ``struct`` work). Each association is a blocking socket read through
a small buffered reader (:class:`_SocketReader`) in its own thread: ``recv``, ``fdatasync`` and ``send`` release the GIL, so
associations overlap without a polling reactor.

Refusals carry a specific status and an ErrorComment, get a log line and an audit ``rejected``
line, and never stop the node:

========  ======================================================================
0xA700    Out of Resources: free disk below ``min_free_disk_mb`` (or a write failed), or
          the instance is larger than ``max_instance_mb`` (declared, or once inflated)
0x0122    SOP Class not supported: not an MR image (only MR / Enhanced MR are taken)
0xA900    Data Set does not match SOP Class: see :mod:`qsmnode.node.admission` (every check
          that keeps an unreadable instance from being acknowledged)
0xC000    Cannot understand: the data set cannot be walked (truncated, garbled, nested too
          deep, or in another encoding than its transfer syntax):
          :mod:`qsmnode.node.instance_header`
========  ======================================================================

Associations from calling AE titles (or peer addresses) outside the configured allow-lists are
rejected (A-ASSOCIATE-RJ "calling AE title not recognised", or the connection is closed).
Optional TLS wraps every connection (``[tls]`` in the configuration).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import socketserver
import ssl
import threading
import time
from typing import Callable

from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from qsmnode import __version__
from qsmnode.dicom.uids import deterministic_uid
from qsmnode.node import upper_layer as ul
from qsmnode.node.admission import (  # noqa: F401 - Refusal, check_instance, statuses: imported from here too
    MR_STORAGE_CLASSES, STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED, STATUS_SUCCESS, Refusal, admit, check_instance)
from qsmnode.node.instance_header import InstanceHeader
from qsmnode.node.tcp import quick_ack
from qsmnode.threads import lower_thread_priority

log = logging.getLogger("qsmnode.receiver")

#: Transfer syntaxes the receiver accepts, preferred first (all lossless: phase must not be
#: compressed lossily).
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",     # RLE Lossless
]

IMPLEMENTATION_CLASS_UID = deterministic_uid("qsmnode-implementation-class")
IMPLEMENTATION_VERSION = f"QSMNODE_{__version__}"[:16]

#: Abstract syntax -> transfer syntaxes the receiver negotiates. Every storage class is accepted
#: so that a non-MR object gets a specific C-STORE refusal (0x0122) instead of a bare context
#: rejection that senders report poorly.
SUPPORTED_CONTEXTS = {str(Verification): ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"],
                      **{str(cx.abstract_syntax): ACCEPTED_TRANSFER_SYNTAXES
                         for cx in AllStoragePresentationContexts}}


def _header_bytes(meta: bytes, header: InstanceHeader, data_length: int) -> int | None:
    """Leading bytes of the stored file (File Meta + data set) that a header reader needs: up to
    the Pixel Data element's tag, VR and length, where it stops."""
    if header.pixel_data_offset is None:
        return None
    return len(meta) + min(header.pixel_data_offset + 12, data_length)


def _peer_allowed(host: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class _IndexFeeder:
    """Off the acknowledgement path: records received instances in the index, many per
    transaction, and wakes the tracker; writes their spool files
    (:meth:`qsmnode.node.spool.Spool.materialize`) once the burst pauses for ``idle_s``, or when
    the spool is over its memory budget, or ``max_defer_s`` after the last time;
    and checkpoints the spool (syncs the files, recycles the journal) when nothing arrives for
    ``checkpoint_s``, so no journal record outlives its file by more than a few seconds
    (retention may delete the file later; a replay must not bring it back). ``flush()`` waits
    until everything queued is indexed and written."""

    def __init__(self, spool, index, on_stored: Callable[[], None], *, idle_s: float = 0.1,
                 max_defer_s: float = 10.0, checkpoint_s: float = 2.0):
        self.spool = spool
        self.index = index
        self.on_stored = on_stored
        self.idle_s = idle_s
        self.max_defer_s = max_defer_s
        self.checkpoint_s = checkpoint_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qsmnode-index-feeder", daemon=True)
        self._thread.start()

    def put(self, row: tuple) -> None:
        self._queue.put(row)

    def flush(self) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def stop(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        lower_thread_priority()
        last_written = last_checkpoint = time.monotonic()
        while True:
            batch = self._take(self.idle_s if self.spool.pending_bytes else self.checkpoint_s)
            rows = [b for b in batch if isinstance(b, tuple)]
            events = [b for b in batch if not isinstance(b, tuple)]  # flush() Events, stop()'s None
            if rows:
                try:
                    self.index.add_instances(rows)
                except Exception:  # noqa: BLE001 - the journal is durable; a restart replays and re-indexes
                    log.exception("could not index %d received instance(s); a restart will re-index them", len(rows))
                self.on_stored()
            now = time.monotonic()
            if (not batch or events or self.spool.over_budget
                    or now - last_written >= self.max_defer_s):
                checkpoint = now - last_checkpoint >= self.checkpoint_s
                self._write_files(checkpoint)
                last_written = time.monotonic()
                if checkpoint:
                    last_checkpoint = last_written
            self.spool.prepare_journal()
            for b in events:
                if b is not None:
                    b.set()
            if None in events:
                return

    def _take(self, timeout: float) -> list:
        """What is queued (up to 1,000 items), waiting up to ``timeout`` s for the first; [] if none came."""
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < 1000:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write_files(self, checkpoint: bool) -> None:
        try:
            self.spool.materialize()
            if checkpoint:
                self.spool.checkpoint(idle=True)
        except OSError:
            log.exception("could not write or sync the spool files; the receive journal keeps the instances")


class _SocketReader:
    """Buffered reads from a (TLS) socket that acknowledges every segment at once
    (:func:`qsmnode.node.tcp.quick_ack`: a sender with Nagle on never waits for a delayed ACK)."""

    def __init__(self, sock: socket.socket, chunk: int = 256 * 1024):
        self.sock = quick_ack(sock)
        self.chunk = chunk
        self.buffer = bytearray()

    def read(self, n: int) -> bytes:
        """``n`` bytes, or fewer when the peer closed the connection."""
        while len(self.buffer) < n:
            data = self.sock.recv(max(self.chunk, n - len(self.buffer)))
            if not data:
                break
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


class _Association:
    """One association from accept to release/abort, run in its own thread."""

    def __init__(self, receiver: "Receiver", sock: socket.socket, peer: str):
        self.receiver = receiver
        self.config = receiver.config
        self.sock = sock
        self.peer = peer
        self.calling_ae = ""
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.stats = {"stored": 0, "duplicate": 0, "rejected": 0}
        self.series: set[str] = set()
        self.studies: set[str] = set()
        self.t0 = time.monotonic()
        self.admitted = False

    # -------------------------------------------------------------- protocol
    def run(self) -> None:
        self.sock.settimeout(self.receiver.ACSE_TIMEOUT_S)
        reader = _SocketReader(self.sock)
        try:
            if not self._associate(reader):
                return
            self.sock.settimeout(self.receiver.NETWORK_TIMEOUT_S)
            self._serve(reader)
        except EOFError:
            log.debug("association from %s (%s): peer closed the connection", self.calling_ae or "?", self.peer)
        except ul.ProtocolError as err:
            log.warning("association from %s (%s) aborted: %s", self.calling_ae or "?", self.peer, err)
            self._send(ul.abort(0x02, err.reason))
        except (socket.timeout, TimeoutError):
            log.warning("association from %s (%s) aborted: nothing received for %.0f s",
                        self.calling_ae or "?", self.peer, self.receiver.NETWORK_TIMEOUT_S)
            self._send(ul.abort(0x02, 0x00))
        except (OSError, ssl.SSLError) as err:
            log.warning("association from %s (%s) lost: %s", self.calling_ae or "?", self.peer, err)
        finally:
            self._report()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _associate(self, reader) -> bool:
        pdu_type, body = ul.read_pdu(reader)
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rq = ul.decode_associate_rq(body)
        self.calling_ae, self.peer_max_pdu = rq.calling_ae, rq.max_pdu
        cfg = self.config
        rejection = None
        if rq.protocol_version & 0x0001 == 0:
            rejection = ((1, 2, 2), f"protocol version {rq.protocol_version} is not supported")
        elif rq.application_context != ul.APPLICATION_CONTEXT_NAME:
            rejection = ((1, 1, 2), f"application context {rq.application_context} is not DICOM's")
        elif cfg.allowed_calling_aets and rq.calling_ae not in cfg.allowed_calling_aets:
            rejection = ((1, 1, 3), f"calling AE title {rq.calling_ae!r} is not in allowed_calling_aets; "
                                    "add it to accept it")
        elif not (admitted := self.receiver.admit()):
            rejection = ((2, 3, 2), f"{self.receiver.MAX_ASSOCIATIONS} associations are open already; try again later")
        if rejection:  # logged before the sender hears of it, so the log line is there when it looks
            self.receiver.rejected("association", rejection[1], calling_ae=rq.calling_ae, peer=self.peer)
            self._send(ul.associate_rj(*rejection[0]))
            return False
        self.admitted = admitted
        contexts, roles = ul.negotiate(rq, SUPPORTED_CONTEXTS)
        self.contexts = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in contexts if cx.result == 0x00}
        self._send(ul.associate_ac(rq, contexts, roles, max_pdu=cfg.max_pdu_size,
                                   implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                   implementation_version=IMPLEMENTATION_VERSION))
        self.receiver.accepted()
        log.debug("association accepted from %s at %s: %d of %d presentation context(s)",
                  rq.calling_ae, self.peer, len(self.contexts), len(contexts))
        return True

    def _serve(self, reader: "_SocketReader") -> None:
        command, command_parts, data_parts, context_id = None, [], [], None
        while True:
            pdu_type, body = ul.read_pdu(reader)
            if pdu_type == ul.P_DATA_TF:
                for cx, control, fragment in ul.iter_pdvs(body):
                    if cx not in self.contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {cx}, which was not accepted", 0x06)
                    if context_id is not None and cx != context_id:
                        raise ul.ProtocolError("a message changed presentation context mid-way", 0x06)
                    context_id = cx
                    if control & 0x01:
                        command_parts.append(fragment)
                        if control & 0x02:
                            command = ul.decode_command(b"".join(command_parts))
                            if not command.has_data_set:
                                self._dispatch(command, cx, None)
                                command, command_parts, context_id = None, [], None
                    else:
                        if command is None:
                            raise ul.ProtocolError("data set fragment before its command", 0x06)
                        data_parts.append(fragment)
                        if control & 0x02:
                            self._dispatch(command, cx, b"".join(data_parts))
                            command, command_parts, data_parts, context_id = None, [], [], None
            elif pdu_type == ul.A_RELEASE_RQ:
                self._send(ul.release_rp())
                return
            elif pdu_type == ul.A_ABORT:
                if command is not None:
                    log.warning("association from %s (%s) aborted by the peer mid-instance; that instance was "
                                "not acknowledged and is not kept", self.calling_ae, self.peer)
                return
            else:
                raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during the association")

    def _dispatch(self, command: ul.Command, context_id: int, data: bytes | None) -> None:
        if command.command_field == ul.C_STORE_RQ and data is not None:
            status, comment = self.receiver.store(self, command, self.contexts[context_id][1], data)
            reply = ul.response(ul.C_STORE_RSP, command, status, comment)
        elif command.command_field == ul.C_ECHO_RQ:
            reply = ul.response(ul.C_ECHO_RSP, command, STATUS_SUCCESS)
        elif command.command_field == ul.C_CANCEL_RQ:
            return
        else:
            raise ul.ProtocolError(f"DIMSE command 0x{command.command_field:04X} is not served by this node "
                                   "(it takes C-ECHO and C-STORE)", 0x00)
        self.sock.sendall(ul.p_data(context_id, reply, command=True, max_pdu=self.peer_max_pdu))

    def _report(self) -> None:
        if self.admitted:
            self.receiver.release()
        if not any(self.stats.values()):
            return
        seconds = time.monotonic() - self.t0
        log.info("received from %s: %d stored, %d duplicate, %d refused in %.2f s (%d series)", self.calling_ae,
                 self.stats["stored"], self.stats["duplicate"], self.stats["rejected"], seconds, len(self.series))
        if self.receiver.audit:
            self.receiver.audit.record(
                "received", calling_ae=self.calling_ae, peer=self.peer, stored=self.stats["stored"],
                duplicate=self.stats["duplicate"], refused=self.stats["rejected"], seconds=round(seconds, 3),
                study_instance_uids=sorted(self.studies), series_instance_uids=sorted(self.series))


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class Receiver:
    """C-ECHO + C-STORE SCP of the node.

    ``config``: :class:`qsmnode.config.NodeConfig`; ``spool``/``index``: where instances go;
    ``metrics``/``audit``: NodeMetrics / AuditLog; ``on_stored()`` is called after new instances are
    indexed (the tracker's wake-up).
    """

    #: Seconds to wait for a TLS handshake or the A-ASSOCIATE-RQ, and for the next PDU of an open
    #: association, before aborting it; associations served at once.
    ACSE_TIMEOUT_S = 30.0
    NETWORK_TIMEOUT_S = 60.0
    MAX_ASSOCIATIONS = 32

    def __init__(self, config, spool, index, metrics=None, audit=None, on_stored: Callable[[], None] | None = None):
        self.config = config
        self.spool = spool
        self.index = index
        self.metrics = metrics
        self.audit = audit
        self.on_stored = on_stored or (lambda: None)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._feeder: _IndexFeeder | None = None
        self._networks = [ipaddress.ip_network(h, strict=False) for h in config.allowed_hosts]
        self._ssl = config.tls.server_context() if config.tls else None
        self._open = 0
        self._open_lock = threading.Lock()
        self.max_instance_bytes = int(config.max_instance_mb * (1 << 20))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.config
        self._feeder = _IndexFeeder(self.spool, self.index, self.on_stored)
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                receiver._handle(self.request, self.client_address)

        self._server = _Server((cfg.bind, cfg.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="qsmnode-receiver", daemon=True)
        self._thread.start()
        log.info("receiver listening: AE %s on %s:%d%s", cfg.ae_title, cfg.bind, self.port,
                 " (TLS)" if self._ssl else "")

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._feeder.stop()
            log.info("receiver stopped")

    # ------------------------------------------------------------------ associations
    def _handle(self, sock: socket.socket, address) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._networks and not _peer_allowed(host, self._networks):
            self.rejected("connection", f"peer {host} is not in allowed_hosts", peer=host)
            return
        if self._ssl is not None:
            try:
                sock.settimeout(self.ACSE_TIMEOUT_S)
                sock = self._ssl.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as err:
                log.warning("TLS handshake with %s failed: %s; the sender needs a certificate from the node's CA "
                            "(see [tls])", host, getattr(err, "reason", None) or err)
                if self.metrics:
                    self.metrics.associations.labels(outcome="rejected").inc()
                return
        try:
            _Association(self, sock, host).run()
        finally:
            if isinstance(sock, ssl.SSLSocket):
                sock.close()

    def admit(self) -> bool:
        with self._open_lock:
            if self._open >= self.MAX_ASSOCIATIONS:
                return False
            self._open += 1
            return True

    def release(self) -> None:
        with self._open_lock:
            self._open = max(0, self._open - 1)

    def accepted(self) -> None:
        if self.metrics:
            self.metrics.associations.labels(outcome="accepted").inc()

    def rejected(self, what: str, reason: str, **fields) -> None:
        """Log, count and audit a refused connection, association or instance."""
        who = fields.get("calling_ae") or fields.get("peer") or "?"
        log.warning("%s refused from %s: %s", what, who, reason)
        if self.metrics:
            if what == "instance":
                self.metrics.instances_received.labels(outcome="rejected").inc()
            else:
                self.metrics.associations.labels(outcome="rejected").inc()
        if self.audit:
            self.audit.record("rejected", what=what, reason=reason, **fields)

    # ------------------------------------------------------------------ instances
    def store(self, assoc: _Association, command: ul.Command, transfer_syntax: str, data: bytes) -> tuple[int, str | None]:
        """Check and durably store one C-STORE data set; returns (status, error comment)."""
        t0 = time.perf_counter()
        sop_class, sop_uid = command.sop_class_uid, command.sop_instance_uid
        try:
            free = self.spool.free_mb()
            if free < self.config.min_free_disk_mb:
                raise Refusal(STATUS_OUT_OF_RESOURCES,
                              f"free disk {free:.0f} MiB is below the node's watermark of "
                              f"{self.config.min_free_disk_mb:.0f} MiB; send again later")
            header = admit(data, sop_class, sop_uid, transfer_syntax, max_bytes=self.max_instance_bytes)
            meta = ul.file_meta(sop_class, sop_uid, transfer_syntax, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                implementation_version=IMPLEMENTATION_VERSION, source_ae=assoc.calling_ae)
            try:
                path, stored = self.spool.store(header.series_instance_uid, sop_uid, meta, data,
                                                header_bytes=_header_bytes(meta, header, len(data)))
            except OSError as err:
                raise Refusal(STATUS_OUT_OF_RESOURCES, f"node could not store the instance ({err.strerror}); "
                              "send again later") from None
        except Refusal as refusal:
            assoc.stats["rejected"] += 1
            self.rejected("instance", f"status 0x{refusal.status:04X}: {refusal.reason}", calling_ae=assoc.calling_ae,
                          sop_instance_uid=sop_uid, status=f"0x{refusal.status:04X}")
            return refusal.status, refusal.reason
        outcome = "stored" if stored else "duplicate"
        assoc.stats[outcome] += 1
        assoc.series.add(header.series_instance_uid)
        assoc.studies.add(header.study_instance_uid)
        if stored:
            self._feeder.put((sop_uid, header.series_instance_uid, header.study_instance_uid, str(path),
                              assoc.calling_ae, sop_class, time.time()))
        if self.metrics:
            self.metrics.instances_received.labels(outcome=outcome).inc()
            self.metrics.stage_seconds.labels(stage="receive").observe(time.perf_counter() - t0)
        return STATUS_SUCCESS, None
