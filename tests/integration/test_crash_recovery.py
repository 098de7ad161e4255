"""SIGKILL the node in the middle of receiving and again in the middle of a job: after each restart
every acknowledged instance is there, the job completes, and PACS gets every output exactly once."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from conftest import STORESCU_BIN, require_tools, storescu
from node_helpers import ECHOSCU_BIN, NodeProcess, storescu_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def acknowledged(storescu_output: str) -> list[str]:
    """Files whose C-STORE got a Success response, from ``storescu -v`` output."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def processes_with(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_sigkill_while_receiving_and_while_processing(tmp_path, free_port, orthanc, simulated_scan):
    require_tools(ECHOSCU_BIN, STORESCU_BIN)
    scan = simulated_scan(vendor="siemens", matrix=(48, 48, 32))
    node = NodeProcess(tmp_path / "node", free_port(), quiet_seconds=3.0, incomplete_cap_seconds=60.0,
                       destinations=[{"name": "pacs", "address": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"}])
    node.start()
    # 1. crash in the middle of receiving
    sender = subprocess.Popen(storescu_command([scan.dicom_dir], node.port, extra_args=["-v"]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spool = node.storage / "spool"
    node.wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 60, 60, "60 instances in the spool", poll_s=0.05)
    node.kill()
    out, _ = sender.communicate(timeout=60)
    acked = acknowledged(out)
    assert 0 < len(acked) < len(scan.paths), "the crash did not land in the middle of the transfer"
    assert sender.returncode != 0

    node.start()
    index = node.index()
    try:
        for path in acked:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert index.has_instance(uid), f"acknowledged instance {uid} lost in the crash"
    finally:
        index.close()
    for f in spool.rglob("*.dcm"):
        pydicom.dcmread(f)  # every file the node kept is whole

    # 2. the scanner sends the study again (as it does after a failed transfer); then crash mid-job
    again = storescu([scan.dicom_dir], node.port, env={"TCP_NODELAY": "1"})
    assert again.returncode == 0, again.stderr
    running = node.wait_for(lambda: [j for j in node.jobs() if j["state"] == "running"], 120, "a running job",
                            poll_s=0.1)
    job_id = running[0]["id"]
    time.sleep(1.0)
    assert node.jobs()[0]["state"] == "running"
    # the job's process and the spare for the next job: both name the node's jobs folder
    jobs_dir = str(node.storage / "jobs")
    assert len(processes_with(jobs_dir)) >= 2, "no job process and spare while the job runs"
    node.kill()
    deadline = time.monotonic() + 10
    while processes_with(jobs_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(jobs_dir), "the job's child process (or a spare) outlived the node"

    # 3. restart: the job is resumed and completes; PACS gets every output once
    node.start()
    try:
        (job,) = node.wait_for_jobs(1, timeout_s=300)
        assert job["id"] == job_id and job["state"] == "done", job["reason"]
        assert job["attempts"] == 2
        assert "queued again" in node.log()
        n = len(job["outputs"])
        assert orthanc.wait_for_instances(n, timeout_s=120) == n
        time.sleep(2.0)
        assert orthanc.instance_count() == n  # no duplicate output
        assert all(os.path.exists(p) for p in job["outputs"])
        assert not list((node.storage / "outputs").glob(".*.partial"))
    finally:
        node.stop()
