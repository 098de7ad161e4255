"""``qsmnode serve``: wire receiver, tracker, worker, dispatcher, retention, HTTP and audit into one node.

On start the node resumes where it stopped: the receive journal is replayed, spool files the index
lacks are indexed again, temporary files and partial outputs are removed, jobs that were running
are queued again and the dispatcher's outbox carries on. SIGTERM/SIGINT stop it cleanly: the receiver stops taking
associations, a running job's child is killed and its job re-queued, the outbox is kept.
Logging goes to stderr, one line per event, without patient names (UIDs only), library messages
included (:mod:`qsmnode.logs`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict

from qsmnode.logs import PynetdicomOnlyInDebug, setup_logging  # noqa: F401 - imported from here too
from qsmnode.node.index import Index
from qsmnode.node.spool import Spool

log = logging.getLogger("qsmnode.node")


class Node:
    """One running node built from a :class:`qsmnode.config.NodeConfig`."""

    def __init__(self, config):
        from qsmnode.node.audit import AuditLog
        from qsmnode.node.classifier import ClassifierProcess
        from qsmnode.node.dispatch import Dispatcher
        from qsmnode.node.metrics import NodeMetrics
        from qsmnode.node.retention import Retention
        from qsmnode.node.scp import Receiver
        from qsmnode.node.tracker import Tracker
        from qsmnode.node.worker import WorkerPool

        self.config = config
        config.storage.mkdir(parents=True, exist_ok=True)
        self.metrics = NodeMetrics()
        self.audit = AuditLog(config.audit_path)
        self.index = Index(config.db_path)
        self.spool = Spool(config.storage, fsync_directory=config.fsync_directory)
        self.dispatcher = Dispatcher(config.db_path, config.ae_title, self.metrics, self.audit,
                                     **asdict(config.dispatch), on_job_done=self._on_dispatched)
        self.worker = WorkerPool(config, self.index, self.dispatcher, metrics=self.metrics, audit=self.audit)
        self.classifier = ClassifierProcess()
        self.tracker = Tracker(config, self.index, spool=self.spool, metrics=self.metrics, audit=self.audit,
                               on_job=self.worker.notify, classifier=self.classifier)
        self.receiver = Receiver(config, self.spool, self.index, self.metrics, self.audit,
                                 on_stored=self.tracker.notify)
        self.retention = Retention(config, self.index, self.spool, self.dispatcher, audit=self.audit)
        self.http = None
        self._stop = threading.Event()
        self._gauges: threading.Thread | None = None
        self.started_at = None

    def _on_dispatched(self, job_id: str, state: str, reason: str | None) -> None:
        """A job's dispatch ended. The outbox keeps the state (``qsmnode jobs`` shows it); this
        says it in the log, and how to deliver again once the destination is fixed."""
        if state == "sent":
            log.info("job %s: every output delivered", job_id)
        else:
            log.error("job %s: delivery failed: %s (once the destination is fixed: qsmnode retry %s)",
                      job_id, reason, job_id)

    def health(self) -> dict:
        free = self.spool.free_mb()
        counts = self.index.job_counts()
        disk_ok = free >= self.config.min_free_disk_mb
        receiving = self.receiver.listening
        out = {
            "healthy": bool(disk_ok and receiving),
            "status": "ok" if disk_ok and receiving else "degraded",
            "ae_title": self.config.ae_title,
            "dicom_port": self.receiver.port,
            "receiver": "listening" if receiving else "stopped",
            "disk_free_mb": round(free),
            "disk_watermark_mb": self.config.min_free_disk_mb,
            "jobs": counts,
            "uptime_s": round(time.time() - (self.started_at or time.time()), 1),
        }
        try:
            out["dispatch"] = self.dispatcher.health()
        except Exception as err:  # noqa: BLE001
            out["dispatch"] = {"error": str(err)}
        if not disk_ok:
            out["reason"] = f"free disk {free:.0f} MiB below the watermark {self.config.min_free_disk_mb:.0f} MiB"
        return out

    def _update_gauges(self) -> None:
        while not self._stop.wait(2.0):
            try:
                counts = self.index.job_counts()
                for state, n in counts.items():
                    self.metrics.jobs.labels(state=state).set(n)
                self.metrics.queue_depth.set(counts.get("queued", 0))
            except Exception:  # noqa: BLE001
                log.debug("gauge update failed", exc_info=True)

    def start(self) -> None:
        cfg = self.config
        self.started_at = time.time()
        self.spool.open()
        added = self.spool.reconcile(self.index)
        if added:
            log.info("resumed: %d spool file(s) were not in the index and were added back", added)
        requeued = self.index.requeue_running_jobs()
        if requeued:
            log.info("resumed: job(s) %s were running when the node stopped; queued again", ", ".join(requeued))
        self.dispatcher.start()
        self.classifier.start()
        self.tracker.start()
        self.worker.start()
        self.retention.start()
        self.receiver.start()
        if cfg.http_port >= 0:
            from qsmnode.node.http import HttpServer

            self.http = HttpServer(cfg.http_bind, cfg.http_port, self.metrics, self.health)
            self.http.start()
        self._gauges = threading.Thread(target=self._update_gauges, name="qsmnode-gauges", daemon=True)
        self._gauges.start()
        self.audit.record("started", ae_title=cfg.ae_title, port=self.receiver.port, storage=str(cfg.storage),
                          device=cfg.device, rules=[r.name for r in cfg.effective_rules],
                          destinations=sorted(cfg.destinations), requeued_jobs=requeued, reindexed=added)
        log.info("node %s ready: DICOM %s:%d%s, storage %s, device %s, rules %s, destinations %s", cfg.ae_title,
                 cfg.bind, self.receiver.port, f", HTTP {cfg.http_bind}:{self.http.port}" if self.http else "",
                 cfg.storage, cfg.device, ", ".join(r.name for r in cfg.effective_rules),
                 ", ".join(sorted(cfg.destinations)) or "none")

    def stop(self) -> None:
        self._stop.set()
        log.info("stopping")
        self.receiver.stop()
        self.spool.close()
        self.tracker.stop()
        self.classifier.close()
        self.worker.stop()
        self.retention.stop()
        self.dispatcher.stop()
        if self.http is not None:
            self.http.stop()
        self.audit.record("stopped")
        self.audit.close()
        self.index.close()
        log.info("stopped")

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass


def serve(config) -> int:
    """Run a node until SIGTERM/SIGINT. Returns the exit status."""
    setup_logging(config.log_level)
    node = Node(config)

    def on_signal(signum, _frame):
        log.info("signal %s received", signal.Signals(signum).name)
        node._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    return 0
