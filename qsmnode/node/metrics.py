"""Prometheus metrics of one node, in their own registry (no process-global state).

Every hop of the node's path (receiver, tracker, jobs, worker, dispatcher) counts into one
:class:`NodeMetrics` that the HTTP endpoint ``GET /metrics`` renders in the Prometheus text
exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/).
Units: seconds for durations, bytes for memory.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: Buckets for per-stage durations (seconds): from a fast fsync to a slow CPU reconstruction.
STAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)

#: Content type of :meth:`NodeMetrics.render`'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class NodeMetrics:
    """The node's metrics, each registered in this object's own ``CollectorRegistry``.

    Attributes (Prometheus names in brackets):

    - ``instances_received`` Counter, label ``outcome`` = stored|duplicate|rejected
      [``qsmnode_instances_received_total``]
    - ``associations`` Counter, label ``outcome`` = accepted|rejected [``qsmnode_associations_total``]
    - ``jobs`` Gauge, label ``state`` (queued, running, done, failed, ...) [``qsmnode_jobs``]
    - ``stage_seconds`` Histogram, label ``stage`` (receive, load, reconstruct, write, dispatch, ...)
      [``qsmnode_stage_seconds``]
    - ``queue_depth`` Gauge, jobs waiting for a worker [``qsmnode_queue_depth``]
    - ``dispatch_retries`` Counter, label ``destination`` [``qsmnode_dispatch_retries_total``]
    - ``dispatched_instances`` Counter, labels ``destination``, ``outcome`` = sent|failed
      [``qsmnode_dispatched_instances_total``]
    - ``gpu_memory_bytes`` Gauge, GPU memory in use by the node [``qsmnode_gpu_memory_bytes``]
    - ``outbox_pending`` Gauge, files waiting in the dispatcher's outbox [``qsmnode_outbox_pending``]
    """

    def __init__(self, namespace: str = "qsmnode") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.instances_received = Counter(
            "instances_received", "DICOM instances received by the C-STORE SCP, by outcome",
            ["outcome"], namespace=ns, registry=r)
        self.associations = Counter(
            "associations", "DICOM associations requested of the node, by outcome",
            ["outcome"], namespace=ns, registry=r)
        self.jobs = Gauge("jobs", "Jobs in the index, by state", ["state"], namespace=ns, registry=r)
        self.stage_seconds = Histogram(
            "stage_seconds", "Duration of each processing stage in seconds", ["stage"],
            namespace=ns, registry=r, buckets=STAGE_BUCKETS_S)
        self.queue_depth = Gauge("queue_depth", "Jobs waiting for a worker", namespace=ns, registry=r)
        self.dispatch_retries = Counter(
            "dispatch_retries", "Dispatch attempts that failed and were scheduled again",
            ["destination"], namespace=ns, registry=r)
        self.dispatched_instances = Counter(
            "dispatched_instances", "Output instances sent to destinations, by outcome",
            ["destination", "outcome"], namespace=ns, registry=r)
        self.gpu_memory_bytes = Gauge(
            "gpu_memory_bytes", "GPU memory in use by the node's reconstruction, bytes",
            namespace=ns, registry=r)
        self.outbox_pending = Gauge(
            "outbox_pending", "Files waiting in the dispatcher's outbox", namespace=ns, registry=r)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format (UTF-8 bytes)."""
        return generate_latest(self.registry)
