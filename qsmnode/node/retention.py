"""Retention: delete received and output files once their job's outputs are delivered.

A job's input instances (spool) and outputs (``outputs/<job>/``) are deleted ``keep_hours`` after
the job finished, once the dispatcher says every destination has every file
(:meth:`Dispatcher.job_dispatched`); a job without destinations counts as delivered. When free
disk drops below ``pressure_free_disk_mb`` the same files go at once, oldest job first, until
there is room again. Acquisitions that no rule took, or that failed, lose their files
``keep_hours`` after their last instance (a failed job can be retried until then). A failed job
that kept the series it handed over before it failed (:mod:`qsmnode.node.worker`) loses those
output files on the same terms as a done job's (its inputs stay for a retry). Nothing that
still waits for delivery is ever deleted.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from qsmnode.node.spool import free_mb

log = logging.getLogger("qsmnode.retention")


class Retention:
    """Periodic clean-up (see module docstring). ``dispatcher`` may be None (nothing is delivered)."""

    def __init__(self, config, index, spool, dispatcher=None, *, audit=None, period_seconds: float = 30.0,
                 clock=time.time):
        self.config = config
        self.index = index
        self.spool = spool
        self.dispatcher = dispatcher
        self.audit = audit
        self.period_seconds = period_seconds
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qsmnode-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_seconds):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001
                log.exception("retention sweep failed; will try again")

    def _delivered(self, job: dict) -> bool:
        if not job.get("destinations"):
            return True
        return self.dispatcher is not None and self.dispatcher.job_dispatched(job["id"])

    def under_pressure(self) -> bool:
        return free_mb(self.spool.root) < self.config.pressure_free_disk_mb

    def sweep(self, now: float | None = None) -> int:
        """Delete what may go; returns the number of jobs/acquisitions cleaned."""
        now = self.clock() if now is None else now
        keep = self.config.retention_hours * 3600.0
        cleaned = 0
        for job in self.index.done_jobs_unpurged():  # oldest first
            if not self._delivered(job):
                continue
            if now - (job.get("finished_at") or now) < keep and not self.under_pressure():
                continue
            self._purge_job(job, now)
            cleaned += 1
        for job in self.index.failed_jobs_with_outputs():
            if not self._delivered(job):
                continue
            if now - (job.get("finished_at") or now) < keep and not self.under_pressure():
                continue
            out = Path(job["output_dir"])
            n_out = sum(1 for f in out.rglob("*") if f.is_file()) if out.exists() else 0
            shutil.rmtree(out, ignore_errors=True)
            self.index.mark_job_purged(job["id"])
            log.info("retention: failed job %s: deleted the %d output files it had kept", job["id"], n_out)
            if self.audit:
                self.audit.record("deleted", job_id=job["id"], inputs=0, outputs=n_out,
                                  pressure=self.under_pressure())
            cleaned += 1
        for acq in self.index.stale_unmatched(now - keep):
            self._purge_inputs(acq["id"])
            self.index.mark_acquisition_purged(acq["id"])
            cleaned += 1
        return cleaned

    def _purge_inputs(self, acq_id: int) -> int:
        paths = [i["path"] for i in self.index.instances_of_acquisition(acq_id)]
        n = self.spool.remove_files(paths)
        self.index.forget_instances_of_acquisition(acq_id)
        return n

    def _purge_job(self, job: dict, now: float) -> None:
        n_out = 0
        if job.get("output_dir"):
            out = Path(job["output_dir"])
            n_out = sum(1 for _ in out.rglob("*") if _.is_file()) if out.exists() else 0
            shutil.rmtree(out, ignore_errors=True)
        acq = self.index.acquisition(job["acquisition_id"])
        n_in = 0
        if acq is not None and acq["state"] == "done" and job["id"] == f"job-{acq['id']}-{acq['generation']}":
            n_in = self._purge_inputs(acq["id"])
            self.index.mark_acquisition_purged(acq["id"])
        self.index.mark_job_purged(job["id"])
        log.info("retention: job %s delivered; deleted %d input and %d output files", job["id"], n_in, n_out)
        if self.audit:
            self.audit.record("deleted", job_id=job["id"], inputs=n_in, outputs=n_out,
                              pressure=self.under_pressure())
