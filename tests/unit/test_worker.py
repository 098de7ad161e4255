"""The worker's job processes and streamed outputs, with real child processes on a small simulated scan.

- warm spare: a job runs in a process that was started (and warmed up) before the job was claimed;
  a spare that died is replaced and the job still runs; stop() kills the spares;
- streaming: the parent hands each series to the dispatcher as soon as it is written, in
  SERIES_ORDER, while the child has not written the next one yet; a job that fails after some
  series keeps them with a clear reason; a re-run replaces the files of the earlier run.

The child processes are steered (wait before writing a series, fail writing one) by a
``sitecustomize`` module on their PYTHONPATH that wraps ``qsmnode.dicom.write.write_datasets``:
the node's code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pydicom
import pytest

from qsmnode.config import NodeConfig
from qsmnode.dicom.outputs import SERIES_ORDER
from qsmnode.node.worker import WorkerPool

SITECUSTOMIZE = '''
import os, time
from pathlib import Path

_gate = os.environ.get("QSMNODE_TEST_GATE")
_fail = os.environ.get("QSMNODE_TEST_FAIL_KIND")
if _gate or _fail:
    import qsmnode.dicom.write as _write

    _original = _write.write_datasets

    def write_datasets(datasets, output_dir, **kw):
        kind = _write.output_kind(datasets[0]) if datasets else ""
        if _gate and kind != "QSM":  # wait until the test lets this series be written
            go = Path(_gate) / (kind + ".go")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if kind == _fail:
            raise OSError(28, "No space left on device (test)")
        return _original(datasets, output_dir, **kw)

    _write.write_datasets = write_datasets
'''


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from qsmnode.simulate.scan import simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("scan"), vendor="siemens", matrix=(32, 32, 16),
                         voxel_size_mm=(2.0, 2.0, 2.0))


@pytest.fixture
def child_env(tmp_path, monkeypatch):
    """PYTHONPATH for the job processes: the sitecustomize above, then the repository."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(repo), os.environ.get("PYTHONPATH", "")]))
    return monkeypatch


class FakeIndex:
    """The three calls the worker makes on the index, with a queue of jobs."""

    def __init__(self, inputs: list[str]) -> None:
        self.inputs = inputs
        self.queue: list[dict] = []
        self.finished: dict[str, dict] = {}
        self.events: list[tuple] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def add(self, job_id: str, destinations=(), attempts: int = 1) -> None:
        with self._lock:
            self.queue.append({"id": job_id, "acquisition_id": 1, "attempts": attempts, "preset": "auto",
                               "params": {}, "destinations": list(destinations)})

    def claim_next_job(self):
        with self._lock:
            job = self.queue.pop(0) if self.queue else None
        if job is not None:
            self.events.append(("claimed", job["id"], time.monotonic()))
        return job

    def instances_of_acquisition(self, acq_id):
        return [{"path": p} for p in self.inputs]

    def finish_job(self, job_id, state, **kw):
        self.finished[job_id] = {"state": state, **kw}
        self.events.append(("finished", job_id, state))
        if state in ("done", "failed"):
            self.done.set()


class FakeDispatcher:
    """Records open/enqueue/close; ``on_enqueue(job_id, paths)`` runs inside enqueue."""

    def __init__(self, events: list, on_enqueue=None) -> None:
        self.events = events
        self.on_enqueue = on_enqueue
        self.enqueued: list[tuple[str, str, list[Path]]] = []

    def open_job(self, job_id):
        self.events.append(("open", job_id))

    def enqueue(self, job_id, destination, paths):
        for p in paths:  # every file complete and durable when handed over
            pydicom.dcmread(p, stop_before_pixels=True)
        self.enqueued.append((job_id, destination.name, list(paths)))
        self.events.append(("enqueue", job_id, Path(paths[0]).parent.name))
        if self.on_enqueue is not None:
            self.on_enqueue(job_id, paths)

    def close_job(self, job_id):
        self.events.append(("close", job_id))


DEST = {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def make_pool(tmp_path, scan, dispatcher_factory=None, **config):
    config.setdefault("job_timeout_seconds", 300.0)
    cfg = NodeConfig(storage=tmp_path / "node", device="cpu", **config)
    index = FakeIndex([str(p) for p in scan.paths])
    dispatcher = dispatcher_factory(index.events) if dispatcher_factory else FakeDispatcher(index.events)
    pool = WorkerPool(cfg, index, dispatcher, poll_seconds=0.05)
    return pool, index, dispatcher


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- warm spare
def test_job_runs_in_the_spare_started_before_it_was_claimed_and_stop_kills_spares(tmp_path, scan, child_env):
    pool, index, dispatcher = make_pool(tmp_path, scan)
    pool.start()
    try:
        (spare,) = wait_for(pool.spare_pids, 30, "a spare")
        assert alive(spare)
        index.add("job-1-1", [DEST])
        pool.notify()
        assert index.done.wait(240), index.finished
        job = index.finished["job-1-1"]
        assert job["state"] == "done", job
        # the job ran in the process that waited before the job was claimed
        assert job["summary"]["job_process"]["pid"] == spare
        assert job["summary"]["job_process"]["up_before_job_s"] > 0
        # the next job's process was started as soon as this one took its job; another process
        (next_spare,) = wait_for(pool.spare_pids, 30, "the next spare")
        assert next_spare != spare and alive(next_spare)
        wait_for(lambda: not alive(spare), 15, "the job's process to exit")
        # the job's log is its own file; the waiting spare writes to its own until it gets a job
        assert (tmp_path / "node" / "jobs" / "job-1-1.log").exists()
        assert len(list((tmp_path / "node" / "jobs").glob(".spare-*.log"))) == 1
    finally:
        pool.stop()
    assert not alive(next_spare), "stop() left the spare running"
    assert pool.spare_pids() == []
    assert not list((tmp_path / "node" / "jobs").glob(".spare-*.log"))


def test_a_spare_that_died_is_replaced_and_the_job_still_runs(tmp_path, scan, child_env):
    pool, index, dispatcher = make_pool(tmp_path, scan)
    pool.start()
    try:
        (spare,) = wait_for(pool.spare_pids, 30, "a spare")
        os.killpg(spare, signal.SIGKILL)  # e.g. the OOM killer, or an operator
        wait_for(lambda: not alive(spare), 10, "the spare to die")
        index.add("job-1-1", [DEST])
        pool.notify()
        assert index.done.wait(240), index.finished
        job = index.finished["job-1-1"]
        assert job["state"] == "done", job
        assert job["summary"]["job_process"]["pid"] != spare
        assert [e[2] for e in index.events if e[0] == "enqueue"] == list(SERIES_ORDER)
    finally:
        pool.stop()


def test_stop_while_a_job_runs_requeues_it_and_kills_every_child(tmp_path, scan, child_env):
    gate = tmp_path / "gate"
    gate.mkdir()
    child_env.setenv("QSMNODE_TEST_GATE", str(gate))  # the job waits after its QSM series: never opened
    pool, index, dispatcher = make_pool(tmp_path, scan)
    pool.start()
    try:
        index.add("job-1-1", [DEST])
        pool.notify()
        wait_for(lambda: dispatcher.enqueued, 240, "the QSM series")
        running = [c.pid for c in pool._running.values()]
        spares = wait_for(pool.spare_pids, 30, "the next spare")
    finally:
        pool.stop()
    assert index.finished["job-1-1"]["state"] == "queued"
    assert "resumed on start" in index.finished["job-1-1"]["reason"]
    assert ("close", "job-1-1") not in index.events  # its delivery stays open until it runs again
    for pid in running + spares:
        assert not alive(pid)


# --------------------------------------------------------------------------- streaming
def test_each_series_is_handed_over_as_soon_as_it_is_written_in_order(tmp_path, scan, child_env):
    gate = tmp_path / "gate"
    gate.mkdir()
    child_env.setenv("QSMNODE_TEST_GATE", str(gate))
    out = tmp_path / "node" / "outputs" / "job-1-1"
    seen: list[tuple[str, list[str], bool]] = []

    def on_enqueue(job_id, paths):
        kind = Path(paths[0]).parent.name
        running = pool._running.get(job_id)
        on_disk = sorted(d.name for d in out.iterdir() if d.is_dir() and any(d.iterdir()))
        seen.append((kind, on_disk, running is not None and running.proc.poll() is None))
        later = SERIES_ORDER[SERIES_ORDER.index(kind) + 1:]
        if later:  # let the child write the next series only now
            (gate / f"{later[0]}.go").touch()

    pool, index, dispatcher = make_pool(tmp_path, scan, lambda events: FakeDispatcher(events, on_enqueue))
    pool.start()
    try:
        index.add("job-1-1", [DEST, dict(DEST, name="archive")])
        pool.notify()
        assert index.done.wait(240), index.finished
    finally:
        pool.stop()
    job = index.finished["job-1-1"]
    assert job["state"] == "done", job
    kinds = [k for k, _, _ in seen]
    assert kinds == [k for k in SERIES_ORDER for _ in range(2)]  # in order, once per destination
    for n, (kind, on_disk, child_running) in enumerate(seen[::2]):
        # when a series was handed over, the child was still running and had written nothing after it
        assert on_disk == sorted(SERIES_ORDER[:n + 1]), (kind, on_disk)
        assert child_running, kind
    events = [e[:3] if e[0] != "claimed" else e[:2] for e in index.events]
    assert events.index(("open", "job-1-1")) < events.index(("enqueue", "job-1-1", "QSM"))
    assert events.index(("enqueue", "job-1-1", "SUMMARY")) < events.index(("finished", "job-1-1", "done"))
    assert events[-1] == ("close", "job-1-1")
    assert sorted(job["outputs"]) == sorted(str(p) for p in out.rglob("*.dcm"))
    assert job["summary"]["series"] == {"QSM": 16, "SWI": 16, "MINIP": 16, "R2STAR": 16, "SR": 1, "QSM_PM": 1,
                                        "SUMMARY": 1}


def test_a_job_that_fails_after_some_series_keeps_them_with_a_clear_reason(tmp_path, scan, child_env):
    child_env.setenv("QSMNODE_TEST_FAIL_KIND", "MINIP")  # writing the third series fails: disk full
    pool, index, dispatcher = make_pool(tmp_path, scan)
    pool.start()
    try:
        index.add("job-1-1", [DEST])
        pool.notify()
        assert index.done.wait(240), index.finished
    finally:
        pool.stop()
    job = index.finished["job-1-1"]
    assert job["state"] == "failed"
    assert "No space left on device (test)" in job["reason"]
    assert job["reason"].endswith("(kept and sent: QSM, SWI)"), job["reason"]
    out = tmp_path / "node" / "outputs" / "job-1-1"
    assert sorted(d.name for d in out.iterdir()) == ["QSM", "SWI"]  # the rest is gone
    assert sorted(job["outputs"]) == sorted(str(p) for p in out.rglob("*.dcm"))
    assert [e[2] for e in index.events if e[0] == "enqueue"] == ["QSM", "SWI"]
    assert index.events[-1] == ("close", "job-1-1")  # its delivery is decided by what it handed over


def test_a_rerun_replaces_the_files_of_the_earlier_run_without_leftovers(tmp_path, scan, child_env):
    pool, index, dispatcher = make_pool(tmp_path, scan)
    out = tmp_path / "node" / "outputs" / "job-1-1"
    pool.start()
    try:
        index.add("job-1-1", [DEST])
        pool.notify()
        assert index.done.wait(240) and index.finished["job-1-1"]["state"] == "done"
        first = {p.relative_to(out): pydicom.dcmread(p).SOPInstanceUID for p in out.rglob("*.dcm")}
        # what an earlier, different run (or a crash mid-write) could have left
        (out / "QSM" / "0999.dcm").write_bytes(b"stale")
        (out / "QSM" / ".0001.dcm.tmp-1").write_bytes(b"half")
        (out / "OLDKIND").mkdir()
        (out / "OLDKIND" / "0001.dcm").write_bytes(b"stale")
        index.done.clear()
        index.add("job-1-1", [DEST], attempts=2)
        pool.notify()
        assert index.done.wait(240) and index.finished["job-1-1"]["state"] == "done"
    finally:
        pool.stop()
    again = {p.relative_to(out): pydicom.dcmread(p).SOPInstanceUID for p in out.rglob("*.dcm")}
    assert again == first  # the same files with the same UIDs, and nothing else
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")) == []
    assert [e[0] for e in index.events].count("open") == 2


def test_retention_deletes_the_series_a_failed_job_kept_once_they_are_delivered(tmp_path):
    from types import SimpleNamespace

    from qsmnode.node.index import Index
    from qsmnode.node.retention import Retention

    storage = tmp_path / "node"
    index = Index(storage / "index.sqlite")
    cfg = NodeConfig(storage=storage, retention_hours=1.0, pressure_free_disk_mb=0.0)
    out = storage / "outputs" / "job-1-1"
    (out / "QSM").mkdir(parents=True)
    (out / "QSM" / "0001.dcm").write_bytes(b"x")
    job = index.create_job(1, 1, rule="default", preset="auto", destinations=[DEST])
    index.claim_next_job()
    index.finish_job(job, "failed", reason="internal error (kept and sent: QSM)", output_dir=str(out),
                     outputs=[str(out / "QSM" / "0001.dcm")])
    delivered = {"now": False}
    dispatcher = SimpleNamespace(job_dispatched=lambda job_id: delivered["now"])
    retention = Retention(cfg, index, SimpleNamespace(root=storage), dispatcher)
    t_failed = index.job(job)["finished_at"]
    assert retention.sweep(now=t_failed + 7200) == 0 and out.exists()  # still being delivered
    delivered["now"] = True
    assert retention.sweep(now=t_failed + 60) == 0 and out.exists()  # within the keep time
    assert retention.sweep(now=t_failed + 7200) == 1 and not out.exists()
    assert index.job(job)["state"] == "failed" and index.job(job)["reason"].endswith("(kept and sent: QSM)")
    assert retention.sweep(now=t_failed + 7200) == 0
    index.close()
