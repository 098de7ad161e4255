"""The durable spool: received instances as files, written so that an acknowledged one survives a crash.

Layout under the storage directory::

    spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm     received instances, bytes exactly as sent
    journal/<generation>.seg                           receive journal (qsmnode.node.journal)
    outputs/<job id>/...                               reconstruction outputs (see worker)

:meth:`Spool.store` makes an instance durable before it returns; the receiver acknowledges only
after that. Two ways, both with one flush on the acknowledgement path:

* journaled (the default, instances up to a quarter of a journal segment): one append and
  ``fdatasync`` to the receive journal, 0.1–0.15 ms. The spool file is written later by
  :meth:`Spool.materialize` (the receiver's indexing thread calls it when the burst pauses, or
  when more than a budget of bytes waits; the tracker calls it before it queues a job), made
  durable in bulk by a ``syncfs`` before the journal segment is recycled. Until then the
  instance is read from memory (:meth:`Spool.pending_data`). :meth:`Spool.open` replays the
  journal after a crash.
* direct (large instances, or ``journal=False``): the file is created under its final name with
  ``O_EXCL`` and ``fdatasync``ed (see :meth:`Spool._store_direct`).

Why later: creating a file is the costly part of storing one (an inode, a directory entry; on
the development VM's journal-less ext4 up to 1 ms of kernel time that no other thread can
preempt), and doing it while the sender waits for the next acknowledgement halved the rate of
one association there (about 800/s against 1,600/s without). Scanners send in bursts; the files
are written in the pause after one.

Two senders of one SOP Instance UID store it once. A file that is on disk but not in the index
(a crash between the two) is validated and indexed again by :meth:`Spool.reconcile`; a partial
one (never acknowledged) is moved to ``quarantine/``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import logging
import threading
from pathlib import Path
from typing import Iterator

from qsmnode.durable import fsync_dir, syncfs, write_all
from qsmnode.node.journal import ReceiveJournal

log = logging.getLogger("qsmnode.spool")

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID: the UID itself when it is a valid UID, else a hash."""
    uid = (uid or "").strip().rstrip("\x00")
    if _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MiB) available to this user on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


class Spool:
    """Received-instance files under ``<storage>/spool`` (see module docstring).

    Call :meth:`open` before the first :meth:`store` (it replays the journal) and :meth:`close`
    on shutdown. ``journal_segment_bytes``: size of one journal segment; instances larger than a
    quarter of it are written directly. ``pending_budget``: bytes of journaled instances that
    may wait in memory for their files (:attr:`over_budget`); the journal keeps enough segments
    ready for that much.
    """

    def __init__(self, storage: str | os.PathLike, *, fsync_directory: bool = False, journal: bool = True,
                 journal_segment_bytes: int = 16 << 20, pending_budget: int = 64 << 20):
        self.storage = Path(storage)
        self.pending_budget = pending_budget
        self.fsync_directory = fsync_directory
        self.root = self.storage / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.journal = ReceiveJournal(self.storage / "journal", segment_bytes=journal_segment_bytes) if journal else None
        self._opened = False
        self._dirs: set[str] = set()
        self._dir_lock = threading.Lock()
        # journaled, not yet written as files: path -> (generation, parts, header_bytes); None while
        # being journaled
        self._pending: dict[Path, tuple[int, tuple, int | None] | None] = {}
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._materialize_lock = threading.Lock()

    # ------------------------------------------------------------------ start / stop
    def open(self) -> int:
        """Replay what the journal holds (instances acknowledged before a crash whose files may
        be missing or incomplete), make it durable, and get ready to store. Returns how many
        journal records were replayed."""
        if self._opened or self.journal is None:
            self._opened = True
            return 0
        records = self.journal.recover()
        for record in records:
            self._write_file(self.root / record.name, (record.data,))
        if records:
            syncfs(self.root)
            log.info("receive journal replayed: %d instance file(s) written again", len(records))
        self.journal.start(spares=-(-self.pending_budget // self.journal.segment_bytes) + 1)
        self._opened = True
        return len(records)

    def close(self) -> None:
        """Write out what is pending and retire the journal, so a clean stop leaves nothing to replay."""
        if self.journal is not None and self._opened:
            self.materialize()
            self.checkpoint(idle=True)
            self.journal.close()
        self._opened = False

    # ------------------------------------------------------------------ paths
    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        return self.root / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def _ensure_dir(self, d: Path, *, again: bool = False) -> None:
        """Create a series folder once (``again``: it was removed, e.g. by retention)."""
        if again or d.name not in self._dirs:
            with self._dir_lock:
                if again or d.name not in self._dirs:
                    created = not d.is_dir()
                    d.mkdir(exist_ok=True)
                    if created:
                        fsync_dir(self.root)
                    self._dirs.add(d.name)

    def exists(self, series_uid: str, sop_uid: str) -> bool:
        path = self.path_for(series_uid, sop_uid)
        return path in self._pending or path.exists()

    def pending_data(self, path: str | os.PathLike, *, header_only: bool = False) -> bytes | None:
        """A stored instance's bytes while its file is not written yet (journaled, see the module
        docstring); None once it is (read the file). ``header_only``: only the leading bytes
        before the pixel data, when the receiver said where they end."""
        with self._pending_lock:
            entry = self._pending.get(Path(path))
        if entry is None:
            return None
        _, parts, header_bytes = entry
        if not (header_only and header_bytes):
            return b"".join(parts)
        out, left = [], header_bytes
        for part in parts:
            out.append(part[:left])
            left -= len(out[-1])
        return b"".join(out)

    @property
    def pending_bytes(self) -> int:
        """Bytes of journaled instances whose files are not written yet (held in memory)."""
        return self._pending_bytes

    @property
    def over_budget(self) -> bool:
        """More than ``pending_budget`` bytes wait for their files: write them now."""
        return self._pending_bytes > self.pending_budget

    # ------------------------------------------------------------------ storing
    def store(self, series_uid: str, sop_uid: str, *parts: bytes | memoryview,
              header_bytes: int | None = None) -> tuple[Path, bool]:
        """Durably store one instance file made of ``parts`` (e.g. File Meta + data set as received).
        Returns (path, stored): stored is False for a duplicate (the instance is already stored or
        being stored; the first copy is kept). Durable when this returns; the file itself may
        appear a moment later (journaled instances, see the module docstring). ``header_bytes``:
        how many leading bytes hold everything but the pixel data, if known
        (:meth:`pending_data` ``header_only``)."""
        if not self._opened:
            raise RuntimeError("Spool.open() must be called before storing")
        path = self.path_for(series_uid, sop_uid)
        with self._pending_lock:
            if path in self._pending or path.exists():
                return path, False
            self._pending[path] = None
        size = sum(len(p) for p in parts)
        try:
            if self.journal is not None and size + 1024 <= self.journal.max_payload:
                generation = self.journal.append(str(path.relative_to(self.root)), parts)
                with self._pending_lock:
                    self._pending[path] = (generation, parts, header_bytes)
                    self._pending_bytes += size
                return path, True
        except BaseException:
            with self._pending_lock:
                self._pending.pop(path, None)
            raise
        try:
            return self._store_direct(path, parts)
        finally:
            with self._pending_lock:
                self._pending.pop(path, None)

    def _store_direct(self, path: Path, parts) -> tuple[Path, bool]:
        """Create the file under its final name with ``O_EXCL`` and ``fdatasync`` it: one journal
        commit of the file system. On journaling file systems (ext4, xfs) that commit carries the
        new directory entry too, because the entry and the inode are created in one transaction;
        ``fsync_directory=True`` adds the POSIX-strict folder fsync for other file systems (it
        doubles the cost). A crash mid-write leaves a partial file that was never acknowledged:
        :meth:`reconcile` validates unindexed files and drops broken ones."""
        try:
            fd = self._open_in_series_dir(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return path, False
        try:
            write_all(fd, parts)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        if self.fsync_directory:
            fsync_dir(path.parent)
        return path, True

    def _open_in_series_dir(self, path: Path, flags: int) -> int:
        """``os.open`` a file in its series folder, creating the folder first (and again when
        retention removed it meanwhile)."""
        self._ensure_dir(path.parent)
        try:
            return os.open(path, flags, 0o640)
        except FileNotFoundError:
            self._ensure_dir(path.parent, again=True)
            return os.open(path, flags, 0o640)

    def _write_file(self, path: Path, parts) -> None:
        fd = self._open_in_series_dir(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            write_all(fd, parts)
        finally:
            os.close(fd)

    def materialize(self) -> int:
        """Write the spool file of every journaled instance that has none yet (no per-file sync:
        the journal holds the data until :meth:`checkpoint` synced them), then recycle the
        journal segments that are done. Returns how many files were written. Thread-safe;
        called when the receiver pauses, and before anything outside this process (a job)
        reads the files."""
        if self.journal is None:
            return 0
        with self._materialize_lock:
            with self._pending_lock:
                todo = [(p, v) for p, v in self._pending.items() if v is not None]
            generations = []
            for path, (generation, parts, _) in todo:
                try:
                    self._write_file(path, parts)
                except OSError as err:  # the journal keeps the instance; the next call tries again
                    log.error("cannot write spool file %s (%s); the receive journal keeps it", path, err)
                    continue
                generations.append(generation)
                with self._pending_lock:
                    del self._pending[path]
                    self._pending_bytes -= sum(len(p) for p in parts)
            self.journal.materialized(generations)
            self.journal.retire(self.root)
            return len(generations)

    def prepare_journal(self) -> None:
        """Have a spare journal segment ready (off the acknowledgement path), so an append never
        waits for one to be written."""
        if self.journal is not None:
            self.journal.ensure_spare()

    def checkpoint(self, *, idle: bool = False) -> int:
        """Make written spool files durable (``syncfs``) and recycle the journal segments that
        carried them. ``idle``: also the active segment (call it when no instance is arriving).
        Returns the number of segments recycled."""
        if self.journal is None:
            return 0
        with self._materialize_lock:
            return self.journal.retire(self.root, seal_active=idle)

    def free_mb(self) -> float:
        return free_mb(self.root)

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance file (no temporaries)."""
        for d in self.root.iterdir():
            if d.is_dir():
                for f in d.iterdir():
                    if f.suffix == ".dcm" and not f.name.startswith("."):
                        yield f

    def remove_temporaries(self) -> int:
        """Delete ``.tmp`` files a crash left behind; returns how many."""
        n = 0
        for d in self.root.iterdir():
            if d.is_dir():
                for f in d.iterdir():
                    if f.name.startswith(".") and f.name.endswith(".tmp"):
                        f.unlink(missing_ok=True)
                        n += 1
        return n

    def reconcile(self, index, calling_ae: str = "") -> int:
        """Index every spool file the index lacks (a crash between fsync and index insert).

        Reads only the header of each such file. Returns the number of instances added back.
        """
        import pydicom

        self.remove_temporaries()
        known = index.instance_paths()
        added = 0
        for f in self.iter_files():
            if str(f) in known:
                continue
            try:
                ds = pydicom.dcmread(f)  # whole file: a write cut short by a crash fails here
                from qsmnode.node.instance_header import header_from_dataset
                from qsmnode.node.scp import check_instance

                check_instance(header_from_dataset(ds), str(ds.get("SOPClassUID", "")),
                               str(ds.get("SOPInstanceUID", "")), str(ds.file_meta.TransferSyntaxUID))
                added += index.add_instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                            str(ds.StudyInstanceUID), f, calling_ae=calling_ae,
                                            sop_class_uid=str(ds.get("SOPClassUID", "")),
                                            received_at=f.stat().st_mtime)
            except Exception:  # noqa: BLE001 - a partial (never acknowledged) write is moved aside
                quarantine = self.storage / "quarantine"
                quarantine.mkdir(exist_ok=True)
                shutil.move(str(f), quarantine / f.name)
        return added

    def remove_files(self, paths) -> int:
        """Delete instance files (retention); empty series folders go too. Returns files deleted."""
        n, dirs = 0, set()
        for p in paths:
            p = Path(p)
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
            dirs.add(p.parent)
        for d in dirs:
            try:
                d.rmdir()
                with self._dir_lock:
                    self._dirs.discard(d.name)
            except OSError:
                pass
        return n
