"""NodeMetrics: own registry, every interface metric present, text exposition parses."""

from prometheus_client.parser import text_string_to_metric_families

from qsmnode.node.metrics import NodeMetrics


def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_gauges_histogram_render_with_labels():
    m = NodeMetrics()
    m.instances_received.labels(outcome="stored").inc(3)
    m.instances_received.labels(outcome="duplicate").inc()
    m.associations.labels(outcome="rejected").inc()
    m.jobs.labels(state="queued").set(2)
    m.stage_seconds.labels(stage="reconstruct").observe(4.2)
    m.queue_depth.set(5)
    m.dispatch_retries.labels(destination="pacs").inc()
    m.dispatched_instances.labels(destination="pacs", outcome="sent").inc(40)
    m.gpu_memory_bytes.set(1.5e9)
    s = _samples(m.render().decode())
    assert s[("qsmnode_instances_received_total", (("outcome", "stored"),))] == 3
    assert s[("qsmnode_instances_received_total", (("outcome", "duplicate"),))] == 1
    assert s[("qsmnode_associations_total", (("outcome", "rejected"),))] == 1
    assert s[("qsmnode_jobs", (("state", "queued"),))] == 2
    assert s[("qsmnode_stage_seconds_count", (("stage", "reconstruct"),))] == 1
    assert s[("qsmnode_stage_seconds_sum", (("stage", "reconstruct"),))] == 4.2
    assert s[("qsmnode_stage_seconds_bucket", (("le", "5.0"), ("stage", "reconstruct")))] == 1
    assert s[("qsmnode_stage_seconds_bucket", (("le", "2.5"), ("stage", "reconstruct")))] == 0
    assert s[("qsmnode_queue_depth", ())] == 5
    assert s[("qsmnode_dispatch_retries_total", (("destination", "pacs"),))] == 1
    assert s[("qsmnode_dispatched_instances_total", (("destination", "pacs"), ("outcome", "sent")))] == 40
    assert s[("qsmnode_gpu_memory_bytes", ())] == 1.5e9


def test_two_nodes_do_not_share_state():
    a, b = NodeMetrics(), NodeMetrics()  # would raise "Duplicated timeseries" on a global registry
    a.queue_depth.set(7)
    assert _samples(b.render().decode())[("qsmnode_queue_depth", ())] == 0
    assert b"process_cpu" not in a.render()  # no default process/platform collectors
