"""The job queue, as people and the CLI see it: list, inspect and retry jobs in the node's index.

Jobs live in the ``jobs`` table of the index (:mod:`qsmnode.node.index`): the tracker creates
them (``queued``, or ``failed`` for an incomplete acquisition), the worker moves them through
``running`` to ``done`` or ``failed`` (with the reason) and hands a done job's outputs to the
dispatcher's outbox (:mod:`qsmnode.node.dispatch`), which delivers them to each destination.
A job's *delivery* is read from the outbox: ``delivered`` (every destination has every file),
``delivering`` (files still to try, or the job is still making outputs: the worker hands each
series over as soon as it is written), ``failed`` (nothing left to try, some file given up, with
the reason) or ``None`` (nothing to deliver). A job that failed after some of its series were
handed over keeps them (they are complete): its state is ``failed`` with the reason, and its
delivery says where those series stand.

``qsmnode retry`` puts a failed job back to ``queued`` (it is reconstructed again); for a done job
whose delivery failed or is still waiting, it queues the undelivered files again for now, without
reconstructing, as long as they are on disk. A running node picks either up within seconds.
These functions work on the index file directly, so they run beside a live node (SQLite WAL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qsmnode.errors import QsmNodeError
from qsmnode.node.dispatch import (Delivery, OutputsMissing, delivery_state, read_deliveries,
                                   requeue_deliveries)
from qsmnode.node.index import JOB_STATES, Index

#: what ``delivery_state`` says -> what people read
_DELIVERY_WORDS = {"sent": "delivered", "pending": "delivering", "failed": "failed", "unknown": None}
DELIVERY_STATES = ("delivered", "delivering", "failed")


class JobError(QsmNodeError):
    """A job command cannot do what was asked (unknown job, wrong state, no index)."""


def open_index(storage: str | Path) -> Index:
    """The index of the node whose storage folder is ``storage``; JobError if there is none."""
    db = Path(storage) / "index.sqlite"
    if not db.is_file():
        raise JobError(f"no node index at {db}", "pass the node's --storage folder or its --config file")
    return Index(db)


def delivery_of(deliveries: list[Delivery]) -> dict[str, Any]:
    """A job's delivery for people and ``--json``: ``state`` (see the module docstring), ``reason``
    (why a file was given up, else ``"retrying: "`` and the last error of a destination being
    retried, else ``None``) and one entry per destination."""
    failure = next((f"{d.destination}: {d.failure}" for d in deliveries if d.failure), None)
    retrying = next((f"retrying: {d.destination}: {d.last_error}" for d in deliveries
                     if d.pending and d.last_error), None)
    return {"state": _DELIVERY_WORDS[delivery_state(deliveries)], "reason": failure or retrying,
            "destinations": [{"name": d.destination, "sent": d.sent, "pending": d.pending, "failed": d.failed,
                              "failure": d.failure, "last_error": d.last_error,
                              "next_attempt_at": d.next_attempt_at, "producing": d.producing}
                             for d in deliveries]}


def list_jobs(index: Index, state: str | None = None, limit: int = 100,
              delivery: str | None = None) -> list[dict[str, Any]]:
    """Jobs, newest first, each with its ``delivery`` (:func:`delivery_of`); ``state`` one of
    queued, running, done, failed, and ``delivery`` one of delivered, delivering, failed (None: all)."""
    if state is not None and state not in JOB_STATES:
        raise JobError(f"unknown job state {state!r}", f"use one of {', '.join(JOB_STATES)}")
    if delivery is not None and delivery not in DELIVERY_STATES:
        raise JobError(f"unknown delivery state {delivery!r}", f"use one of {', '.join(DELIVERY_STATES)}")
    if delivery is None:
        jobs = index.jobs(state, limit)
        deliveries = read_deliveries(index.path, [j["id"] for j in jobs])
    else:  # the filter is on the outbox: read it whole, then keep the newest matching jobs
        deliveries = read_deliveries(index.path)
        jobs = [j for j in index.jobs(state, limit=-1)
                if _DELIVERY_WORDS[delivery_state(deliveries.get(j["id"], []))] == delivery][:limit]
    for j in jobs:
        j["delivery"] = delivery_of(deliveries.get(j["id"], []))
    return jobs


def retry(index: Index, job_id: str, *, reprocess: bool = False) -> dict[str, Any]:
    """Retry a failed or done job; returns the job with ``retried``: what was done.

    A done job with undelivered files (failed, or still waiting for their next try) gets them
    queued again for delivery now (``retried`` ``"delivery"``, ``requeued_files`` the count),
    unless ``reprocess`` or the files are gone. Otherwise the job goes back to the job queue and
    is reconstructed again (``retried`` ``"job"``, ``note`` why, when its files were gone).
    JobError when the job is unknown, queued or running.
    """
    job = index.job(job_id)
    if job is None:
        raise JobError(f"no job {job_id!r}", "list the jobs with `qsmnode jobs`")
    if job["state"] in ("queued", "running"):
        raise JobError(f"job {job_id} is {job['state']}; only failed or done jobs can be retried")
    note = None
    if job["state"] == "done" and not reprocess:
        try:
            n = requeue_deliveries(index.path, job_id)
            if n:
                return {**job, "retried": "delivery", "requeued_files": n}
        except OutputsMissing as err:  # retention or a person removed them: make them again
            note = str(err)
    return {**index.retry_job(job_id), "retried": "job", "note": note}


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _age(t: float | None, now: float) -> str:
    return _duration(max(0.0, now - t)) if t else "-"


def _destination_line(d: dict[str, Any], now: float) -> str:
    line = f"{d['sent']} sent, {d['pending']} pending, {d['failed']} failed"
    if d.get("producing"):
        line += ", more to come"
    if d["pending"] and d.get("next_attempt_at"):
        wait = d["next_attempt_at"] - now
        line += ", next try " + (f"in {_duration(wait)}" if wait >= 1 else "now")
    return line


#: a destination of a job with nothing in the outbox for it, by job state
_NOTHING_QUEUED = {"queued": "outputs not made yet", "running": "outputs not made yet",
                   "failed": "nothing to deliver (the job failed)", "done": "nothing queued"}


def format_jobs(jobs: list[dict[str, Any]], now: float | None = None) -> str:
    """A table for people: one line per job (id, state, age, tries, rule, delivery, reason), then
    one line per destination: its files sent / pending / failed, or that the job has not made them
    yet. The reason is the job's (failed), the delivery's (delivery failed), or the last error
    while a destination is retried."""
    now = time.time() if now is None else now
    if not jobs:
        return "no jobs"
    lines = [f"{'JOB':<16} {'STATE':<8} {'AGE':>6} {'TRIES':>5} {'RULE':<12} {'DELIVERY':<16} REASON"]
    for j in jobs:
        delivery = j.get("delivery") or {}
        word = delivery.get("state")
        reason = j.get("reason") or delivery.get("reason") or ""
        shown = {"failed": "delivery failed", None: "-"}.get(word, word)
        lines.append(f"{j['id']:<16} {j['state']:<8} {_age(j['created_at'], now):>6} {j['attempts']:>5} "
                     f"{(j.get('rule') or '-'):<12} {shown:<16} {reason}".rstrip())
        queued = {d["name"]: d for d in delivery.get("destinations") or []}
        names = list(queued) + [d.get("name", "?") for d in j.get("destinations") or []
                                if d.get("name") not in queued]
        for name in names:
            text = _destination_line(queued[name], now) if name in queued else _NOTHING_QUEUED[j["state"]]
            lines.append(f"  -> {name:<20} {text}")
    return "\n".join(lines)
