"""Receive journal: every acknowledged instance survives a crash, nothing retired comes back.

A "crash" here is a Spool abandoned without ``close()`` (its files never written, or written
partly) or a process killed with SIGKILL; the next Spool on the same storage must replay the
journal. Power loss cannot be simulated in a test; the design argument for it (records
acknowledged only after ``fdatasync`` of a pre-written segment, written in order, each with its
generation and CRC) is in ``qsmnode/node/journal.py``.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qsmnode.node.journal import ReceiveJournal, read_segment
from qsmnode.node.spool import Spool

SEGMENT = 64 * 1024  # small segments, so that a few dozen instances fill several


def payload(n: int, size: int = 3000) -> bytes:
    return (f"instance {n} ".encode() * (size // 10 + 1))[:size]


def store_many(spool: Spool, count: int, *, start: int = 0, size: int = 3000) -> dict[Path, bytes]:
    stored = {}
    for n in range(start, start + count):
        data = payload(n, size)
        path, ok = spool.store("1.2.3.4", f"1.2.3.4.{n}", data[:100], data[100:])
        assert ok
        stored[path] = data
    return stored


def test_acknowledged_instances_are_replayed_after_a_crash(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    stored = store_many(spool, 50)  # several segments, none of the files written yet
    assert not any(p.exists() for p in stored)
    reopened = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)  # the first one "crashed"
    assert reopened.open() == 50
    assert all(p.read_bytes() == data for p, data in stored.items())
    again = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    assert again.open() == 0  # replayed segments were recycled


def test_files_cut_short_by_a_crash_are_written_again(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    stored = store_many(spool, 5)
    spool.materialize()  # written, not yet synced: a power cut could leave them short
    first = next(iter(stored))
    first.write_bytes(stored[first][:10])
    assert Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT).open() == 5
    assert first.read_bytes() == stored[first]


def test_a_torn_record_ends_the_replay_without_error(tmp_path):
    journal = ReceiveJournal(tmp_path, segment_bytes=SEGMENT)
    journal.start()
    for n in range(3):
        generation = journal.append(f"s/{n}.dcm", [payload(n)])
    (segment,) = [p for p in tmp_path.glob("*.seg") if int(p.stem, 16) == generation]
    raw = bytearray(segment.read_bytes())
    raw[2 * (20 + 2 + 7 + 3000) + 500] ^= 0xFF  # a byte inside the third record's payload
    segment.write_bytes(bytes(raw))
    records = read_segment(segment, generation)
    assert [r.name for r in records] == ["s/0.dcm", "s/1.dcm"]
    assert records[1].data == payload(1)


def test_retired_instances_are_never_brought_back(tmp_path):
    """Retention deletes files long after they were received; a replay must not resurrect them."""
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    old = store_many(spool, 40)
    spool.materialize()  # the full segments are synced and recycled here
    spool.checkpoint(idle=True)  # ... and the active one once the receiver is idle
    assert all(p.exists() for p in old)
    spool.remove_files(old)
    new = store_many(spool, 3, start=100)  # acknowledged, then the node crashes
    reopened = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    assert reopened.open() == 3
    assert all(p.read_bytes() == data for p, data in new.items())
    assert not any(p.exists() for p in old)


def test_segments_are_recycled_not_grown(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    for round_ in range(5):
        store_many(spool, 40, start=round_ * 100)
        spool.materialize()
        spool.checkpoint(idle=True)
    segments = list((tmp_path / "journal").glob("*.seg"))
    assert 1 <= len(segments) <= 4
    assert all(s.stat().st_size == SEGMENT for s in segments)


def test_large_instances_bypass_the_journal(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    big = payload(1, SEGMENT)  # more than a quarter of a segment
    path, stored = spool.store("1.2.3.4", "1.2.3.4.1", big)
    assert stored and path.read_bytes() == big  # written and fdatasynced before store returned
    assert Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT).open() == 0


def test_a_clean_close_leaves_nothing_to_replay(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    stored = store_many(spool, 10)
    spool.close()
    assert all(p.read_bytes() == data for p, data in stored.items())
    assert Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT).open() == 0


def test_concurrent_senders_store_each_instance_once(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    outcomes: list[tuple[Path, bool]] = []
    lock = threading.Lock()

    def sender():
        for n in range(60):  # every sender sends the same 60 instances
            result = spool.store("1.2.3.4", f"1.2.3.4.{n}", payload(n))
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(stored for _, stored in outcomes) == 60
    spool.materialize()
    files = sorted((tmp_path / "spool" / "1.2.3.4").iterdir())
    assert len(files) == 60 and all(f.read_bytes() == payload(int(f.stem.rsplit(".", 1)[1])) for f in files)
    assert Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT).open() <= 60  # unretired ones replay identically
    assert all(f.read_bytes() == payload(int(f.stem.rsplit(".", 1)[1])) for f in files)


_CHILD = """
import sys
from qsmnode.node.spool import Spool
spool = Spool(sys.argv[1], journal_segment_bytes=64 * 1024, pending_budget=64 * 1024)
spool.open()
n = 0
while True:
    data = (f"instance {n} ".encode() * 301)[:3000]
    spool.store("1.2.3.4", f"1.2.3.4.{n}", data)
    if n % 7 == 0:
        spool.materialize()  # some files written, some segments recycled, some only journaled
    print(n, flush=True)  # acknowledged
    n += 1
"""


@pytest.mark.parametrize("after_s", [0.3, 0.8])
def test_sigkill_mid_receive_keeps_every_acknowledged_instance(tmp_path, after_s):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    acknowledged = []
    deadline = time.monotonic() + 30
    first = None
    for line in proc.stdout:
        acknowledged.append(int(line))
        first = first or time.monotonic()
        if time.monotonic() - first > after_s or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acknowledged) > 50
    Spool(tmp_path, journal_segment_bytes=64 * 1024, pending_budget=64 * 1024).open()
    for n in acknowledged:
        path = tmp_path / "spool" / "1.2.3.4" / f"1.2.3.4.{n}.dcm"
        assert path.read_bytes() == payload(n), f"acknowledged instance {n} lost"


def test_a_failed_flush_refuses_every_later_instance(tmp_path, monkeypatch):
    """After a failed fsync the kernel may report success on the next one for data it dropped:
    the journal must not acknowledge anything more (the receiver answers 0xA700)."""
    import qsmnode.node.journal as journal_module

    journal = ReceiveJournal(tmp_path, segment_bytes=SEGMENT)
    journal.start()
    journal.append("s/0.dcm", [payload(0)])
    real = os.fdatasync

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module.os, "fdatasync", failing)
    with pytest.raises(OSError):
        journal.append("s/1.dcm", [payload(1)])
    monkeypatch.setattr(journal_module.os, "fdatasync", real)
    with pytest.raises(OSError, match="check the disk and restart"):
        journal.append("s/2.dcm", [payload(2)])


def test_a_spare_segment_is_made_off_the_acknowledgement_path(tmp_path):
    journal = ReceiveJournal(tmp_path, segment_bytes=SEGMENT)
    journal.start()  # one segment, made ready as the spare
    journal.append("s/0.dcm", [payload(0)])  # takes it: no spare left
    assert len(list(tmp_path.glob("*.seg"))) == 1
    journal.ensure_spare()  # what the spool's writer thread does after each batch
    assert len(list(tmp_path.glob("*.seg"))) == 2
    for n in range(1, 25):  # past the end of the first segment: the append takes the spare
        journal.append(f"s/{n}.dcm", [payload(n)])
    assert len(list(tmp_path.glob("*.seg"))) == 2


class _RowsIndex:
    def __init__(self):
        self.rows = []

    def add_instances(self, rows):
        self.rows += rows


def _feed(spool, feeder, count, start=0):
    for path in store_many(spool, count, start=start):
        feeder.put(("uid", "series", "study", str(path), "AE", "1.2.840.10008.5.1.4.1.1.4", 0.0))


def test_the_receivers_feeder_indexes_at_once_and_writes_files_in_a_pause(tmp_path):
    """Files are written when the burst pauses (or on flush), not while instances arrive."""
    from qsmnode.node.scp import _IndexFeeder

    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    index, woken = _RowsIndex(), []
    feeder = _IndexFeeder(spool, index, lambda: woken.append(1), idle_s=30.0, max_defer_s=60.0)
    try:
        _feed(spool, feeder, 20)
        deadline = time.monotonic() + 10
        while len(index.rows) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(index.rows) == 20 and woken
        assert spool.pending_bytes > 0 and not any(Path(r[3]).exists() for r in index.rows)
        assert spool.pending_data(index.rows[0][3]) == payload(0)
        feeder.flush()
        assert spool.pending_bytes == 0 and all(Path(r[3]).read_bytes() == payload(n) for n, r in enumerate(index.rows))
        assert spool.pending_data(index.rows[0][3]) is None
    finally:
        feeder.stop()
        spool.close()


def test_the_feeder_writes_files_during_a_burst_past_its_memory_budget(tmp_path):
    from qsmnode.node.scp import _IndexFeeder

    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=10_000)
    spool.open()
    index = _RowsIndex()
    feeder = _IndexFeeder(spool, index, lambda: None, idle_s=30.0, max_defer_s=60.0)
    try:
        _feed(spool, feeder, 20)  # 60 kB, six times the budget
        deadline = time.monotonic() + 10
        while spool.pending_bytes > 10_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spool.pending_bytes <= 10_000
        assert sum(Path(r[3]).exists() for r in index.rows) >= 17
    finally:
        feeder.stop()
        spool.close()


def test_the_journal_keeps_segments_ready_for_the_memory_budget(tmp_path):
    """A burst that fills the budget before any file is written takes ready segments only."""
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=4 * SEGMENT)
    spool.open()
    try:
        ready = sorted((tmp_path / "journal").glob("*.seg"))
        assert len(ready) == 5
        store_many(spool, 4 * SEGMENT // 3100)
        assert sorted((tmp_path / "journal").glob("*.seg")) == ready
    finally:
        spool.close()


PLANTED = b"ZZPLANTED^ALICE|PID-ZZ-4711|19120623"


def journal_bytes(storage: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (storage / "journal").iterdir())


def store_identified(spool: Spool, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        spool.store("1.2.3.4", f"1.2.3.4.{n}", PLANTED, payload(n))


def test_a_retired_segment_keeps_no_patient_data(tmp_path):
    """Issue 13 item 7: recycled segments were renamed, not cleared, and kept every name and ID."""
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    store_identified(spool, 40)  # several segments
    assert PLANTED in journal_bytes(tmp_path)
    spool.materialize()
    spool.checkpoint(idle=True)  # every file durable, every segment retired
    assert PLANTED not in journal_bytes(tmp_path)
    store_identified(spool, 5, start=100)  # recycled segments take new records as before
    spool.close()  # a clean stop retires the active segment too
    assert PLANTED not in journal_bytes(tmp_path)
    assert Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT).open() == 0


def test_replayed_segments_keep_no_patient_data(tmp_path):
    spool = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    spool.open()
    store_identified(spool, 20)  # then the node crashes
    reopened = Spool(tmp_path, journal_segment_bytes=SEGMENT, pending_budget=SEGMENT)
    assert reopened.open() == 20  # replayed, synced, and the segments recycled
    assert PLANTED not in journal_bytes(tmp_path)
    assert len(list(reopened.iter_files())) == 20
