"""Index: instances once, classification counts, acquisitions re-open, the job queue survives a restart."""

import threading

from qsmnode.node.index import Index


def add(index, sop, series="1.1", study="1.0", path=None, ae="MR1", t=100.0):
    return index.add_instance(sop, series, study, path or f"/spool/{sop}.dcm", calling_ae=ae, received_at=t)


def classify_all(index, key="acq-1", expected=2, component="magnitude"):
    acq = None
    for row in index.unclassified():
        acq = index.record_classification(row, component=component, echo_numbers=(1,), instance_number=int(row["sop_instance_uid"].split(".")[-1]),
                                          acquisition_key=key, expected_in_series=expected, description="gre")
    return acq


def test_instances_are_indexed_once(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    assert add(index, "9.1") and not add(index, "9.1")
    assert index.has_instance("9.1") and index.instance_paths() == {"/spool/9.1.dcm"}
    assert index.pending_classification() == 1


def test_classification_builds_series_and_acquisition_counts(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    add(index, "9.1")
    add(index, "9.2", ae="MR2", t=105.0)
    acq_id = classify_all(index)
    (acq,) = index.acquisitions("receiving")
    assert acq["id"] == acq_id and acq["first_seen"] == 100.0 and acq["last_seen"] == 105.0
    assert acq["calling_aes"] == "MR1\\MR2"
    (series,) = index.series_of_acquisition(acq_id)
    assert series["received"] == 2 and series["expected"] == 2 and series["component"] == "magnitude"
    assert [i["instance_number"] for i in index.instances_of_acquisition(acq_id)] == [1, 2]
    assert index.pending_classification() == 0


def test_new_instance_reopens_a_closed_acquisition_with_a_new_generation(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    add(index, "9.1")
    acq_id = classify_all(index)
    assert index.set_acquisition_state(acq_id, "failed", "short", generation=1)
    add(index, "9.2", t=200.0)
    classify_all(index)
    acq = index.acquisition(acq_id)
    assert acq["state"] == "receiving" and acq["generation"] == 2 and acq["reason"] is None
    assert not index.set_acquisition_state(acq_id, "queued", generation=1)  # stale decision is ignored


def test_job_queue_claim_finish_retry_and_restart(tmp_path):
    db = tmp_path / "i.sqlite"
    index = Index(db)
    a = index.create_job(1, 1, rule="default", preset="auto", destinations=[{"name": "pacs"}], params={"x": 1})
    b = index.create_job(2, 1, rule="default", preset="auto", destinations=[])
    assert (a, b) == ("job-1-1", "job-2-1")
    job = index.claim_next_job()
    assert job["id"] == a and job["state"] == "running" and job["attempts"] == 1
    assert job["destinations"] == [{"name": "pacs"}] and job["params"] == {"x": 1}
    index.finish_job(a, "failed", reason="InputRefused: phase missing")
    assert index.job(a)["reason"] == "InputRefused: phase missing"
    assert [j["id"] for j in index.jobs("failed")] == [a]
    assert index.retry_job(a)["state"] == "queued"
    index.claim_next_job()
    index.close()
    # the node died: a second process opens the same file and resumes the running job
    index2 = Index(db)
    assert index2.requeue_running_jobs() == [a]
    counts = index2.job_counts()
    assert counts["running"] == 0 and counts["queued"] == 2
    index2.finish_job(a, "done", output_dir="/out/a", outputs=["/out/a/1.dcm"], summary={"stage_seconds": {"load": 1}})
    assert index2.job(a)["outputs"] == ["/out/a/1.dcm"]
    assert [j["id"] for j in index2.done_jobs_unpurged()] == [a]
    index2.mark_job_purged(a)
    assert index2.done_jobs_unpurged() == []


def test_claims_from_threads_never_hand_out_a_job_twice(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    for n in range(40):
        index.create_job(n, 1, rule="r", preset="auto", destinations=[])
    got, lock = [], threading.Lock()

    def claim():
        while (job := index.claim_next_job()) is not None:
            with lock:
                got.append(job["id"])

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"job-{n}-1" for n in range(40))


def test_jobs_and_retry_commands(tmp_path, capsys):
    from qsmnode.cli import main

    index = Index(tmp_path / "index.sqlite")
    job = index.create_job(3, 1, rule="default", preset="auto", destinations=[{"name": "pacs"}])
    index.claim_next_job()
    index.finish_job(job, "failed", reason="InputRefused: echo 3 of the phase series is missing")
    index.close()
    assert main(["jobs", "--storage", str(tmp_path), "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert job in out and "echo 3 of the phase series is missing" in out and "pacs" in out
    assert main(["retry", "--storage", str(tmp_path), job]) == 0
    assert "queued" in capsys.readouterr().out
    assert main(["retry", "--storage", str(tmp_path), job]) == 2  # queued jobs cannot be retried again
    assert "only failed or done jobs" in capsys.readouterr().err
    assert main(["retry", "--storage", str(tmp_path), "job-9-9"]) == 2
    assert "no job 'job-9-9'" in capsys.readouterr().err
    assert main(["jobs", "--storage", str(tmp_path / "nowhere")]) == 2
    assert "no node index" in capsys.readouterr().err


def test_acquisition_state_follows_its_job(tmp_path):
    """Issue 13 item 11: the acquisition no longer stays 'queued' once its job ran, failed or was retried."""
    index = Index(tmp_path / "i.sqlite")
    add(index, "9.1")
    acq_id = classify_all(index)
    job = index.create_job(acq_id, 1, rule="default", preset="auto", destinations=[])
    assert index.set_acquisition_state(acq_id, "queued", generation=1)
    index.claim_next_job()
    assert index.acquisition(acq_id)["state"] == "running"
    index.finish_job(job, "failed", reason="InputRefused: phase missing")
    acq = index.acquisition(acq_id)
    assert (acq["state"], acq["reason"]) == ("failed", "InputRefused: phase missing")
    index.retry_job(job)
    assert index.acquisition(acq_id)["state"] == "queued" and index.acquisition(acq_id)["reason"] is None
    index.claim_next_job()
    assert index.requeue_running_jobs() == [job] and index.acquisition(acq_id)["state"] == "queued"
    index.claim_next_job()
    index.finish_job(job, "done", output_dir="/out", outputs=[])
    assert index.acquisition(acq_id)["state"] == "done"


def test_an_old_job_does_not_speak_for_a_reopened_acquisition(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    add(index, "9.1")
    acq_id = classify_all(index)
    job = index.create_job(acq_id, 1, rule="default", preset="auto", destinations=[])
    index.set_acquisition_state(acq_id, "queued", generation=1)
    index.claim_next_job()
    add(index, "9.2", t=200.0)
    classify_all(index)  # a late instance re-opens it (generation 2) while job-1-1 runs
    index.finish_job(job, "done", output_dir="/out", outputs=[])
    acq = index.acquisition(acq_id)
    assert (acq["state"], acq["generation"]) == ("receiving", 2)
