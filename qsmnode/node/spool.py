"""The durable spool: received instances as files, written so that an acknowledged one survives a crash.

Layout under the storage directory::

    spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm     received instances, bytes exactly as sent
    outputs/<job id>/...                               reconstruction outputs (see worker)

:meth:`Spool.store` creates the file with ``O_EXCL`` and ``fdatasync``s it (two senders of one SOP Instance
UID store it once), before it returns; the receiver acknowledges only after that (see
:meth:`Spool.store` for why one ``fdatasync`` is enough on ext4/xfs). A file that is on disk but
not in the index (a crash between the two) is validated and indexed again by
:meth:`Spool.reconcile`; a partial one (never acknowledged) is moved to ``quarantine/``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Iterator

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID: the UID itself when it is a valid UID, else a hash."""
    uid = (uid or "").strip().rstrip("\x00")
    if _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename/creation inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fdatasync, rename, fsync folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        _write_all(fd, (data,))
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_all(fd: int, parts) -> None:
    """Write every buffer of ``parts`` in order (one ``writev`` unless the kernel writes short)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MiB) available to this user on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


class Spool:
    """Received-instance files under ``<storage>/spool`` (see module docstring)."""

    def __init__(self, storage: str | os.PathLike, *, fsync_directory: bool = False):
        self.storage = Path(storage)
        self.fsync_directory = fsync_directory
        self.root = self.storage / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirs: set[str] = set()
        self._dir_lock = threading.Lock()

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        return self.root / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def _series_dir(self, series_uid: str) -> Path:
        name = safe_name(series_uid)
        d = self.root / name
        if name not in self._dirs:
            with self._dir_lock:
                if name not in self._dirs:
                    created = not d.is_dir()
                    d.mkdir(exist_ok=True)
                    if created:
                        fsync_dir(self.root)
                    self._dirs.add(name)
        return d

    def forget_dir(self, series_uid: str) -> None:
        with self._dir_lock:
            self._dirs.discard(safe_name(series_uid))

    def exists(self, series_uid: str, sop_uid: str) -> bool:
        return self.path_for(series_uid, sop_uid).exists()

    def store(self, series_uid: str, sop_uid: str, *parts: bytes | memoryview) -> tuple[Path, bool]:
        """Durably store one instance file made of ``parts`` (e.g. File Meta + data set as received).
        Returns (path, stored): stored is False for a duplicate (the file already existed; the first
        copy is kept). Durable when this returns.

        The file is created under its final name with ``O_EXCL`` (so two senders of one SOP Instance
        UID store it once) and ``fdatasync``ed: one journal commit. On journaling file systems
        (ext4, xfs) that commit carries the new directory entry too, because the entry and the inode
        are created in one transaction; ``fsync_directory=True`` adds the POSIX-strict folder fsync
        for other file systems (it doubles the cost). A crash mid-write leaves a partial file that
        was never acknowledged: :meth:`reconcile` validates unindexed files and drops broken ones.
        """
        try:
            return self._store(series_uid, sop_uid, parts)
        except FileNotFoundError:  # retention removed the series folder meanwhile: create it again
            self.forget_dir(series_uid)
            return self._store(series_uid, sop_uid, parts)

    def _store(self, series_uid: str, sop_uid: str, parts) -> tuple[Path, bool]:
        d = self._series_dir(series_uid)
        final = d / f"{safe_name(sop_uid)}.dcm"
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            return final, False
        try:
            _write_all(fd, parts)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
        if self.fsync_directory:
            fsync_dir(d)
        return final, True

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
