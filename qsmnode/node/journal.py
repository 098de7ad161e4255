"""The receive journal: an instance is durable after one sequential write and ``fdatasync``.

Creating a file and ``fdatasync``-ing it costs an ext4/xfs journal commit (inode, directory
entry, block allocation): 0.4–0.9 ms on the development VM, which caps one association at about
1,000 instances/s or less. Overwriting blocks of a file that was written in full beforehand
changes no metadata, so its ``fdatasync`` only flushes the data: 0.11–0.15 ms. The journal
uses that: the receiver appends each instance (its spool path and bytes) to a pre-written
*segment* and acknowledges after the ``fdatasync``; the spool files are created behind it, in
batches, without per-file syncs (:meth:`qsmnode.node.spool.Spool.materialize`), and a segment
is *retired* only after a ``syncfs`` made every file it carries durable. The same idea as a
database's write-ahead log (Mohan et al., "ARIES", ACM TODS 17(1), 1992; PostgreSQL's WAL
segment recycling).

Segments are files ``<generation:016x>.seg`` of ``segment_bytes`` zero bytes, written and
fsynced before first use. A record is::

    magic "QSJ1" | generation u64 | payload length u32 | CRC-32 of payload u32 | payload
    payload = name length u16 | name (UTF-8, the path under the spool) | file bytes

The generation in every record is the segment's own (its name), so a record left from an older
generation never matches. Records hold patient data (every name and ID of a scan): when a
segment is retired (its files durable) or after its records were replayed at start, the bytes its
records used are overwritten with zeros and flushed before it is renamed for reuse
(:func:`clear_segment`), so no journal file keeps an instance after its spool file took over;
retention deleting the file later deletes the last copy. Overwriting blocks changes no file
metadata, so the recycled segment stays as cheap to append to as a new one. On start,
:meth:`ReceiveJournal.recover` reads every segment in generation order up to the first record
that is not valid (wrong magic, generation or CRC: the torn tail of a crash, never an
acknowledged record, because a record is acknowledged only after its ``fdatasync`` and records
are written in order), and returns the records for replay.

Instances larger than a quarter of a segment (e.g. a whole enhanced multi-frame volume) are not
journaled: the spool writes them directly, one ``fdatasync`` each.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from qsmnode.durable import fsync_dir, syncfs

_HEADER = struct.Struct("<4sQII")
_MAGIC = b"QSJ1"
_NAME_LEN = struct.Struct("<H")
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True)
class Record:
    """One journaled instance: ``name`` is its path relative to the spool root."""

    name: str
    data: bytes
    generation: int


class _Segment:
    def __init__(self, generation: int, path: Path):
        self.path = path
        self.generation = generation
        self.fd = os.open(path, os.O_RDWR)
        self.used = 0
        self.records = 0          # appended to this segment
        self.materialized = 0     # of those, written out as spool files

    def close(self) -> None:
        os.close(self.fd)


class ReceiveJournal:
    """Append-and-``fdatasync`` journal of received instances (see the module docstring).

    ``directory``: where the segments live (on the spool's file system, so that one ``syncfs``
    covers both). Appends are serialised (one ``pwritev`` each) and flushed by group commit (one
    ``fdatasync``, about 0.1 ms, for whatever was written before it); :meth:`materialized` and
    :meth:`retire` run in the thread that writes the spool files.
    """

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 16 << 20):
        self.directory = Path(directory)
        self.segment_bytes = int(segment_bytes)
        self.max_payload = self.segment_bytes // 4
        self._lock = threading.Lock()           # appends; taken before _segments_lock
        self._sync_lock = threading.Lock()      # group commit; taken before _lock
        self._written = 0                       # records written (appends so far)
        self._synced = 0                        # of those, known flushed
        self._failed = ""                       # why a flush failed: the journal refuses from then on
        self._segments_lock = threading.Lock()  # the lists below and the materialized counts
        self._active: _Segment | None = None
        self._sealed: list[_Segment] = []       # full (or sealed when idle), waiting to retire
        self._spares: list[tuple[int, Path]] = []
        self._recovered: list[tuple[Path, int]] | None = None  # (segment, bytes before its zero tail)
        self._generations = itertools.count(1)

    # ------------------------------------------------------------------ start
    def recover(self) -> list[Record]:
        """Open the journal and return every valid record of its segments, oldest first.

        The caller replays them (writes the files, ``syncfs``) and then calls :meth:`start`,
        which recycles those segments. Call once, before any append.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()
        records: list[Record] = []
        self._recovered = []
        last = 0
        for path in sorted(self.directory.glob("*.seg")):
            try:
                generation = int(path.stem, 16)
            except ValueError:
                continue
            last = max(last, generation)
            data = path.read_bytes()
            self._recovered.append((path, len(data.rstrip(b"\0"))))
            records.extend(parse_segment(data, generation))
        self._generations = itertools.count(last + 1)
        return records

    def start(self, spares: int = 1) -> None:
        """Recycle the segments :meth:`recover` read (their records must be replayed and synced
        by now) and make sure at least ``spares`` segments are ready (as many as a burst fills
        before its files are written, so no append has to write a new one)."""
        if self._recovered is None:
            self.recover()
        for path, used in self._recovered:
            clear_segment(path, used)
        self._spares = [self._recycle(path) for path, _ in self._recovered]
        self._recovered = []
        while len(self._spares) < max(1, spares):
            self._spares.append(self._create(next(self._generations)))
        fsync_dir(self.directory)

    def close(self) -> None:
        with self._lock, self._segments_lock:
            for seg in [self._active, *self._sealed]:
                if seg is not None:
                    seg.close()
            self._active, self._sealed = None, []

    # ------------------------------------------------------------------ segments
    def _recycle(self, path: Path) -> tuple[int, Path]:
        """Rename a retired segment to a new generation: its old records no longer match."""
        generation = next(self._generations)
        target = self.directory / f"{generation:016x}.seg"
        os.rename(path, target)
        if os.path.getsize(target) != self.segment_bytes:  # written with another segment size
            target.unlink()
            return self._create(generation)
        return generation, target

    def _create(self, generation: int) -> tuple[int, Path]:
        """A new segment: ``segment_bytes`` zeros written and fsynced under a temporary name,
        then renamed (a half-written segment is never taken for a real one)."""
        target = self.directory / f"{generation:016x}.seg"
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            left = self.segment_bytes
            while left:
                left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        return generation, target

    def _next_segment(self) -> _Segment:
        with self._segments_lock:
            spare = self._spares.pop(0) if self._spares else None
        if spare is None:  # the spool files are far behind: grow the journal rather than wait
            spare = self._create(next(self._generations))
            fsync_dir(self.directory)
        return _Segment(*spare)

    def ensure_spare(self) -> None:
        """Make a spare segment ahead of need (called off the acknowledgement path), so that an
        append never waits for one to be written."""
        with self._segments_lock:
            if self._spares:
                return
        spare = self._create(next(self._generations))
        fsync_dir(self.directory)
        with self._segments_lock:
            self._spares.append(spare)

    # ------------------------------------------------------------------ appends
    def append(self, name: str, parts) -> int:
        """Journal one instance (``parts``: its file bytes, in pieces) durably; returns the
        record's generation, to give back to :meth:`materialized` once its spool file is
        written. Raises ValueError when the payload is larger than ``max_payload`` (write the
        file directly instead) and OSError when the disk fails."""
        encoded = name.encode("utf-8")
        prefix = _NAME_LEN.pack(len(encoded)) + encoded
        length = len(prefix) + sum(len(p) for p in parts)
        if length > self.max_payload:
            raise ValueError(f"{length} bytes is more than the journal takes ({self.max_payload})")
        crc = zlib.crc32(prefix)
        for p in parts:
            crc = zlib.crc32(p, crc)
        with self._lock:
            self._check_healthy()
            seg = self._active
            if seg is None or seg.used + _HEADER.size + length > self.segment_bytes:
                if seg is not None:  # records in it may still wait for a group sync
                    self._fdatasync(seg)
                new = self._next_segment()
                with self._segments_lock:
                    if seg is not None:
                        self._sealed.append(seg)
                    self._active = seg = new
            written = os.pwritev(seg.fd, [_HEADER.pack(_MAGIC, seg.generation, length, crc), prefix, *parts],
                                 seg.used)
            if written != _HEADER.size + length:
                raise OSError(errno.EIO, "short write to the receive journal")
            seg.used += written
            seg.records += 1
            self._written += 1
            ticket, generation = self._written, seg.generation
        # group commit: one fdatasync covers every record written before it, so concurrent
        # associations share flushes instead of queueing for one each
        with self._sync_lock:
            self._check_healthy()
            if self._synced < ticket:
                with self._lock:
                    target, active = self._written, self._active
                if active is not None:  # (None: sealed meanwhile, which synced it)
                    self._fdatasync(active)
                self._synced = target
        return generation

    def _fdatasync(self, seg: _Segment) -> None:
        try:
            os.fdatasync(seg.fd)
        except OSError as err:
            # after a failed fsync the kernel may drop the dirty pages and report success on the
            # next call: never trust this journal again in this process (PostgreSQL's "fsyncgate")
            self._failed = f"{err.strerror or err}"
            raise

    def _check_healthy(self) -> None:
        if self._failed:
            raise OSError(errno.EIO, f"the receive journal could not flush to disk earlier ({self._failed}); "
                                     "check the disk and restart the node")

    # ------------------------------------------------------------------ retiring
    def materialized(self, generations) -> None:
        """Count spool files written (not yet synced) for records of these generations."""
        with self._segments_lock:
            by_generation = {seg.generation: seg for seg in [self._active, *self._sealed] if seg is not None}
            for generation in generations:
                by_generation[generation].materialized += 1

    def retire(self, spool_root: str | os.PathLike, *, seal_active: bool = False) -> int:
        """``syncfs`` the spool, then recycle every sealed segment whose files are all written.
        ``seal_active`` (when the receiver is idle) first seals the active segment if all its
        files are written, so a record never outlives its file for long: retention may delete
        the file later, and a replay must not bring it back. Returns how many were recycled."""
        if seal_active:
            with self._lock, self._segments_lock:
                seg = self._active
                if seg is not None and seg.records and seg.materialized == seg.records:
                    self._sealed.append(seg)
                    self._active = None
        with self._segments_lock:
            done = [seg for seg in self._sealed if seg.materialized == seg.records]
        if not done:
            return 0
        syncfs(spool_root)
        recycled = []
        for seg in done:
            with self._segments_lock:
                self._sealed.remove(seg)
            _zero(seg.fd, seg.used)  # its files are durable: its records are patient data no one needs
            seg.close()
            recycled.append(self._recycle(seg.path))
        fsync_dir(self.directory)
        with self._segments_lock:
            self._spares.extend(recycled)
        return len(done)


def clear_segment(path: str | os.PathLike, used: int) -> None:
    """Overwrite the first ``used`` bytes of a segment file with zeros, durably (module docstring)."""
    if used <= 0:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        _zero(fd, used)
    finally:
        os.close(fd)


def _zero(fd: int, used: int) -> None:
    """Zeros over bytes ``[0, used)`` of an open segment, then ``fdatasync``."""
    done = 0
    while done < used:
        done += os.pwrite(fd, _ZEROS[:min(used - done, len(_ZEROS))], done)
    os.fdatasync(fd)


def read_segment(path: str | os.PathLike, generation: int) -> list[Record]:
    """The valid records of one segment file, up to the first one that is not (see module doc)."""
    with open(path, "rb") as handle:
        return parse_segment(handle.read(), generation)


def parse_segment(data: bytes, generation: int) -> list[Record]:
    """The valid records in a segment's bytes (see :func:`read_segment`)."""
    out: list[Record] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        magic, record_generation, length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if magic != _MAGIC or record_generation != generation or end > len(data) or length < _NAME_LEN.size:
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        (name_len,) = _NAME_LEN.unpack_from(payload, 0)
        name = payload[_NAME_LEN.size:_NAME_LEN.size + name_len].decode("utf-8")
        out.append(Record(name, payload[_NAME_LEN.size + name_len:], generation))
        pos = end
    return out
