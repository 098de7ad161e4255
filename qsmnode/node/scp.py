"""The DICOM receiver: C-ECHO and C-STORE SCP (pynetdicom event handlers).

Every instance is written durably to the spool (tmp file, fdatasync, link, fsync folder) and
recorded in the index BEFORE the success status goes back, so an acknowledged instance survives
a crash. The bytes are stored exactly as received (``evt.encoded_dataset()``); pixels are never
decoded here. Refusals carry a specific status and an ErrorComment, get a log line and an audit
``rejected`` line, and never stop the node:

========  ======================================================================
0xA700    Out of Resources: free disk below ``min_free_disk_mb`` (or a write failed)
0x0122    SOP Class not supported: not an MR image (only MR / Enhanced MR are taken)
0xA900    Data Set does not match SOP Class: a required attribute is missing, or the
          pixel data is shorter than Rows x Columns x frames x bits says
0xC000    Cannot understand: the data set cannot be parsed
========  ======================================================================

Associations from calling AE titles (or peer addresses) outside the configured allow-lists are
rejected (A-ASSOCIATE-RJ "calling AE title not recognised", or the connection is closed).
Optional TLS wraps every connection (``[tls]`` in the configuration).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Callable

from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

log = logging.getLogger("qsmnode.receiver")

JPEGLossless = UID("1.2.840.10008.1.2.4.57")

#: Transfer syntaxes the receiver accepts (all lossless: phase must not be compressed lossily).
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless,
]
_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}

MR_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class Refusal(Exception):
    """An instance the receiver will not take: a DICOM status and a reason for the sender."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_instance(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
    """Raise :class:`Refusal` unless ``ds`` is a well-formed MR image (no pixel decoding)."""
    if sop_class_uid not in MR_STORAGE_CLASSES:
        raise Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                      f"SOP class {sop_class_uid} is not an MR image; qsmnode takes MR Image Storage and "
                      "Enhanced MR Image Storage only: send the multi-echo GRE series")
    try:
        modality = ds.get("Modality", None)
        uids = {k: ds.get(k, None) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")}
        rows, cols = ds.get("Rows", None), ds.get("Columns", None)
        bits = ds.get("BitsAllocated", None)
        spp = ds.get("SamplesPerPixel", 1) or 1
        frames = ds.get("NumberOfFrames", 1) or 1
        has_pixels = "PixelData" in ds
        pixel_len = len(ds.PixelData) if has_pixels else 0
    except Exception as err:  # noqa: BLE001 - any parse error is a corrupt data set
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"the data set cannot be parsed ({type(err).__name__}: {err}); "
                      "re-export the series from the scanner") from None
    if modality not in (None, "MR"):
        raise Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED, f"Modality is {modality!r}, not 'MR'; qsmnode takes MR images only")
    missing = [k for k, v in uids.items() if not v]
    missing += [k for k, v in (("Rows", rows), ("Columns", cols), ("BitsAllocated", bits)) if not v]
    if not has_pixels:
        missing.append("PixelData")
    if missing:
        raise Refusal(STATUS_DATASET_MISMATCH, f"required attribute(s) missing: {', '.join(missing)}; "
                      "the instance is not a complete MR image")
    if str(uids["SOPInstanceUID"]) != sop_instance_uid:
        raise Refusal(STATUS_DATASET_MISMATCH, f"SOPInstanceUID in the data set ({uids['SOPInstanceUID']}) differs "
                      f"from the C-STORE request's ({sop_instance_uid})")
    if transfer_syntax in _NATIVE:
        try:
            needed = int(rows) * int(cols) * int(spp) * int(frames) * int(bits) // 8
        except (TypeError, ValueError):
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "Rows/Columns/NumberOfFrames are not numbers") from None
        if pixel_len < needed:
            raise Refusal(STATUS_DATASET_MISMATCH,
                          f"pixel data has {pixel_len} bytes but {rows} x {cols} x {frames} frame(s) x {bits} bits "
                          f"needs {needed}: the file is truncated or corrupt; send it again")


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:1024]
    return ds


class _PollingClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``: the acceptor's reactor
    polls its DIMSE queue with a hard-coded ``time.sleep(0.001)`` per loop, which caps one
    association at well under 1,000 messages/s; this turns exactly that sleep into ``poll_s``."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll_s if seconds == 0.001 else seconds)


def tune_pynetdicom_polling(poll_s: float) -> None:
    """Make pynetdicom's association reactors poll every ``poll_s`` seconds instead of 1 ms.

    pynetdicom (3.x) runs two polling loops per association, each sleeping 1 ms when idle: the
    DUL reactor (``dul._run_loop_delay``, set per association in :meth:`Receiver._on_accepted`)
    and the association reactor (a literal ``time.sleep(0.001)``, changed here for the process).
    Measured on 2 cores, 64x64 instances, storescu with TCP_NODELAY: 234/s at 1 ms, 498/s at
    0.1 ms (durable on disk). The cost is CPU while associations are open (one wake-up per
    ``poll_s`` per thread); idle associations are closed by the network timeout.
    """
    import pynetdicom.association as association

    if poll_s >= 0.001:
        association.time = time
    else:
        association.time = _PollingClock(poll_s)


class Receiver:
    """C-ECHO + C-STORE SCP of the node.

    ``config``: :class:`qsmnode.config.NodeConfig`; ``spool``/``index``: where instances go;
    ``metrics``/``audit``: N2's NodeMetrics / AuditLog; ``on_stored()`` is called after each new
    instance (the tracker's wake-up).
    """

    def __init__(self, config, spool, index, metrics=None, audit=None, on_stored: Callable[[], None] | None = None):
        self.config = config
        self.spool = spool
        self.index = index
        self.metrics = metrics
        self.audit = audit
        self.on_stored = on_stored or (lambda: None)
        self._server = None
        self._networks = [ipaddress.ip_network(h, strict=False) for h in config.allowed_hosts]
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.maximum_associations = 32
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_PDU_SENT, self._on_pdu),
        ]
        ssl_context = cfg.tls.server_context() if cfg.tls else None
        tune_pynetdicom_polling(cfg.receiver_poll_ms / 1000.0)
        self._ae = ae
        self._server = ae.start_server((cfg.bind, cfg.port), block=False, evt_handlers=handlers,
                                       ssl_context=ssl_context)
        # socketserver hook, called for each accepted connection: TCP_NODELAY (pynetdicom writes a PDU in
        # pieces; with Nagle + delayed ACK each response would wait ~40 ms) and the peer allow-list
        self._server.verify_request = self._verify_peer
        log.info("receiver listening: AE %s on %s:%d%s", cfg.ae_title, cfg.bind, self.port,
                 " (TLS)" if ssl_context else "")

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            log.info("receiver stopped")

    # ------------------------------------------------------------------ handlers
    def _verify_peer(self, request, client_address) -> bool:
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if not self._networks:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            ip = ipaddress.ip_address(host)
            ok = any(ip in net for net in self._networks)
        except ValueError:
            ok = False
        if not ok:
            log.warning("connection refused: peer %s is not in allowed_hosts", host)
            if self.metrics:
                self.metrics.associations.labels(outcome="rejected").inc()
            if self.audit:
                self.audit.record("rejected", what="connection", peer=host,
                                  reason="peer address not in allowed_hosts")
        return ok

    @staticmethod
    def _on_pdu(event) -> None:
        # Acknowledge at once: a sender without TCP_NODELAY (DCMTK's default) holds the data PDU until
        # its command PDU is ACKed, and Linux would delay that ACK by up to 40 ms.
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass

    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _on_accepted(self, event) -> None:
        rq = event.assoc.requestor
        event.assoc.dul._run_loop_delay = min(0.001, self.config.receiver_poll_ms / 1000.0)
        event.assoc.qsm_stats = {"stored": 0, "duplicate": 0, "rejected": 0, "series": set(), "studies": set(),
                                 "t0": time.monotonic()}
        if self.metrics:
            self.metrics.associations.labels(outcome="accepted").inc()
        log.debug("association accepted from %s at %s:%s", rq.ae_title, rq.address, rq.port)

    def _on_rejected(self, event) -> None:
        rq = event.assoc.requestor
        reason = (f"calling AE title {rq.ae_title!r} is not in allowed_calling_aets"
                  if self.config.allowed_calling_aets and rq.ae_title not in self.config.allowed_calling_aets
                  else "association rejected")
        log.warning("association rejected from %s (%s): %s; add it to allowed_calling_aets to accept it",
                    rq.ae_title, rq.address, reason)
        if self.metrics:
            self.metrics.associations.labels(outcome="rejected").inc()
        if self.audit:
            self.audit.record("rejected", what="association", calling_ae=rq.ae_title, peer=rq.address, reason=reason)

    def _on_closed(self, event) -> None:
        stats = getattr(event.assoc, "qsm_stats", None)
        if not stats or not (stats["stored"] or stats["duplicate"] or stats["rejected"]):
            return
        rq = event.assoc.requestor
        seconds = time.monotonic() - stats["t0"]
        log.info("received from %s: %d stored, %d duplicate, %d refused in %.2f s (%d series)",
                 rq.ae_title, stats["stored"], stats["duplicate"], stats["rejected"], seconds, len(stats["series"]))
        if self.audit:
            self.audit.record("received", calling_ae=rq.ae_title, peer=rq.address, stored=stats["stored"],
                              duplicate=stats["duplicate"], refused=stats["rejected"], seconds=round(seconds, 3),
                              study_instance_uids=sorted(stats["studies"]),
                              series_instance_uids=sorted(stats["series"]))

    def _refuse(self, event, refusal: Refusal, stats: dict | None):
        rq = event.assoc.requestor
        sop = event.request.AffectedSOPInstanceUID
        log.warning("C-STORE refused from %s, SOP instance %s: status 0x%04X: %s",
                    rq.ae_title, sop, refusal.status, refusal.reason)
        if stats is not None:
            stats["rejected"] += 1
        if self.metrics:
            self.metrics.instances_received.labels(outcome="rejected").inc()
        if self.audit:
            self.audit.record("rejected", what="instance", calling_ae=rq.ae_title, sop_instance_uid=sop,
                              status=f"0x{refusal.status:04X}", reason=refusal.reason)
        return _status(refusal.status, refusal.reason)

    def _on_store(self, event):
        t0 = time.perf_counter()
        stats = getattr(event.assoc, "qsm_stats", None)
        req = event.request
        sop_class, sop_uid = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
        try:
            free = self.spool.free_mb()
            if free < self.config.min_free_disk_mb:
                raise Refusal(STATUS_OUT_OF_RESOURCES,
                              f"free disk {free:.0f} MiB is below the node's watermark of "
                              f"{self.config.min_free_disk_mb:.0f} MiB; send again later")
            if sop_class not in MR_STORAGE_CLASSES:
                check_instance(Dataset(), sop_class, sop_uid, "")
            try:
                ds = event.dataset
            except Exception as err:  # noqa: BLE001 - undecodable stream
                raise Refusal(STATUS_CANNOT_UNDERSTAND, f"the data set cannot be parsed ({type(err).__name__}: "
                              f"{err}); re-export the series") from None
            check_instance(ds, sop_class, sop_uid, str(event.context.transfer_syntax))
            series_uid, study_uid = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
            data = event.encoded_dataset(include_meta=True)
            try:
                path, stored = self.spool.store(series_uid, sop_uid, data)
            except FileNotFoundError:  # the series folder was removed by retention meanwhile: once more
                self.spool.forget_dir(series_uid)
                path, stored = self.spool.store(series_uid, sop_uid, data)
            except OSError as err:
                raise Refusal(STATUS_OUT_OF_RESOURCES, f"the node could not store the instance ({err.strerror}); "
                              "send again later") from None
        except Refusal as refusal:
            return self._refuse(event, refusal, stats)
        calling = event.assoc.requestor.ae_title
        if stored:
            stored = self.index.add_instance(sop_uid, series_uid, study_uid, path, calling_ae=calling,
                                             sop_class_uid=sop_class)
        outcome = "stored" if stored else "duplicate"
        if stats is not None:
            stats[outcome] += 1
            stats["series"].add(series_uid)
            stats["studies"].add(study_uid)
        if self.metrics:
            self.metrics.instances_received.labels(outcome=outcome).inc()
            self.metrics.stage_seconds.labels(stage="receive").observe(time.perf_counter() - t0)
        if stored:
            self.on_stored()
        return STATUS_SUCCESS
