"""The job queue, as people and the CLI see it: list, inspect and retry jobs in the node's index.

Jobs live in the ``jobs`` table of the index (:mod:`qsmnode.node.index`): the tracker creates
them (``queued``, or ``failed`` for an incomplete acquisition), the worker moves them through
``running`` to ``done`` or ``failed`` (with the reason), ``qsmnode retry`` puts a failed one back
to ``queued``; a running node picks it up within a second. These functions work on the index
file directly, so they run beside a live node (SQLite WAL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qsmnode.errors import QsmNodeError
from qsmnode.node.index import JOB_STATES, Index


class JobError(QsmNodeError):
    """A job command cannot do what was asked (unknown job, wrong state, no index)."""


def open_index(storage: str | Path) -> Index:
    """The index of the node whose storage folder is ``storage``; JobError if there is none."""
    db = Path(storage) / "index.sqlite"
    if not db.is_file():
        raise JobError(f"no node index at {db}", "pass the node's --storage folder or its --config file")
    return Index(db)


def list_jobs(index: Index, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Jobs, newest first; ``state`` one of queued, running, done, failed (None: all)."""
    if state is not None and state not in JOB_STATES:
        raise JobError(f"unknown job state {state!r}", f"use one of {', '.join(JOB_STATES)}")
    return index.jobs(state, limit)


def retry(index: Index, job_id: str) -> dict[str, Any]:
    """Put a failed (or done) job back in the queue; JobError when it is unknown or still active."""
    job = index.job(job_id)
    if job is None:
        raise JobError(f"no job {job_id!r}", "list the jobs with `qsmnode jobs`")
    if job["state"] in ("queued", "running"):
        raise JobError(f"job {job_id} is {job['state']}; only failed or done jobs can be retried")
    return index.retry_job(job_id)


def _age(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0.0, now - t)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def format_jobs(jobs: list[dict[str, Any]], now: float | None = None) -> str:
    """A table for people: id, state, age, rule, destinations, reason (one line per job)."""
    now = time.time() if now is None else now
    if not jobs:
        return "no jobs"
    lines = [f"{'JOB':<16} {'STATE':<8} {'AGE':>6} {'TRIES':>5} {'RULE':<12} {'DESTINATIONS':<20} REASON"]
    for j in jobs:
        dests = ",".join(d.get("name", "?") for d in j.get("destinations") or []) or "-"
        lines.append(f"{j['id']:<16} {j['state']:<8} {_age(j['created_at'], now):>6} {j['attempts']:>5} "
                     f"{(j.get('rule') or '-'):<12} {dests:<20} {j.get('reason') or ''}")
    return "\n".join(lines)
