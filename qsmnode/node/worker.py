"""The worker: runs queued jobs, each in a child process, and hands the outputs to the dispatcher.

Each job runs ``python -m qsmnode.node.worker SPEC RESULT`` in its own process group: the child
calls :func:`qsmnode.process.process_paths` (load -> reconstruct on the GPU when present, else the
CPU -> write) into ``outputs/.<job>.<attempt>.partial/``, fsyncs every file and writes a result
JSON. The parent kills the group when the job runs past ``job_timeout_seconds``; a crash of the
child (or of its GPU driver) only fails that job. The child dies with the node (PR_SET_PDEATHSIG),
and a job that was running when the node died is queued again on start
(:meth:`qsmnode.node.index.Index.requeue_running_jobs`). On success the partial folder is renamed
to ``outputs/<job>/`` (replacing an earlier run: output UIDs are deterministic, so a re-run replaces
rather than duplicates), the folder is fsynced, and the files are enqueued for every destination.
Failed jobs keep their reason (the loader's ``InputRefused`` message) for ``qsmnode jobs``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qsmnode.node.spool import fsync_dir, write_durably

log = logging.getLogger("qsmnode.worker")


class WorkerPool:
    """``config.workers`` threads, each running one job at a time (see module docstring).

    ``dispatcher``: N2's Dispatcher (``enqueue(job_id, destination, paths)``) or None.
    """

    def __init__(self, config, index, dispatcher=None, *, metrics=None, audit=None, poll_seconds: float = 0.5):
        self.config = config
        self.index = index
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.audit = audit
        self.poll_seconds = poll_seconds
        self.outputs = Path(config.storage) / "outputs"
        self.job_files = Path(config.storage) / "jobs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.job_files.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def notify(self, *_args) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        for leftover in self.outputs.glob(".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        for n in range(self.config.workers):
            t = threading.Thread(target=self._run, name=f"qsmnode-worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; a running child is killed and its job goes back to the queue."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            children = list(self._children.items())
        for job_id, proc in children:
            _kill_group(proc)
        for t in self._threads:
            t.join(timeout=timeout_s)
        self._threads = []

    def _run(self) -> None:
        while not self._stop.is_set():
            job = None
            try:
                job = self.index.claim_next_job()
            except Exception:  # noqa: BLE001
                log.exception("cannot read the job queue")
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception as err:  # noqa: BLE001 - one job's bug must not stop the worker
                log.exception("job %s: unexpected error", job["id"])
                self.index.finish_job(job["id"], "failed", reason=f"internal error: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ one job
    def run_job(self, job: dict[str, Any]) -> str:
        """Run one claimed job to done/failed (or back to queued when the node stops). Returns the state."""
        job_id = job["id"]
        t_start = time.monotonic()
        inputs = [i["path"] for i in self.index.instances_of_acquisition(job["acquisition_id"])]
        inputs = [p for p in inputs if os.path.exists(p)]
        if not inputs:
            return self._fail(job, "no input files left for this acquisition (deleted by retention?); send the "
                                   "series again")
        partial = self.outputs / f".{job_id}.{job['attempts']}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        params = job.get("params") or {}
        spec = {
            "job_id": job_id, "inputs": inputs, "output_dir": str(partial), "device": self.config.device,
            "preset": None if job.get("preset") in (None, "", "auto") else job["preset"],
            "overrides": params.get("overrides") or None,
            "parametric_map": params.get("parametric_map", True), "summary_image": params.get("summary_image", True),
            "parent_pid": os.getpid(),
        }
        spec_path = self.job_files / f"{job_id}.spec.json"
        result_path = self.job_files / f"{job_id}.result.json"
        result_path.unlink(missing_ok=True)
        write_durably(spec_path, json.dumps(spec).encode())
        log.info("job %s started: %d input files, device %s, preset %s", job_id, len(inputs), self.config.device,
                 job.get("preset"))
        if self.audit:
            self.audit.record("started", job_id=job_id, acquisition=job["acquisition_id"], inputs=len(inputs),
                              device=self.config.device, attempt=job["attempts"])
        with open(self.job_files / f"{job_id}.log", "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "qsmnode.node.worker", str(spec_path), str(result_path)],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            with self._lock:
                self._children[job_id] = proc
            try:
                rc = proc.wait(timeout=self.config.job_timeout_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = proc.wait()
                timed_out = True
            finally:
                with self._lock:
                    self._children.pop(job_id, None)
        if self._stop.is_set() and not result_path.exists():
            shutil.rmtree(partial, ignore_errors=True)
            self.index.finish_job(job_id, "queued", reason="node stopped while the job ran; it is resumed on start")
            return "queued"
        if timed_out:
            shutil.rmtree(partial, ignore_errors=True)
            return self._fail(job, f"time limit of {self.config.job_timeout_seconds:g} s exceeded; the job was "
                                   "killed (raise job_timeout_seconds or check the device)")
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            shutil.rmtree(partial, ignore_errors=True)
            how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
            return self._fail(job, f"the job process died ({how}) without a result; see "
                                   f"{self.job_files / (job_id + '.log')}")
        if not result.get("ok"):
            shutil.rmtree(partial, ignore_errors=True)
            return self._fail(job, result.get("reason") or "failed without a reason", kind=result.get("kind"))
        return self._succeed(job, partial, result, time.monotonic() - t_start)

    def _succeed(self, job: dict, partial: Path, result: dict, seconds: float) -> str:
        job_id = job["id"]
        final = self.outputs / job_id
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_dir(self.outputs)
        paths = [final / Path(p).relative_to(partial) for p in result["output_paths"]]
        summary = result.get("summary") or {}
        destinations = job.get("destinations") or []
        if self.dispatcher is not None:
            from qsmnode.node.dispatch import Destination

            for d in destinations:
                self.dispatcher.enqueue(job_id, Destination(**d), paths)
        self.index.finish_job(job_id, "done", output_dir=str(final), outputs=[str(p) for p in paths],
                              summary=summary)
        if self.metrics:
            for stage, s in (summary.get("stage_seconds") or {}).items():
                self.metrics.stage_seconds.labels(stage=stage).observe(float(s))
            self.metrics.stage_seconds.labels(stage="job").observe(seconds)
            if summary.get("gpu_memory_bytes"):
                self.metrics.gpu_memory_bytes.set(float(summary["gpu_memory_bytes"]))
        log.info("job %s done in %.1f s: %d output files -> %s", job_id, seconds, len(paths),
                 ", ".join(d["name"] for d in destinations) or "no destination")
        if self.audit:
            self.audit.record("processed", job_id=job_id, acquisition=job["acquisition_id"], outputs=len(paths),
                              seconds=round(seconds, 2), stage_seconds=summary.get("stage_seconds"),
                              destinations=[d["name"] for d in destinations])
        return "done"

    def _fail(self, job: dict, reason: str, kind: str | None = None) -> str:
        self.index.finish_job(job["id"], "failed", reason=reason)
        log.warning("job %s failed: %s", job["id"], reason)
        if self.audit:
            self.audit.record("failed", job_id=job["id"], acquisition=job["acquisition_id"], kind=kind, reason=reason)
        return "failed"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent (the node) dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(3)


def run_child(spec_path: str, result_path: str) -> int:
    """The child process: one process_paths call; the result (or the refusal) as durable JSON."""
    spec = json.loads(Path(spec_path).read_text())
    _die_with_parent(int(spec.get("parent_pid", os.getppid())))
    from qsmnode.errors import QsmNodeError

    out = Path(spec["output_dir"])
    try:
        from qsmnode.process import process_paths

        outcome = process_paths(spec["inputs"], out, device=spec.get("device", "auto"), preset=spec.get("preset"),
                                overrides=spec.get("overrides"), parametric_map=spec.get("parametric_map", True),
                                summary_image=spec.get("summary_image", True))
        paths = [Path(p) for p in outcome.output_paths]
        summary = dict(outcome.summary or {})
        try:
            import cupy  # type: ignore

            summary.setdefault("gpu_memory_bytes", int(cupy.get_default_memory_pool().total_bytes()))
        except Exception:  # noqa: BLE001 - no GPU: nothing to report
            pass
        for p in paths:  # outputs durable before the parent hands them to the dispatcher
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in {p.parent for p in paths}:
            fsync_dir(d)
        result = {"ok": True, "output_paths": [str(p) for p in paths], "summary": summary}
    except QsmNodeError as err:
        result = {"ok": False, "kind": type(err).__name__, "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - reported to the parent as the job's failure reason
        import traceback

        traceback.print_exc()
        result = {"ok": False, "kind": type(err).__name__, "reason": f"internal error: {type(err).__name__}: {err}"}
    write_durably(result_path, json.dumps(result, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1], sys.argv[2]))
