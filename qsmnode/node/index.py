"""The node's index: instances, series, acquisitions and jobs, in SQLite (WAL mode).

Everything the node knows about its work lives here, so a restart resumes it. The spool files are
the source of truth for received instances (an instance is acknowledged once its file is durable;
:meth:`Index.add_instance` then records it, and :func:`qsmnode.node.spool.Spool.reconcile` puts
back any file a crash kept out of the index), the ``jobs`` table is the job queue. The
dispatcher (``qsmnode.node.dispatch``) keeps its outbox in its own table of the same file.

The interface is deliberately small (plain methods, dict rows) so that a server database could
replace SQLite. One connection is shared by the node's threads behind a lock; other processes
(``qsmnode jobs``, ``qsmnode retry``) open their own connection: WAL lets them read while the
node writes. ``synchronous=NORMAL``: a power cut may lose the last index commits, never the spool
files, and a restart re-indexes them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT,
    path TEXT NOT NULL,
    calling_ae TEXT,
    received_at REAL NOT NULL,
    classified INTEGER NOT NULL DEFAULT 0,
    component TEXT,
    echo_numbers TEXT,
    instance_number INTEGER
);
CREATE INDEX IF NOT EXISTS instances_unclassified ON instances(classified) WHERE classified = 0;
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    acquisition_id INTEGER,
    component TEXT,
    expected INTEGER,
    received INTEGER NOT NULL DEFAULT 0,
    first_path TEXT,
    description TEXT,
    refusal TEXT,
    first_seen REAL,
    last_seen REAL
);
CREATE INDEX IF NOT EXISTS series_acq ON series(acquisition_id);
CREATE TABLE IF NOT EXISTS acquisitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    acquisition_key TEXT UNIQUE NOT NULL,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'receiving',
    generation INTEGER NOT NULL DEFAULT 1,
    calling_aes TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    reason TEXT,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS acquisitions_state ON acquisitions(state);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    acquisition_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    rule TEXT,
    preset TEXT,
    destinations TEXT,
    params TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    output_dir TEXT,
    outputs TEXT,
    summary TEXT,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

#: SQL for a series row's ``component`` when one more instance is counted into it: the set of
#: components its instances hold, comma-separated (a GE series interleaves real and imaginary
#: images, or magnitude, real and imaginary ones); read it with :func:`series_components`.
_MERGED_COMPONENTS = (
    "CASE WHEN excluded.component IS NULL"
    " OR instr(',' || coalesce(component, '') || ',', ',' || excluded.component || ',') > 0 THEN component"
    " WHEN component IS NULL THEN excluded.component"
    " ELSE component || ',' || excluded.component END"
)


def series_components(series_row: dict[str, Any]) -> set[str]:
    """The image components (magnitude, phase, real, imaginary, mixed) a series row's instances hold."""
    return set(filter(None, (series_row.get("component") or "").split(",")))


#: Job states: queued -> running -> done | failed; failed -> queued by ``qsmnode retry``.
JOB_STATES = ("queued", "running", "done", "failed")
#: Acquisition states: ``receiving`` until the tracker decides; then ``unmatched`` (no rule, or
#: not a QSM input), ``failed`` (incomplete), or the state of its job, which it follows from then
#: on (``queued`` -> ``running`` -> ``done`` | ``failed``, and back to ``queued`` on a retry).
ACQ_STATES = ("receiving", "queued", "running", "done", "unmatched", "failed")


class Index:
    """SQLite-backed index (see module docstring). Thread-safe; rows are returned as dicts."""

    def __init__(self, db_path: str | os.PathLike, *, timeout_s: float = 30.0):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    # ------------------------------------------------------------------ instances
    _INSERT_INSTANCE = ("INSERT OR IGNORE INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,"
                        " path, calling_ae, sop_class_uid, received_at) VALUES (?,?,?,?,?,?,?)")

    def add_instance(self, sop_instance_uid: str, series_instance_uid: str, study_instance_uid: str,
                     path: str | os.PathLike, *, calling_ae: str = "", sop_class_uid: str = "",
                     received_at: float | None = None) -> bool:
        """Record one durable instance file; False when the SOP Instance UID is already indexed."""
        with self._lock:
            cur = self._db.execute(self._INSERT_INSTANCE, (
                sop_instance_uid, series_instance_uid, study_instance_uid, str(path), calling_ae, sop_class_uid,
                time.time() if received_at is None else received_at))
            return cur.rowcount == 1

    def add_instances(self, rows: list[tuple]) -> None:
        """Record many instance files in one transaction; each row is (sop_instance_uid,
        series_instance_uid, study_instance_uid, path, calling_ae, sop_class_uid, received_at)."""
        with self.transaction() as db:
            db.executemany(self._INSERT_INSTANCE, rows)

    def has_instance(self, sop_instance_uid: str) -> bool:
        return self._one("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)) is not None

    def instance_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances")}

    def unclassified(self, limit: int = 500) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM instances WHERE classified=0 ORDER BY received_at LIMIT ?", (limit,))

    def record_classification(self, inst: dict[str, Any], *, component: str | None, echo_numbers: tuple[int, ...],
                              instance_number: int | None, acquisition_key: str | None,
                              expected_in_series: int | None, description: str = "",
                              refusal: str | None = None) -> int | None:
        """Store what classify_instance said about one instance and count it into its series and
        acquisition (creating them). A new instance for an acquisition that was already closed
        re-opens it (next generation). Returns the acquisition id (None without a key)."""
        now = inst["received_at"]
        series_uid, study_uid = inst["series_instance_uid"], inst["study_instance_uid"]
        with self.transaction() as db:
            db.execute("UPDATE instances SET classified=1, component=?, echo_numbers=?, instance_number=?"
                       " WHERE sop_instance_uid=?",
                       (component, ",".join(str(e) for e in echo_numbers), instance_number, inst["sop_instance_uid"]))
            acq_id = None
            if acquisition_key:
                row = db.execute("SELECT id, state, calling_aes FROM acquisitions WHERE acquisition_key=?",
                                 (acquisition_key,)).fetchone()
                ae = inst.get("calling_ae") or ""
                if row is None:
                    acq_id = db.execute(
                        "INSERT INTO acquisitions (acquisition_key, study_instance_uid, calling_aes, first_seen,"
                        " last_seen) VALUES (?,?,?,?,?)", (acquisition_key, study_uid, ae, now, now)).lastrowid
                else:
                    acq_id = row["id"]
                    aes = set(filter(None, row["calling_aes"].split("\\"))) | ({ae} if ae else set())
                    if row["state"] != "receiving":
                        db.execute("UPDATE acquisitions SET state='receiving', generation=generation+1, reason=NULL,"
                                   " purged=0 WHERE id=?", (acq_id,))
                    db.execute("UPDATE acquisitions SET last_seen=max(last_seen, ?), calling_aes=? WHERE id=?",
                               (now, "\\".join(sorted(aes)), acq_id))
            db.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, acquisition_id, component, expected,"
                " received, first_path, description, refusal, first_seen, last_seen) VALUES (?,?,?,?,?,1,?,?,?,?,?)"
                " ON CONFLICT(series_instance_uid) DO UPDATE SET received=received+1,"
                f" component={_MERGED_COMPONENTS},"
                " expected=coalesce(excluded.expected, expected), last_seen=max(last_seen, excluded.last_seen),"
                " acquisition_id=coalesce(acquisition_id, excluded.acquisition_id),"
                " refusal=coalesce(refusal, excluded.refusal)",
                (series_uid, study_uid, acq_id, component, expected_in_series, inst["path"], description, refusal,
                 now, now))
            return acq_id

    # --------------------------------------------------------------- acquisitions
    def acquisitions(self, state: str | None = None) -> list[dict[str, Any]]:
        if state is None:
            return self._all("SELECT * FROM acquisitions ORDER BY id")
        return self._all("SELECT * FROM acquisitions WHERE state=? ORDER BY id", (state,))

    def acquisition(self, acq_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM acquisitions WHERE id=?", (acq_id,))

    def series_of_acquisition(self, acq_id: int) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM series WHERE acquisition_id=? ORDER BY first_seen", (acq_id,))

    def instances_of_acquisition(self, acq_id: int) -> list[dict[str, Any]]:
        return self._all(
            "SELECT i.* FROM instances i JOIN series s ON s.series_instance_uid=i.series_instance_uid"
            " WHERE s.acquisition_id=? ORDER BY i.series_instance_uid, i.instance_number", (acq_id,))

    def pending_classification(self) -> int:
        row = self._one("SELECT count(*) AS n FROM instances WHERE classified=0")
        return int(row["n"]) if row else 0

    def set_acquisition_state(self, acq_id: int, state: str, reason: str | None = None,
                              *, generation: int | None = None) -> bool:
        """Set the state; with ``generation`` only if the acquisition was not re-opened meanwhile."""
        with self._lock:
            if generation is None:
                cur = self._db.execute("UPDATE acquisitions SET state=?, reason=? WHERE id=?", (state, reason, acq_id))
            else:
                cur = self._db.execute("UPDATE acquisitions SET state=?, reason=? WHERE id=? AND generation=?",
                                       (state, reason, acq_id, generation))
            return cur.rowcount == 1

    def mark_acquisition_purged(self, acq_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE acquisitions SET purged=1 WHERE id=?", (acq_id,))

    def stale_unmatched(self, before: float) -> list[dict[str, Any]]:
        """Acquisitions that no rule took (or that failed) whose last instance came before ``before``."""
        return self._all("SELECT * FROM acquisitions WHERE state IN ('unmatched','failed') AND purged=0"
                         " AND last_seen < ? ORDER BY last_seen", (before,))

    # ----------------------------------------------------------------------- jobs
    def create_job(self, acq_id: int, generation: int, *, rule: str, preset: str, destinations: list[dict],
                   params: dict | None = None, state: str = "queued", reason: str | None = None) -> str:
        """Create (or, for the same acquisition generation, re-queue) a job; returns its id."""
        job_id = f"job-{acq_id}-{generation}"
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, acquisition_id, state, rule, preset, destinations, params, reason, created_at,"
                " finished_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                " rule=excluded.rule, preset=excluded.preset, destinations=excluded.destinations,"
                " params=excluded.params, reason=excluded.reason, finished_at=excluded.finished_at",
                (job_id, acq_id, state, rule, preset, json.dumps(destinations), json.dumps(params or {}), reason, now,
                 now if state in ("done", "failed") else None))
        return job_id

    def job(self, job_id: str) -> dict[str, Any] | None:
        return _decode_job(self._one("SELECT * FROM jobs WHERE id=?", (job_id,)))

    def jobs(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if state is None:
            rows = self._all("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM jobs WHERE state=? ORDER BY created_at DESC LIMIT ?", (state, limit))
        return [_decode_job(r) for r in rows]

    def claim_next_job(self) -> dict[str, Any] | None:
        """Atomically move the oldest queued job to running and return it (None when none waits)."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY created_at LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', started_at=?, attempts=attempts+1, reason=NULL WHERE id=?",
                       (time.time(), row["id"]))
            _acquisition_follows_job(db, row["id"], "running")
        return self.job(row["id"])

    def finish_job(self, job_id: str, state: str, *, reason: str | None = None, output_dir: str | None = None,
                   outputs: list[str] | None = None, summary: dict | None = None) -> None:
        """Record a job's end (``done``, ``failed``, or ``queued`` to resume it); its acquisition
        follows (with the reason)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state=?, reason=?, finished_at=?, output_dir=coalesce(?, output_dir),"
                " outputs=coalesce(?, outputs), summary=coalesce(?, summary) WHERE id=?",
                (state, reason, time.time(), output_dir, None if outputs is None else json.dumps(outputs),
                 None if summary is None else json.dumps(summary, default=str), job_id))
            _acquisition_follows_job(db, job_id, state, reason)

    def retry_job(self, job_id: str) -> dict[str, Any] | None:
        """Put a failed (or done) job back in the queue; returns the job, None if unknown."""
        with self.transaction() as db:
            cur = db.execute("UPDATE jobs SET state='queued', reason=NULL, finished_at=NULL, purged=0"
                             " WHERE id=? AND state IN ('failed','done')", (job_id,))
            if cur.rowcount == 1:
                _acquisition_follows_job(db, job_id, "queued")
        return self.job(job_id)

    def requeue_running_jobs(self) -> list[str]:
        """After a restart: every job that was running goes back to the queue (it is resumed)."""
        with self.transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state='running'")]
            db.execute("UPDATE jobs SET state='queued' WHERE state='running'")
            for job_id in ids:
                _acquisition_follows_job(db, job_id, "queued")
        return ids

    def job_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in JOB_STATES}
        for r in self._all("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def done_jobs_unpurged(self) -> list[dict[str, Any]]:
        return [_decode_job(r) for r in
                self._all("SELECT * FROM jobs WHERE state='done' AND purged=0 ORDER BY finished_at")]

    def failed_jobs_with_outputs(self) -> list[dict[str, Any]]:
        """Failed jobs that kept outputs (series handed over before the failure), not yet purged."""
        return [_decode_job(r) for r in
                self._all("SELECT * FROM jobs WHERE state='failed' AND purged=0 AND output_dir IS NOT NULL"
                          " ORDER BY finished_at")]

    def mark_job_purged(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET purged=1 WHERE id=?", (job_id,))

    def forget_instances_of_acquisition(self, acq_id: int) -> None:
        """Drop the instance rows of an acquisition whose files retention deleted (series rows stay)."""
        with self._lock:
            self._db.execute("DELETE FROM instances WHERE series_instance_uid IN"
                             " (SELECT series_instance_uid FROM series WHERE acquisition_id=?)", (acq_id,))


def _acquisition_follows_job(db: sqlite3.Connection, job_id: str, state: str, reason: str | None = None) -> None:
    """Give the job's acquisition the job's ``state`` (and reason), inside the caller's
    transaction, unless the acquisition moved on to a newer generation (re-opened by new
    instances: its old job no longer speaks for it)."""
    db.execute("UPDATE acquisitions SET state=?, reason=? WHERE id=(SELECT acquisition_id FROM jobs WHERE id=?)"
               " AND 'job-' || id || '-' || generation = ?", (state, reason, job_id, job_id))


def _decode_job(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    for key, default in (("destinations", []), ("params", {}), ("outputs", []), ("summary", {})):
        row[key] = json.loads(row[key]) if row.get(key) else default
    return row
