"""Dispatcher: a persistent outbox that delivers a job's output files to each destination.

Every (job, destination, file) is a row of the table ``outbox`` in the node's SQLite index
(WAL mode, shared with the index of jobs), so nothing is lost across restarts: a PACS that is
down for an hour still gets everything once it is back. One worker thread per destination
sends the due files in batches, one association (DIMSE) or one STOW-RS request (DICOMweb)
per batch; failures are retried with exponential back-off with jitter ("equal jitter",
Brooker, AWS Architecture Blog 2015: delay = d/2 + U(0, d/2), d = min(max_delay_s,
base_delay_s * 2**(attempt-1))).

A job may hand its outputs over in pieces (the worker enqueues each series as soon as it is
written): between :meth:`Dispatcher.open_job` and :meth:`Dispatcher.close_job` the job's delivery
stays pending, so it is "sent" only when the finished job's every piece is.

Two kinds of failure are told apart:

- the destination cannot be reached (connection refused, association rejected/aborted, HTTP
  5xx, timeouts): transient, retried until delivered, however long it takes;
- the destination refuses one instance with a failure status (C-STORE 0xA7xx/0xA9xx/0xCxxx,
  STOW-RS FailedSOPSequence / HTTP 4xx): retried ``max_refusals`` times, then the file, and
  so the job's dispatch, is marked failed with the status explained.

Storage SCU per DICOM PS3.4 Annex B; STOW-RS per PS3.18 10.5.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sqlite3
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from qsmnode.errors import ConfigError, QsmNodeError
from qsmnode.node.tcp import quick_ack

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_UNCOMPRESSED = {EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.2"}

#: Max presentation contexts one association may propose (PS3.8: odd IDs 1..255).
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Destination:
    """Where outputs go.

    ``kind`` ``"dimse"``: a C-STORE SCP at ``host:port`` called ``ae_title``; optional TLS
    (``tls=True``; ``tls_ca_file`` to verify the peer, ``tls_cert_file``/``tls_key_file`` for
    a client certificate, ``tls_server_hostname`` to check against the peer's certificate,
    default ``host``). ``kind`` ``"dicomweb"``: a STOW-RS service at ``url`` (the DICOMweb
    root, e.g. ``http://pacs:8042/dicom-web``); HTTPS verification uses ``tls_ca_file`` (or the
    system store) and the client certificate if given. ``timeout_s``: network timeout, seconds.
    """

    name: str
    kind: str = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a destination needs a name", "give it one, e.g. name = \"pacs\"")
        if self.kind == "dimse":
            if not self.ae_title or not self.host or not self.port:
                raise ConfigError(
                    f"destination {self.name!r}: a DIMSE destination needs ae_title, host and port",
                    "write it as AET@HOST:PORT or give ae_title, host and port")
            if len(self.ae_title) > 16 or not self.ae_title.strip() or "\\" in self.ae_title:
                raise ConfigError(f"destination {self.name!r}: AE title {self.ae_title!r} is not valid",
                                  "an AE title has 1 to 16 characters and no backslash")
            if not 0 < int(self.port) < 65536:
                raise ConfigError(f"destination {self.name!r}: port {self.port} is out of range",
                                  "use a TCP port between 1 and 65535")
        elif self.kind == "dicomweb":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ConfigError(f"destination {self.name!r}: a DICOMweb destination needs an http(s) url",
                                  "e.g. url = \"https://pacs.example.org/dicom-web\"")
        else:
            raise ConfigError(f"destination {self.name!r}: unknown kind {self.kind!r}",
                              "use kind = \"dimse\" or kind = \"dicomweb\"")
        for attr in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            value = getattr(self, attr)
            if value and not Path(value).is_file():
                raise ConfigError(f"destination {self.name!r}: {attr} {value!r} is not a readable file",
                                  "fix the path or remove the option")
        if self.tls_key_file and not self.tls_cert_file:
            raise ConfigError(f"destination {self.name!r}: tls_key_file given without tls_cert_file",
                              "give the client certificate too")

    @classmethod
    def parse_address(cls, address: str, name: str | None = None) -> "Destination":
        """``"AET@HOST:PORT"`` (DIMSE) or an ``http(s)://`` URL (DICOMweb) -> Destination.

        The name defaults to the AE title (or the URL's host).
        """
        address = address.strip()
        if address.startswith(("http://", "https://")):
            host = address.split("://", 1)[1].split("/", 1)[0]
            return cls(name=name or host, kind="dicomweb", url=address.rstrip("/"))
        aet, at, hostport = address.partition("@")
        host, colon, port = hostport.rpartition(":")
        host = host.strip("[]")
        if not at or not colon or not aet or not host or not port.isdigit():
            raise ConfigError(f"destination address {address!r} is not AET@HOST:PORT",
                              "e.g. ORTHANC@127.0.0.1:4242, or an http(s):// DICOMweb URL")
        return cls(name=name or aet, kind="dimse", ae_title=aet, host=host, port=int(port))

    @classmethod
    def from_config(cls, table: dict[str, Any]) -> "Destination":
        """Build from a config table (TOML), e.g.::

            {name = "pacs", address = "PACS@10.0.0.5:104"}
            {name = "pacs", ae_title = "PACS", host = "10.0.0.5", port = 104,
             tls = {ca_file = "ca.pem", cert_file = "node.pem", key_file = "node.key"}}
            {name = "cloud", url = "https://pacs.example.org/dicom-web"}
        """
        if not isinstance(table, dict):
            raise ConfigError(f"a destination must be a table, got {type(table).__name__}",
                              "write [[destinations]] with name and address or url")
        t = dict(table)
        known = {"name", "kind", "address", "ae_title", "aet", "host", "port", "url", "tls",
                 "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_hostname", "timeout_s"}
        unknown = sorted(set(t) - known)
        if unknown:
            raise ConfigError(f"destination {t.get('name', '?')!r}: unknown option(s) {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(known))}")
        tls = t.pop("tls", False)
        if isinstance(tls, dict):
            for key in ("ca_file", "cert_file", "key_file", "server_hostname"):
                if key in tls:
                    t.setdefault(f"tls_{key}", tls[key])
            bad = sorted(set(tls) - {"ca_file", "cert_file", "key_file", "server_hostname"})
            if bad:
                raise ConfigError(f"destination {t.get('name', '?')!r}: unknown tls option(s) {', '.join(bad)}",
                                  "use ca_file, cert_file, key_file, server_hostname")
            tls = True
        extra = {k: t[k] for k in ("tls_ca_file", "tls_cert_file", "tls_key_file",
                                   "tls_server_hostname") if t.get(k)}
        if "timeout_s" in t:
            extra["timeout_s"] = float(t["timeout_s"])
        if "address" in t:
            base = cls.parse_address(str(t["address"]), name=t.get("name"))
            d = asdict(base)
            d.update(extra)
            d["tls"] = bool(tls)
            return cls(**d)
        if "aet" in t and "ae_title" not in t:
            t["ae_title"] = t["aet"]
        kind = t.get("kind") or ("dicomweb" if t.get("url") else "dimse")
        try:
            port = int(t["port"]) if t.get("port") is not None else None
        except (TypeError, ValueError):
            raise ConfigError(f"destination {t.get('name', '?')!r}: port {t['port']!r} is not a number",
                              "give the TCP port as an integer") from None
        return cls(name=str(t.get("name") or t.get("ae_title") or ""), kind=kind,
                   ae_title=t.get("ae_title"), host=t.get("host"), port=port,
                   url=t.get("url"), tls=bool(tls), **extra)

    def describe(self) -> str:
        """One line for logs, e.g. ``pacs (PACS@10.0.0.5:104, TLS)``."""
        where = self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"
        return f"{self.name} ({where}{', TLS' if self.tls else ''})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Client TLS context (CA + optional client certificate) or ``None`` without TLS."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
        if self.tls_cert_file:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx


class _Transient(Exception):
    """The destination could not be reached or dropped the batch; retry later.

    ``partial``: rowid -> result for the files settled before it happened.
    """

    def __init__(self, message: str, partial: dict[int, str | None] | None = None) -> None:
        super().__init__(message)
        self.partial = dict(partial or {})


@dataclass
class _Item:
    rowid: int
    job_id: str
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str
    attempts: int
    refusals: int
    created_at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',          -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0,             -- tries that did not deliver
    refusals INTEGER NOT NULL DEFAULT 0,             -- of which: refused with a failure status
    next_attempt_at REAL NOT NULL DEFAULT 0,         -- unix time, s
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    PRIMARY KEY (job_id, destination, path)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (destination, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS outbox_destination (
    name TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_open (             -- jobs still making outputs (more to come)
    job_id TEXT PRIMARY KEY,
    opened_at REAL NOT NULL
);
"""


def backoff_delay_s(attempt: int, base_delay_s: float, max_delay_s: float,
                    rng: random.Random | None = None) -> float:
    """Delay (s) before try ``attempt + 1`` after ``attempt`` (>= 1) failed: equal jitter, capped."""
    d = min(max_delay_s, base_delay_s * (2.0 ** max(0, attempt - 1)))
    r = (rng or random).random()
    return min(max_delay_s, d / 2.0 + r * d / 2.0)


def _status_text(status: int) -> str:
    if 0xA700 <= status <= 0xA7FF:
        what = "out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        what = "data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        what = "cannot understand"
    else:
        what = {0x0117: "invalid SOP instance", 0x0122: "SOP class not supported",
                0x0124: "not authorised", 0x0210: "duplicate invocation",
                0x0211: "unrecognised operation", 0x0212: "mistyped argument"}.get(status, "failure")
    return f"C-STORE status 0x{status:04X} ({what})"


@dataclass(frozen=True)
class DispatchSettings:
    """Back-off and concurrency of the dispatcher: the ``[dispatch]`` table of the configuration.

    ``base_delay_s``/``max_delay_s``: the back-off (s) starts at about ``base_delay_s`` and doubles
    per failed try up to ``max_delay_s`` (see :func:`backoff_delay_s`). ``max_refusals``: tries of
    an instance that the destination refuses with a failure status before it is given up.
    ``batch_size``: files per association (DIMSE) or per run of STOW-RS requests.
    ``associations``: concurrent associations per destination for a large batch (a PACS that
    leaves Nagle on answers ~20 C-STOREs/s per association; four in parallel quadruple that).
    Invalid values raise :class:`ConfigError` naming the key.
    """

    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    max_refusals: int = 5
    batch_size: int = 500
    associations: int = 4

    #: upper bound of ``associations`` (PACS limit concurrent associations per calling AE)
    MAX_ASSOCIATIONS = 32

    def __post_init__(self) -> None:
        if not self.base_delay_s > 0:
            raise ConfigError(f"base_delay_s must be > 0 seconds, not {self.base_delay_s:g}")
        if not self.max_delay_s >= self.base_delay_s:
            raise ConfigError(f"max_delay_s ({self.max_delay_s:g}) is below base_delay_s ({self.base_delay_s:g})",
                              "the cap of the back-off must be >= its first delay")
        if self.max_refusals < 1:
            raise ConfigError(f"max_refusals must be >= 1, not {self.max_refusals}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {self.batch_size}")
        if not 1 <= self.associations <= self.MAX_ASSOCIATIONS:
            raise ConfigError(f"associations must be between 1 and {self.MAX_ASSOCIATIONS}, "
                              f"not {self.associations}")


@dataclass(frozen=True)
class Delivery:
    """Where one job's outputs stand at one destination (see :func:`read_deliveries`).

    ``failure``: why the first given-up file failed (``None`` when none did); ``last_error``: the
    error of the latest failed try of a file still pending; ``next_attempt_at``: unix time (s) of
    the next try of a pending file; ``producing``: the job is still making outputs, so more files
    will come (:meth:`Dispatcher.open_job`).
    """

    destination: str
    sent: int
    pending: int
    failed: int
    failure: str | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    producing: bool = False

    @property
    def state(self) -> str:
        """``"pending"`` (something still to try, or more files to come), ``"failed"`` (some file
        given up) or ``"sent"``."""
        return "pending" if self.pending or self.producing else "failed" if self.failed else "sent"


def delivery_state(deliveries: Iterable[Delivery]) -> str:
    """A job's dispatch over all its destinations: ``"unknown"`` (nothing enqueued), ``"pending"``,
    ``"failed"`` (nothing left to try and some file was given up) or ``"sent"``."""
    states = {d.state for d in deliveries}
    if not states:
        return "unknown"
    return "pending" if "pending" in states else "failed" if "failed" in states else "sent"


_DELIVERY_SQL = """
SELECT job_id, destination, coalesce(sum(state='sent'), 0), coalesce(sum(state='pending'), 0),
       coalesce(sum(state='failed'), 0),
       (SELECT last_error FROM outbox f WHERE f.job_id=o.job_id AND f.destination=o.destination
          AND f.state='failed' ORDER BY f.path LIMIT 1),
       (SELECT last_error FROM outbox p WHERE p.job_id=o.job_id AND p.destination=o.destination
          AND p.state='pending' AND p.last_error IS NOT NULL ORDER BY p.next_attempt_at DESC LIMIT 1),
       min(CASE WHEN state='pending' THEN next_attempt_at END),
       {producing}
FROM outbox o {where} GROUP BY job_id, destination ORDER BY job_id, destination
"""
_PRODUCING_SQL = "EXISTS (SELECT 1 FROM outbox_open x WHERE x.job_id=o.job_id)"


def _deliveries(conn: sqlite3.Connection, job_ids: list[str] | None) -> dict[str, list[Delivery]]:
    """job id -> its :class:`Delivery` per destination, read on ``conn`` (``None``: every job)."""
    out: dict[str, list[Delivery]] = {}
    producing = _PRODUCING_SQL if _has_table(conn, "outbox_open") else "0"  # an index from before
    chunks = [None] if job_ids is None else [job_ids[k:k + 500] for k in range(0, len(job_ids), 500)]
    for chunk in chunks:
        where = "" if chunk is None else f"WHERE job_id IN ({','.join('?' * len(chunk))})"
        for job_id, *row in conn.execute(_DELIVERY_SQL.format(where=where, producing=producing), chunk or ()):
            row[-1] = bool(row[-1])
            out.setdefault(job_id, []).append(Delivery(*row))
    return out


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _has_outbox(conn: sqlite3.Connection) -> bool:
    return _has_table(conn, "outbox")


def read_deliveries(db_path: str | os.PathLike, job_ids: Iterable[str] | None = None
                    ) -> dict[str, list[Delivery]]:
    """Delivery of ``job_ids`` (``None``: every job) per destination, from the index file, read-only.

    For ``qsmnode jobs``: it opens its own read-only connection (WAL: safe beside a running node)
    and needs no :class:`Dispatcher`. Jobs with nothing in the outbox are absent.
    """
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30.0)
    try:
        if not _has_outbox(conn):
            return {}
        return _deliveries(conn, None if job_ids is None else list(job_ids))
    finally:
        conn.close()


class OutputsMissing(QsmNodeError):
    """Files that wait for delivery are gone from the node's storage: the job must be run again."""


def requeue_deliveries(db_path: str | os.PathLike, job_id: str) -> int:
    """Deliver ``job_id``'s undelivered files again, now: given-up files become pending with their
    counts reset, pending ones are due at once. Returns the number of files queued.

    Works on the index file (a running node's dispatcher picks the files up within seconds, a
    stopped one on start). Raises :class:`OutputsMissing` (and changes nothing) when one of the
    files is no longer on disk.
    """
    conn = sqlite3.connect(str(db_path), timeout=30.0, isolation_level=None)
    try:
        if not _has_outbox(conn):
            return 0
        with _Tx(conn) as db:
            paths = [p for (p,) in db.execute(
                "SELECT path FROM outbox WHERE job_id=? AND state IN ('failed','pending')", (job_id,))]
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                raise OutputsMissing(f"job {job_id}: {len(missing)} of its undelivered files are gone, "
                                     f"e.g. {missing[0]}")
            _requeue(db, job_id, time.time())
        return len(paths)
    finally:
        conn.close()


def _requeue(db: sqlite3.Connection, job_id: str, now: float, destination: str | None = None) -> None:
    """In a transaction: ``job_id``'s failed files (at ``destination``, or all) pending again with
    fresh counts; with no ``destination``, its pending files due at ``now`` too."""
    dest_clause, args = ("AND destination=?", (destination,)) if destination else ("", ())
    db.execute("UPDATE outbox SET state='pending', attempts=0, refusals=0, next_attempt_at=?, "
               f"last_error=NULL WHERE job_id=? {dest_clause} AND state='failed'", (now, job_id, *args))
    if destination is None:
        db.execute("UPDATE outbox SET next_attempt_at=? WHERE job_id=? AND state='pending' "
                   "AND next_attempt_at>?", (now, job_id, now))


class Dispatcher:
    """Persistent outbox and the threads that empty it (see the module docstring).

    ``db_path``: the node's SQLite index file (the table ``outbox`` is created in it, WAL mode).
    ``local_ae_title``: our calling AE title. ``metrics``: a :class:`~qsmnode.node.metrics.NodeMetrics`
    (or ``None``). ``audit``: an :class:`~qsmnode.node.audit.AuditLog` (or ``None``).
    ``base_delay_s``, ``max_delay_s``, ``max_refusals``, ``batch_size``, ``associations``: see
    :class:`DispatchSettings` (the defaults are its defaults; invalid values raise ConfigError).
    ``on_job_done(job_id, state, reason)`` is called (from a worker thread) when a job's dispatch
    ends, ``state`` ``"sent"`` or ``"failed"``. Files that another process puts back in the outbox
    (``qsmnode retry``, :func:`requeue_deliveries`) are picked up within ``poll_s`` seconds.

    A job may hand over its outputs in pieces (one series at a time, while it makes the next):
    :meth:`open_job` when a run of the job starts, :meth:`enqueue` per piece, :meth:`close_job`
    when the run ends (done or failed). While a job is open its delivery stays ``"pending"``
    (``Delivery.producing``) even when every file enqueued so far is sent: it is ``"sent"`` (and
    ``on_job_done`` is called) only once the job is closed and everything it enqueued is sent.
    A job that is enqueued without :meth:`open_job` is complete with its first enqueue (as before).
    """

    #: how often (s) a running dispatcher looks for destinations with pending files but no worker
    poll_s = 2.0

    def __init__(self, db_path: str | os.PathLike, local_ae_title: str, metrics=None, audit=None, *,
                 base_delay_s: float = DispatchSettings.base_delay_s,
                 max_delay_s: float = DispatchSettings.max_delay_s,
                 max_refusals: int = DispatchSettings.max_refusals,
                 batch_size: int = DispatchSettings.batch_size,
                 associations: int = DispatchSettings.associations,
                 on_job_done: Callable[[str, str, str | None], None] | None = None) -> None:
        if not local_ae_title or len(local_ae_title) > 16:
            raise ConfigError(f"local AE title {local_ae_title!r} is not valid",
                              "an AE title has 1 to 16 characters")
        settings = DispatchSettings(float(base_delay_s), float(max_delay_s), int(max_refusals),
                                    int(batch_size), int(associations))
        self.db_path = Path(db_path)
        self.local_ae_title = local_ae_title
        self.metrics = metrics
        self.audit = audit
        self.base_delay_s = settings.base_delay_s
        self.max_delay_s = settings.max_delay_s
        self.max_refusals = settings.max_refusals
        self.batch_size = settings.batch_size
        self.associations = settings.associations
        self.on_job_done = on_job_done
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: dict[str, threading.Thread] = {}
        self._wake: dict[str, threading.Event] = {}
        self._assocs: set[Any] = set()
        self._watcher: threading.Thread | None = None
        self._running = False
        self._local = threading.local()
        self._finish_lock = threading.Lock()
        self._announced: dict[tuple[str, str | None], str] = {}  # (job, destination or None) -> state said
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(_SCHEMA)
        self._update_pending_gauge()

    # ------------------------------------------------------------------ storage
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit, WAL, synchronous=FULL, 30 s busy timeout)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def _db(self) -> "_Tx":
        """A write transaction on this thread's connection: ``with self._db() as db: ...``."""
        return _Tx(self._conn())

    def _query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        return self._conn().execute(sql, tuple(args)).fetchall()

    def _update_pending_gauge(self) -> None:
        if self.metrics is not None and hasattr(self.metrics, "outbox_pending"):
            (n,), = self._query("SELECT count(*) FROM outbox WHERE state='pending'")
            self.metrics.outbox_pending.set(n)

    # ------------------------------------------------------------------ public API
    def open_job(self, job_id: str) -> None:
        """A run of ``job_id`` starts making outputs: hold its delivery open until :meth:`close_job`.

        What an earlier run of the job left in the outbox is dropped (sent, pending or given up):
        the new run replaces those files and enqueues them again, so each is sent once more (same
        SOP Instance UIDs, which the destination stores once). A batch being sent at this moment
        still goes out; its results no longer change anything. Durable: a node that crashes keeps
        the job open until its next run opens it again.
        """
        now = time.time()
        with self._finish_lock:
            with self._db() as db:
                db.execute("DELETE FROM outbox WHERE job_id=?", (job_id,))
                db.execute("INSERT OR REPLACE INTO outbox_open(job_id, opened_at) VALUES (?,?)", (job_id, now))
            self._forget_announced(job_id)
        self._update_pending_gauge()

    def close_job(self, job_id: str) -> None:
        """The run of ``job_id`` has made all the outputs it will make (done or failed): its delivery
        is decided by the files enqueued so far. When they are all settled already, the job's
        dispatch ends now (audit record, ``on_job_done``)."""
        with self._db() as db:
            db.execute("DELETE FROM outbox_open WHERE job_id=?", (job_id,))
        for (name,) in self._query("SELECT DISTINCT destination FROM outbox WHERE job_id=? ORDER BY destination",
                                   (job_id,)):
            try:
                dest = self._destination(name)
            except Exception:  # noqa: BLE001 - no stored configuration: nothing to say about it
                continue
            self._finish_job_if_done(job_id, dest, 0.0)

    def job_open(self, job_id: str) -> bool:
        """True while a run of ``job_id`` is making outputs (between :meth:`open_job` and :meth:`close_job`)."""
        return bool(self._query("SELECT 1 FROM outbox_open WHERE job_id=?", (job_id,)))

    def _forget_announced(self, job_id: str) -> None:
        for key in [k for k in self._announced if k[0] == job_id]:
            del self._announced[key]

    def enqueue(self, job_id: str, destination: Destination, paths: list[Path]) -> None:
        """Put ``paths`` (DICOM Part 10 files) in the outbox for ``destination``, durably.

        Idempotent per (job_id, destination): files already there keep their state, so calling
        it twice sends once. Files of that (job, destination) that had failed are set pending
        again (this is how a job's dispatch is retried). Raises ``ValueError`` naming the file
        when one is not a readable DICOM file with SOP class, SOP instance and transfer syntax.
        """
        from pydicom.filereader import read_file_meta_info

        rows = []
        for p in paths:
            p = Path(p).resolve()
            try:
                meta = read_file_meta_info(p)
                row = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                       str(meta.MediaStorageSOPInstanceUID))
            except Exception as err:
                raise ValueError(f"cannot dispatch {p}: not a DICOM Part 10 file with file meta "
                                 f"information ({type(err).__name__}: {err}); the writer must "
                                 "produce complete files") from err
            rows.append((str(p),) + row)
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO outbox_destination(name, config_json, updated_at) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET config_json=excluded.config_json, "
                       "updated_at=excluded.updated_at",
                       (destination.name, json.dumps(asdict(destination)), now))
            db.executemany(
                "INSERT OR IGNORE INTO outbox(job_id, destination, path, sop_class_uid, "
                "transfer_syntax_uid, sop_instance_uid, state, next_attempt_at, created_at) "
                "VALUES (?,?,?,?,?,?,'pending',?,?)",
                [(job_id, destination.name, p, c, t, s, now, now) for p, c, t, s in rows])
            _requeue(db, job_id, now, destination.name)
        with self._finish_lock:
            self._forget_announced(job_id)
        self._update_pending_gauge()
        if self.audit is not None:
            self.audit.record("dispatch_queued", job_id=job_id, destination=destination.name,
                              instances=len(rows))
        if self._running:
            self._ensure_worker(destination.name)
            wake = self._wake.get(destination.name)
            if wake is not None:
                wake.set()

    def start(self) -> None:
        """Start one worker per destination with pending files (and later ones on enqueue)."""
        with self._lock:
            if self._running:
                return
            self._stop.clear()
            self._running = True
        self._start_pending_workers()
        self._watcher = threading.Thread(target=self._watch, name="qsmnode-dispatch-watch", daemon=True)
        self._watcher.start()

    def _start_pending_workers(self) -> None:
        for (name,) in self._query("SELECT DISTINCT destination FROM outbox WHERE state='pending'"):
            self._ensure_worker(name)

    def _watch(self) -> None:
        """Start workers for files that another process put back in the outbox (``qsmnode retry``)."""
        while not self._stop.wait(self.poll_s):
            try:
                self._start_pending_workers()
            except Exception:  # a locked index now and then: try again at the next poll
                log.debug("dispatch watch: cannot read the outbox", exc_info=True)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every worker promptly: open associations are aborted, unsent files stay pending."""
        with self._lock:
            self._running = False
            self._stop.set()
            for ev in self._wake.values():
                ev.set()
            for assoc in list(self._assocs):
                try:
                    assoc.abort()
                except Exception:  # already gone
                    pass
            workers = list(self._workers.values()) + ([self._watcher] if self._watcher else [])
        deadline = time.monotonic() + timeout_s
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._workers = {k: t for k, t in self._workers.items() if t.is_alive()}

    def pending(self) -> int:
        """Files still to be delivered (all jobs, all destinations)."""
        (n,), = self._query("SELECT count(*) FROM outbox WHERE state='pending'")
        return n

    def job_dispatched(self, job_id: str) -> bool:
        """True when every destination of ``job_id`` has every file (False if none was enqueued, or
        while the job is open: more files to come)."""
        (total, sent), = self._query(
            "SELECT count(*), coalesce(sum(state='sent'), 0) FROM outbox WHERE job_id=?", (job_id,))
        return total > 0 and total == sent and not self.job_open(job_id)

    def job_state(self, job_id: str) -> str:
        """``"unknown"`` (nothing enqueued), ``"pending"`` (something still to try, or the job is
        open: more files to come), ``"failed"`` (nothing left to try and some file was given up) or
        ``"sent"`` (everything delivered)."""
        return delivery_state(self.job_deliveries(job_id))

    def job_deliveries(self, job_id: str) -> list[Delivery]:
        """Where ``job_id``'s files stand, per destination (see :class:`Delivery`)."""
        return _deliveries(self._conn(), [job_id]).get(job_id, [])

    def job_failures(self, job_id: str) -> list[str]:
        """One line per failed file of ``job_id``: destination, file, SOP instance and why."""
        return [f"{d}: {Path(p).name} (SOP instance {u}): {e}" for d, p, u, e in self._query(
            "SELECT destination, path, sop_instance_uid, last_error FROM outbox "
            "WHERE job_id=? AND state='failed' ORDER BY destination, path", (job_id,))]

    def health(self) -> dict[str, Any]:
        """For ``/healthz``: files pending per destination, the oldest one's age (s), the last error.

        ``{"running": bool, "outbox_pending": int, "destinations": {name: {"pending", "oldest_pending_s",
        "failed_attempts", "last_error"}}}``; a destination with nothing pending is not listed.
        """
        now = time.time()
        dests: dict[str, Any] = {}
        for name, n, oldest, attempts in self._query(
                "SELECT destination, count(*), min(created_at), max(attempts) FROM outbox "
                "WHERE state='pending' GROUP BY destination"):
            err = self._query("SELECT last_error FROM outbox WHERE destination=? AND state='pending' "
                              "AND last_error IS NOT NULL ORDER BY next_attempt_at DESC LIMIT 1", (name,))
            dests[name] = {"pending": n, "oldest_pending_s": round(now - oldest, 1),
                           "failed_attempts": attempts, "last_error": err[0][0] if err else None}
        return {"running": self._running, "outbox_pending": sum(d["pending"] for d in dests.values()),
                "destinations": dests}

    def __enter__(self) -> "Dispatcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ workers
    def _ensure_worker(self, name: str) -> None:
        with self._lock:
            if not self._running:
                return
            self._wake.setdefault(name, threading.Event())
            t = self._workers.get(name)
            if t is not None and t.is_alive():
                return
            t = threading.Thread(target=self._worker, args=(name,), name=f"qsmnode-dispatch-{name}",
                                 daemon=True)
            self._workers[name] = t
            t.start()

    def _destination(self, name: str) -> Destination:
        (cfg,), = self._query("SELECT config_json FROM outbox_destination WHERE name=?", (name,))
        return Destination(**json.loads(cfg))

    def _worker(self, name: str) -> None:
        wake = self._wake[name]
        while not self._stop.is_set():
            wake.clear()
            try:
                if self._run_batch(name):
                    continue
                rows = self._query("SELECT min(next_attempt_at) FROM outbox WHERE destination=? "
                                   "AND state='pending'", (name,))
                nxt = rows[0][0] if rows else None
                wait = 5.0 if nxt is None else min(5.0, max(0.0, nxt - time.time()))
            except Exception:  # never let a bug or a locked index kill the worker: log, back off
                log.exception("dispatch worker %s: unexpected error; retrying", name)
                wait = self.base_delay_s
            wake.wait(wait)

    def _due(self, name: str) -> list[_Item]:
        rows = self._query(
            "SELECT rowid, job_id, path, sop_class_uid, transfer_syntax_uid, sop_instance_uid, "
            "attempts, refusals, created_at FROM outbox WHERE destination=? AND state='pending' "
            "AND next_attempt_at<=? ORDER BY created_at, job_id, path LIMIT ?",
            (name, time.time(), self.batch_size))
        return [_Item(*r) for r in rows]

    def _run_batch(self, name: str) -> bool:
        items = self._due(name)
        if not items:
            return False
        dest = self._destination(name)
        t0 = time.monotonic()
        try:
            if dest.kind == "dimse":
                results = self._send_dimse(dest, items)
            else:
                results = self._send_stow(dest, items)
        except _Transient as err:
            done = err.partial
            if done:
                self._record_results(dest, [i for i in items if i.rowid in done], done,
                                     time.monotonic() - t0)
            rest = [i for i in items if i.rowid not in done]
            if rest and not self._stop.is_set():  # stop() aborting is no failure of the destination
                self._schedule_retry(dest, rest, str(err))
            return False
        self._record_results(dest, items, results, time.monotonic() - t0)
        return True

    def _schedule_retry(self, dest: Destination, items: list[_Item], reason: str) -> None:
        attempt = max(i.attempts for i in items) + 1
        delay = backoff_delay_s(attempt, self.base_delay_s, self.max_delay_s, self._rng)
        when = time.time() + delay
        with self._db() as db:
            db.executemany("UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? "
                           "WHERE rowid=? AND created_at=? AND state='pending'",
                           [(when, reason, i.rowid, i.created_at) for i in items])
            # the destination is down for every other pending file too: do not hammer it
            db.execute("UPDATE outbox SET next_attempt_at=? WHERE destination=? AND state='pending' "
                       "AND next_attempt_at<?", (when, dest.name, when))
        if self.metrics is not None:
            self.metrics.dispatch_retries.labels(destination=dest.name).inc()
        if self.audit is not None:
            self.audit.record("dispatch_retry", destination=dest.name, attempt=attempt,
                              retry_in_s=round(delay, 3), instances=len(items),
                              job_ids=sorted({i.job_id for i in items}), reason=reason)
        log.warning("dispatch to %s failed (attempt %d, %d file(s)): %s; next try in %.1f s, at %s",
                    dest.describe(), attempt, len(items), reason, delay,
                    time.strftime("%H:%M:%S", time.localtime(when)))

    def _record_results(self, dest: Destination, items: list[_Item],
                        results: dict[int, str | None], seconds: float) -> None:
        """``results``: rowid -> None (delivered) or the refusal; rows missing were not tried."""
        now = time.time()
        sent, refused, gave_up = [], [], []
        for i in items:
            if i.rowid not in results:
                continue
            err = results[i.rowid]
            # rowid and created_at: a row that open_job dropped (and whose rowid a new row got)
            # is not touched
            if err is None:
                sent.append((now, i.rowid, i.created_at))
            elif i.refusals + 1 >= self.max_refusals:
                gave_up.append((f"{err}; refused {i.refusals + 1} times, gave up", i.rowid, i.created_at))
            else:
                delay = backoff_delay_s(i.refusals + 1, self.base_delay_s, self.max_delay_s, self._rng)
                refused.append((now + delay, err, i.rowid, i.created_at))
        with self._finish_lock:  # new results: the jobs' outcome may be said again (a retry)
            for job_id in {i.job_id for i in items if i.rowid in results}:
                self._forget_announced(job_id)
        with self._db() as db:
            db.executemany("UPDATE outbox SET state='sent', sent_at=?, last_error=NULL "
                           "WHERE rowid=? AND created_at=?", sent)
            db.executemany("UPDATE outbox SET attempts=attempts+1, refusals=refusals+1, "
                           "next_attempt_at=?, last_error=? WHERE rowid=? AND created_at=?", refused)
            db.executemany("UPDATE outbox SET state='failed', attempts=attempts+1, "
                           "refusals=refusals+1, last_error=? WHERE rowid=? AND created_at=?", gave_up)
        if self.metrics is not None:
            m = self.metrics
            m.stage_seconds.labels(stage="dispatch").observe(seconds)
            if sent:
                m.dispatched_instances.labels(destination=dest.name, outcome="sent").inc(len(sent))
            if gave_up:
                m.dispatched_instances.labels(destination=dest.name, outcome="failed").inc(len(gave_up))
            if refused:
                m.dispatch_retries.labels(destination=dest.name).inc()
        if refused and self.audit is not None:
            self.audit.record("dispatch_retry", destination=dest.name, instances=len(refused),
                              job_ids=sorted({i.job_id for i in items if results.get(i.rowid)}),
                              reason=refused[0][1])
        self._update_pending_gauge()
        for job_id in sorted({i.job_id for i in items}):
            self._finish_job_if_done(job_id, dest, seconds)

    def _finish_job_if_done(self, job_id: str, dest: Destination, batch_seconds: float) -> None:
        """When ``job_id`` is closed and every file of it at ``dest`` is settled: say so (audit, log),
        once; when that settles the whole job, call ``on_job_done`` (once per outcome)."""
        with self._finish_lock:
            if self.job_open(job_id):
                return  # more files to come: the job is not delivered yet
            (total, sent, failed, first, last, attempts), = self._query(
                "SELECT count(*), coalesce(sum(state='sent'),0), coalesce(sum(state='failed'),0), "
                "min(created_at), max(sent_at), max(attempts) FROM outbox WHERE job_id=? AND destination=?",
                (job_id, dest.name))
            if total == 0 or sent + failed < total:
                return
            dest_state = "failed" if failed else "sent"
            if self._announced.get((job_id, dest.name)) != dest_state:
                self._announced[(job_id, dest.name)] = dest_state
                if failed:
                    reasons = self.job_failures(job_id)
                    if self.audit is not None:
                        self.audit.record("dispatch_failed", job_id=job_id, destination=dest.name,
                                          failed=failed, sent=sent, reason=reasons[0] if reasons else "")
                    log.error("job %s: %d of %d files could not be delivered to %s: %s", job_id, failed,
                              total, dest.describe(), reasons[0] if reasons else "")
                elif self.audit is not None:
                    self.audit.record("sent", job_id=job_id, destination=dest.name, instances=total,
                                      seconds_since_queued=round((last or time.time()) - first, 3),
                                      batch_seconds=round(batch_seconds, 3), failed_attempts=attempts)
            state = self.job_state(job_id)
            if state not in ("sent", "failed") or self._announced.get((job_id, None)) == state:
                return
            self._announced[(job_id, None)] = state
        if self.on_job_done is not None:
            try:
                self.on_job_done(job_id, state, "; ".join(self.job_failures(job_id)) or None)
            except Exception:
                log.exception("on_job_done callback raised for job %s", job_id)

    # ------------------------------------------------------------------ DIMSE
    def _contexts(self, items: list[_Item]):
        from pynetdicom.presentation import build_context

        by_class: dict[str, set[str]] = {}
        for i in items:
            by_class.setdefault(i.sop_class_uid, set()).add(i.transfer_syntax_uid)
        contexts = []
        for sop_class in sorted(by_class):
            contexts.append(build_context(sop_class, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]))
            for ts in sorted(by_class[sop_class] - {EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN}):
                contexts.append(build_context(sop_class, [ts]))  # its own context, so the SCP keeps it
        return contexts

    def _send_dimse(self, dest: Destination, items: list[_Item]) -> dict[int, str | None]:
        """Send ``items`` over up to ``associations`` concurrent associations; rowid -> result."""
        # at most MAX_CONTEXTS per association: send only the items whose contexts fit
        contexts = self._contexts(items)
        if len(contexts) > MAX_CONTEXTS:
            contexts = contexts[:MAX_CONTEXTS]
            allowed = {(c.abstract_syntax, ts) for c in contexts for ts in c.transfer_syntax}
            items = [i for i in items if (i.sop_class_uid, EXPLICIT_VR_LITTLE_ENDIAN) in allowed
                     or (i.sop_class_uid, i.transfer_syntax_uid) in allowed]
        n = max(1, min(self.associations, len(items) // 16))  # small batches: one association
        chunks = [items[k::n] for k in range(n)]
        results: dict[int, str | None] = {}
        errors: list[_Transient] = []
        # the first association alone: when the destination is down, one attempt (and one log
        # line) per retry, not n
        first = self._open_association(dest, contexts)

        def run(chunk: list[_Item], assoc=None) -> None:
            try:
                results.update(self._send_dimse_one(dest, chunk, contexts, assoc))
            except _Transient as err:
                results.update(err.partial)
                errors.append(err)

        threads = [threading.Thread(target=run, args=(c,), name=f"qsmnode-dispatch-{dest.name}-{k}",
                                    daemon=True) for k, c in enumerate(chunks[1:], start=1)]
        for t in threads:
            t.start()
        run(chunks[0], first)
        for t in threads:
            t.join()
        if errors:
            raise _Transient(str(errors[0]), partial=results)
        return results

    def _open_association(self, dest: Destination, contexts):
        """An established association with ``dest`` proposing ``contexts``; ``_Transient`` if not."""
        from pynetdicom import AE

        ae = AE(ae_title=self.local_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
        ae.connection_timeout = min(dest.timeout_s, 10.0)
        ae.requested_contexts = contexts
        tls_args = None
        if dest.tls:
            tls_args = (dest.ssl_context(), dest.tls_server_hostname or dest.host)
        _PEER_ERRORS.install()
        since = time.time()
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        except Exception as err:
            raise _Transient(f"cannot connect to {dest.describe()}: {type(err).__name__}: {err}") from err
        if not assoc.is_established:
            # pynetdicom negotiates in this thread and connects in the association's DUL thread
            cause = _PEER_ERRORS.take((threading.current_thread(), assoc.dul), since)
            if assoc.is_rejected:
                raise _Transient(f"{dest.describe()} rejected the association ({cause + '; ' if cause else ''}"
                                 f"is our AE title {self.local_ae_title!r} allowed there?)")
            raise _Transient(f"cannot associate with {dest.describe()}: "
                             f"{cause or 'connection refused, aborted or timed out'}")
        with self._lock:
            self._assocs.add(assoc)
        if self._stop.is_set():
            assoc.abort()
        prepare_scu_association(assoc)
        return assoc

    def _send_dimse_one(self, dest: Destination, items: list[_Item], contexts, assoc=None
                        ) -> dict[int, str | None]:
        """One association (``assoc`` or a new one): C-STORE every item; rowid -> None or the refusal."""
        if assoc is None:
            assoc = self._open_association(dest, contexts)
        results: dict[int, str | None] = {}
        try:
            self._store_all(dest, assoc, items, results)
        except _Transient as err:
            err.partial = dict(results)
            raise
        finally:
            if assoc.is_established:
                assoc.release()
            with self._lock:
                self._assocs.discard(assoc)
        return results

    def _store_all(self, dest: Destination, assoc, items: list[_Item], results: dict) -> None:
        """C-STORE each item on ``assoc``, filling ``results`` (rowid -> None or the refusal)."""
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        for i in items:
            if self._stop.is_set():
                break
            if not Path(i.path).is_file():
                results[i.rowid] = f"file {i.path} is missing from the node's storage"
                continue
            classes = {a for a, _ in accepted}
            if i.sop_class_uid not in classes:
                results[i.rowid] = (f"{dest.name} accepted no presentation context for SOP class "
                                    f"{i.sop_class_uid}")
                continue
            try:
                status = self._c_store(assoc, i, accepted)
            except (RuntimeError, ConnectionError, OSError) as err:
                if self._stop.is_set():
                    break
                raise _Transient(f"{dest.describe()}: association lost while sending "
                                 f"({type(err).__name__}: {err})") from err
            except Exception as err:  # this file cannot be encoded for any accepted context
                results[i.rowid] = (f"cannot send {Path(i.path).name} in a transfer syntax "
                                    f"{dest.name} accepts: {type(err).__name__}: {err}")
                continue
            if status is None or "Status" not in status:  # empty dataset: no response
                if not assoc.is_established:
                    raise _Transient(f"{dest.describe()} dropped the association "
                                     "(no C-STORE response)")
                results[i.rowid] = "no C-STORE response within the timeout"
                continue
            code = int(getattr(status, "Status", 0xC000))
            if code == 0x0000 or code in (0xB000, 0xB006, 0xB007, 0x0111):
                results[i.rowid] = None  # success, warning, or already stored there
            else:
                comment = getattr(status, "ErrorComment", "")
                results[i.rowid] = _status_text(code) + (f": {comment}" if comment else "")

    @staticmethod
    def _c_store(assoc, item: _Item, accepted: set[tuple[str, str]]):
        if (item.sop_class_uid, item.transfer_syntax_uid) in accepted or item.transfer_syntax_uid in _UNCOMPRESSED:
            return assoc.send_c_store(Path(item.path))  # pynetdicom converts between uncompressed syntaxes
        # compressed file, and the peer did not accept its transfer syntax: send it decompressed
        import pydicom

        ds = pydicom.dcmread(item.path)
        ds.decompress()
        return assoc.send_c_store(ds)

    # ------------------------------------------------------------------ DICOMweb
    def _send_stow(self, dest: Destination, items: list[_Item]) -> dict[int, str | None]:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if dest.tls_ca_file:
            session.verify = dest.tls_ca_file
        if dest.tls_cert_file:
            session.cert = (dest.tls_cert_file, dest.tls_key_file) if dest.tls_key_file else dest.tls_cert_file
        client = DICOMwebClient(dest.url, session=session, timeout=dest.timeout_s)
        client.set_http_retry_params(retry=False)  # we do our own back-off
        results: dict[int, str | None] = {}
        todo: list[_Item] = []
        datasets = []
        for i in items:
            try:
                datasets.append(pydicom.dcmread(i.path))
                todo.append(i)
            except FileNotFoundError:
                results[i.rowid] = f"file {i.path} is missing from the node's storage"
        chunk = 50  # instances per STOW-RS request: bounded request size
        for start in range(0, len(todo), chunk):
            if self._stop.is_set():
                break
            part, part_ds = todo[start:start + chunk], datasets[start:start + chunk]
            try:
                response = client.store_instances(part_ds)
                failed = self._stow_failures(response)
            except requests.HTTPError as err:
                code = err.response.status_code if err.response is not None else 0
                if code in (408, 429) or code >= 500 or code == 0:
                    raise _Transient(f"STOW-RS to {dest.describe()} answered HTTP {code}") from err
                failed = self._stow_failures_from_body(err.response)
                if not failed:
                    failed = {i.sop_instance_uid: f"STOW-RS answered HTTP {code}: "
                              f"{err.response.text[:200] if err.response is not None else ''}" for i in part}
            except (requests.ConnectionError, requests.Timeout) as err:
                raise _Transient(f"cannot reach {dest.describe()}: {type(err).__name__}: {err}") from err
            for i in part:
                results[i.rowid] = failed.get(i.sop_instance_uid)
        return results

    @staticmethod
    def _stow_failures(response) -> dict[str, str]:
        out = {}
        for item in getattr(response, "FailedSOPSequence", []) or []:
            reason = int(getattr(item, "FailureReason", 0xC000))
            out[str(item.ReferencedSOPInstanceUID)] = "STOW-RS " + _status_text(reason).replace("C-STORE ", "")
        return out

    @classmethod
    def _stow_failures_from_body(cls, response) -> dict[str, str]:
        if response is None:
            return {}
        try:
            import pydicom

            ds = pydicom.Dataset.from_json(response.json())
        except Exception:
            return {}
        return cls._stow_failures(ds)


class _PeerErrors(logging.Filter):
    """Remembers pynetdicom's error lines by thread, to say in one line why an association failed.

    pynetdicom tells why a connection failed (``TCP Initialisation Error: [Errno 111] Connection
    refused``, a TLS error, the A-ASSOCIATE-RJ reason) only in its log, from the thread that asks
    for the association (negotiation) and the association's DUL thread (connection). The node
    keeps those records off its log (:func:`qsmnode.node.serve.setup_logging`) and logs one
    warning per failed try, with the cause taken from here. Attached to pynetdicom's loggers, the
    filter lets every record through; it keeps the ERROR messages of the latest threads only, by
    thread id and name (a finished DUL thread's id is soon reused by the next one, its name
    ``Thread-N (...)`` is not).
    """

    LOGGERS = ("pynetdicom.transport", "pynetdicom.acse")
    #: lines that say that something failed but not what
    GENERIC = frozenset({"Association request failed: unable to connect to remote",
                         "Association Rejected", "Aborting Association"})
    MAX_THREADS = 64

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._by_thread: dict[tuple[int | None, str], list[tuple[float, str]]] = {}

    def install(self) -> None:
        """Attach to pynetdicom's loggers (once)."""
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            message = record.getMessage().removeprefix("TCP Initialisation Error: ")
            if message not in self.GENERIC:
                key = (record.thread, record.threadName or "")
                with self._lock:
                    self._by_thread.setdefault(key, []).append((record.created, message))
                    while len(self._by_thread) > self.MAX_THREADS:  # forget the oldest thread
                        del self._by_thread[next(iter(self._by_thread))]
        return True

    def take(self, threads: Iterable[threading.Thread | None], since: float) -> str:
        """The messages of ``threads`` logged at or after ``since`` (unix s), joined with "; ";
        forgets them."""
        with self._lock:
            lines = [m for t in threads if t is not None
                     for when, m in self._by_thread.pop((t.ident, t.name), []) if when >= since]
        return "; ".join(dict.fromkeys(lines))  # each once, in order


_PEER_ERRORS = _PeerErrors()


def prepare_scu_association(assoc) -> None:
    """Ready an established association that this program opened as a C-STORE SCU (the
    dispatcher's, ``qsmnode send``'s): quick TCP (:func:`_tune_socket`) and no lost C-STORE
    responses (:func:`_keep_responses`, pynetdicom issue #875)."""
    _tune_socket(assoc)
    _keep_responses(assoc)


def _tune_socket(assoc) -> None:
    """TCP_NODELAY on our side, quick ACKs of the peer's segments (:mod:`qsmnode.node.tcp`).

    pynetdicom writes each C-STORE as separate P-DATA PDUs (command, then data set); with Nagle
    on, the second waits for the peer's delayed ACK (40 ms+ on Linux). A PACS that leaves Nagle on
    (Orthanc 1.10 as shipped) writes its C-STORE response in two segments: without quick ACKs each
    C-STORE costs ~48 ms (~21/s per association), with them ~6 ms on loopback.
    """
    try:
        sock = assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc.dul.socket.socket = quick_ack(sock)
    except (AttributeError, OSError):  # not a TCP socket (or already closed): leave it as it is
        pass


def _keep_responses(assoc) -> None:
    """Work around a race in pynetdicom (3.0; its issues #842, #850, #875): a C-STORE response lost.

    ``send_c_store`` pauses the association's reactor thread by clearing an event and waiting for
    the reactor's ``_is_paused`` flag; right after the previous C-STORE the flag can still be True
    from the reactor's last pause, so the next request goes out while the reactor runs on. The
    reactor then takes the response off the DIMSE queue, logs "Received unexpected C-STORE service
    message" and drops it; ``send_c_store`` waits for it until the DIMSE timeout (30 s) and the
    association is aborted. The more threads compete for the GIL the likelier it is: with the
    worker enqueuing the next series while a batch is sent, every few hundred C-STOREs on 2 cores.
    Here a response that the reactor takes is put back on the queue, for the ``send_c_store``
    that waits for it; requests from the peer are served as before.
    """
    serve = assoc._serve_request

    def serve_requests_only(msg, context_id) -> None:
        if not msg.is_valid_request and msg.is_valid_response:
            log.debug("pynetdicom's reactor took a %s response (message %s); put back for its request",
                      msg.msg_type, getattr(msg, "MessageIDBeingRespondedTo", "?"))
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_requests_only


class _Tx:
    """``with`` wrapper: BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
