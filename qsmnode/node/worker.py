"""The worker: runs queued jobs, each in its own child process, and hands the outputs to the dispatcher
series by series.

**One process per job, started ahead of time.** Each worker thread keeps one *spare*: a child
``python -m qsmnode.node.worker --spare ...`` started in its own session (process group), that
dies with the node (PR_SET_PDEATHSIG), has already imported numpy, scipy, pydicom, highdicom and
every qsmnode module a job uses, loaded highdicom's tables and, with ``device`` gpu or auto on a
CUDA host, created its CUDA context (:func:`warm_up`), and then blocks reading one line on its
stdin. When the thread claims a job it writes the job's spec (JSON) on that line; the child
redirects its stdout/stderr to ``jobs/<job>.log`` (with what it printed while it waited), answers
``accepted`` and runs the job; the thread at once starts the next spare, which warms up while the
job runs. A spare is never used twice: every job gets a fresh process, so no GPU or memory state
leaks from one job into the next. A spare that died while it waited (or before it took the job)
is replaced by a fresh one, cold, and the job goes on; after three such deaths in a row the job
fails with the reason. ``stop()`` kills the spares and the running children.

**Streamed outputs.** The child runs :func:`qsmnode.process.process_paths` with the outputs in
``outputs/<job>/`` itself (one folder per series, :mod:`qsmnode.dicom.write`). Each series is
built, written durably (temp file, fsync, rename; directory fsync) and reported on a pipe (JSON
lines: ``{"event": "series", "kind", "paths"}``) while the next series is built, most important
first (QSM; :data:`qsmnode.dicom.outputs.SERIES_ORDER`); the thread enqueues each series for every
destination as it comes, so PACS gets the QSM while the rest is still being made. The last line
is the result (``{"event": "result", "ok": true, "summary": ...}`` or ``"ok": false`` with the
reason). Before the child starts, ``outputs/<job>/`` is emptied (a re-run replaces the files of an
earlier run, never mixes with them) and :meth:`Dispatcher.open_job` drops what an earlier run put
in the outbox and holds the job's delivery open: it is "delivered" only after the job finished and
every series it handed over is sent (:meth:`Dispatcher.close_job`). Output UIDs are deterministic
(:mod:`qsmnode.dicom.uids`), so a re-run after a crash sends the same SOP Instance UIDs again and
PACS keeps one copy of each.

**Failures.** A job that fails after some of its series were handed over (a later series could
not be built or written, the child crashed or ran past ``job_timeout_seconds``) keeps those
series: each is complete and valid, and they are sent (or already are). The job is marked failed
with its reason, followed by the series that were kept, e.g. ``internal error: ... (kept and
sent: QSM, SWI)``; files of a series that was not reported are deleted. ``qsmnode jobs`` shows the
failed job and the delivery of the kept series; ``qsmnode retry`` runs the job again, which
replaces them. The parent kills the child's group when the job runs past
``job_timeout_seconds``; a crash of the child (or of its GPU driver) only fails that job. A job
that was running when the node stopped or died is queued again
(:meth:`qsmnode.node.index.Index.requeue_running_jobs`) and stays open for delivery until it is
run again. Failed jobs keep their reason (the loader's ``InputRefused`` message) for
``qsmnode jobs``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from qsmnode.child_process import die_with_parent
from qsmnode.durable import fsync_dir, write_durably

log = logging.getLogger("qsmnode.worker")

#: fresh processes tried for one job when the ones before died before taking it
HANDOVER_TRIES = 3
#: a spare that died while idle is replaced at most this often (s): no spawn loop when it cannot start
SPARE_RESTART_S = 30.0


class _Child:
    """A started job process: a spare until it takes a job."""

    def __init__(self, proc: subprocess.Popen, messages_fd: int, spare_log: Path) -> None:
        self.proc = proc
        self.messages_fd = messages_fd
        self.spare_log = spare_log
        self.started = time.monotonic()
        self.job_id: str | None = None  # None while it is a spare
        self._buffer = b""
        self._eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def next_message(self, deadline: float) -> dict | None:
        """The next JSON line from the child; None at end of file (it exited); TimeoutError at
        ``deadline`` (monotonic s)."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("job process %d wrote a line that is not JSON: %r", self.pid, line[:200])
                    continue
                if isinstance(message, dict):
                    return message
                continue
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.messages_fd], [], [], remaining)
            if ready:
                chunk = os.read(self.messages_fd, 1 << 16)
                if chunk:
                    self._buffer += chunk
                else:
                    self._eof = True

    def close(self) -> None:
        """Kill the child's group (unless it exited and was reaped), reap it, close our end of its
        pipes, forget its spare log."""
        if self.proc.returncode is None:
            _kill_group(self.proc)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not take (D state)
                log.error("job process %d does not exit after SIGKILL", self.pid)
        for handle in (self.proc.stdin,):
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
        if self.messages_fd >= 0:
            os.close(self.messages_fd)
            self.messages_fd = -1
        self.spare_log.unlink(missing_ok=True)


class WorkerPool:
    """``config.workers`` threads, each running one job at a time (see module docstring).

    ``dispatcher``: the node's Dispatcher (``open_job``, ``enqueue(job_id, destination, paths)``,
    ``close_job``) or None.
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
        self._children: dict[int, _Child] = {}  # pid -> every live child: spares and running jobs
        self._running: dict[str, _Child] = {}  # job id -> its child
        self._lock = threading.Lock()
        self._local = threading.local()  # .spare: this thread's spare (_Child or None)
        self._counter = itertools.count(1)

    def notify(self, *_args) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        for leftover in self.outputs.glob(".*.partial"):  # from a version that renamed at the end
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.job_files.glob(".spare-*.log"):
            leftover.unlink(missing_ok=True)
        for n in range(self.config.workers):
            t = threading.Thread(target=self._run, name=f"qsmnode-worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; spares are killed, a running child too and its job goes back to the queue."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            _kill_group(child.proc)
        for t in self._threads:
            t.join(timeout=timeout_s)
        self._threads = []

    def spare_pids(self) -> list[int]:
        """Process ids of the spares waiting for a job (one per worker thread, once started)."""
        with self._lock:
            return [pid for pid, c in self._children.items() if c.job_id is None and c.proc.poll() is None]

    def _run(self) -> None:
        self._local.spare = None
        last_spare_start = 0.0
        try:
            while not self._stop.is_set():
                spare = self._local.spare
                if (spare is None or spare.proc.poll() is not None) and \
                        time.monotonic() - last_spare_start >= SPARE_RESTART_S:
                    if spare is not None:
                        self._lost_spare(spare, "while it waited for a job")
                    last_spare_start = time.monotonic()
                    self._local.spare = self._start_child()
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
                    if self.dispatcher is not None:
                        self.dispatcher.close_job(job["id"])
                last_spare_start = time.monotonic()  # run_job started the next spare
        finally:
            spare, self._local.spare = getattr(self._local, "spare", None), None
            if spare is not None:
                self._release(spare)

    # ------------------------------------------------------------------ child processes
    def _start_child(self) -> _Child | None:
        """A new job process (see :func:`run_spare`); None when it cannot be started or the pool stops.

        Called from a worker thread (it lives as long as the pool runs): PR_SET_PDEATHSIG fires when
        the *thread* that started the child ends.
        """
        if self._stop.is_set():
            return None
        read_fd, write_fd = os.pipe()
        spare_log = self.job_files / f".spare-{os.getpid()}-{next(self._counter)}.log"
        try:
            with open(spare_log, "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "qsmnode.node.worker", "--spare", "--messages-fd", str(write_fd),
                     "--parent-pid", str(os.getpid()), "--device", str(self.config.device),
                     "--spare-log", str(spare_log)],
                    stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                    start_new_session=True)
        except OSError as err:
            os.close(read_fd)
            spare_log.unlink(missing_ok=True)
            log.error("cannot start a job process: %s", err)
            return None
        finally:
            os.close(write_fd)
        child = _Child(proc, read_fd, spare_log)
        with self._lock:
            self._children[child.pid] = child
        if self._stop.is_set():  # stop() ran while it started: it did not see this one
            _kill_group(proc)
        return child

    def _release(self, child: _Child) -> None:
        child.close()
        with self._lock:
            self._children.pop(child.pid, None)

    def _lost_spare(self, child: _Child, when: str) -> str:
        """A spare died: log it with the end of what it printed; returns that text."""
        try:
            text = child.spare_log.read_text(errors="replace")[-2000:]
        except OSError:
            text = ""
        self._release(child)
        rc = child.proc.returncode
        how = "killed by the node" if self._stop.is_set() else (
            f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}")
        if not self._stop.is_set():
            log.warning("spare job process %d died %s (%s)%s", child.pid, when, how,
                        f": {text.strip().splitlines()[-1]}" if text.strip() else "")
        return text

    def _take_spare(self) -> _Child | None:
        """This thread's spare (or a fresh process when it has none or it died)."""
        spare = getattr(self._local, "spare", None)
        self._local.spare = None
        if spare is not None and spare.proc.poll() is not None:
            self._lost_spare(spare, "before a job was claimed; starting a fresh one")
            spare = None
        return spare if spare is not None else self._start_child()

    def _hand_over(self, child: _Child, spec: dict, deadline: float) -> bool:
        """Give ``spec`` to ``child``; True once it accepted the job, False when it died first.
        TimeoutError when ``deadline`` passes first."""
        try:
            child.proc.stdin.write((json.dumps(spec) + "\n").encode())
            child.proc.stdin.close()
        except (OSError, ValueError):  # BrokenPipeError: it is gone
            return False
        while True:
            message = child.next_message(deadline)
            if message is None:
                return False
            if message.get("event") == "accepted":
                return True

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
        out_dir = self.outputs / job_id
        if out_dir.exists():  # an earlier run: replaced, never mixed with
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        fsync_dir(self.outputs)
        if self.dispatcher is not None:
            self.dispatcher.open_job(job_id)
        params = job.get("params") or {}
        log_path = self.job_files / f"{job_id}.log"
        spec = {
            "job_id": job_id, "inputs": inputs, "output_dir": str(out_dir), "device": self.config.device,
            "preset": None if job.get("preset") in (None, "", "auto") else job["preset"],
            "overrides": params.get("overrides") or None,
            "parametric_map": params.get("parametric_map", True), "summary_image": params.get("summary_image", True),
            "log_path": str(log_path),
        }
        write_durably(self.job_files / f"{job_id}.spec.json", json.dumps(spec).encode())  # for people
        log.info("job %s started: %d input files, device %s, preset %s", job_id, len(inputs), self.config.device,
                 job.get("preset"))
        if self.audit:
            self.audit.record("started", job_id=job_id, acquisition=job["acquisition_id"], inputs=len(inputs),
                              device=self.config.device, attempt=job["attempts"])
        deadline = t_start + float(self.config.job_timeout_seconds)
        handed: list[tuple[str, list[Path]]] = []  # series handed to the dispatcher, in order
        result: dict | None = None
        timed_out = False
        child: _Child | None = None
        died_before = ""
        cannot_start = False
        warm_s = 0.0
        t_accepted = t_start
        try:
            for _attempt in range(HANDOVER_TRIES):
                child = self._take_spare()
                if child is None:
                    cannot_start = True
                    break
                warm_s = max(0.0, t_start - child.started)  # how long it was up before the job was claimed
                child.job_id = job_id
                try:
                    accepted = self._hand_over(child, spec, deadline)
                except TimeoutError:
                    timed_out = True
                    break
                if accepted:
                    log.debug("job %s: process %d took it (up %.1f s before the job)", job_id, child.pid, warm_s)
                    break
                died_before = self._lost_spare(child, f"before it took job {job_id}")
                child = None
                if self._stop.is_set():
                    break
            t_accepted = time.monotonic()
            if not self._stop.is_set():
                self._local.spare = self._start_child()  # the next job's process warms up meanwhile
            if child is not None and not timed_out:
                timed_out, result = self._follow(job, child, out_dir, deadline, handed)
        finally:
            if child is not None and result is None:  # it died or was killed: reap it (its exit status)
                self._release(child)
        try:
            return self._conclude(job, result, timed_out, child, cannot_start, died_before, handed, out_dir,
                                  log_path, t_start, t_accepted, warm_s)
        finally:
            if child is not None and result is not None:  # it said its last word: let it exit, then reap
                try:
                    child.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                self._release(child)

    def _conclude(self, job: dict, result: dict | None, timed_out: bool, child: _Child | None, cannot_start: bool,
                  died_before: str, handed: list[tuple[str, list[Path]]], out_dir: Path, log_path: Path,
                  t_start: float, t_accepted: float, warm_s: float) -> str:
        """The job's end, from what its process said (``result``) or how it ended."""
        job_id = job["id"]
        kept = [kind for kind, _ in handed]
        if result is None and self._stop.is_set():
            self.index.finish_job(job_id, "queued", reason="node stopped while the job ran; it is resumed on start")
            return "queued"
        if result is None or not result.get("ok"):
            self._remove_unreported(out_dir, handed)
        if timed_out:
            reason = (f"time limit of {self.config.job_timeout_seconds:g} s exceeded; the job was killed "
                      "(raise job_timeout_seconds or check the device)")
            return self._fail(job, reason, kept=kept, out_dir=out_dir, handed=handed)
        if child is None and cannot_start:
            return self._fail(job, "cannot start a job process (see the node's log)", kept=kept, out_dir=out_dir,
                              handed=handed)
        if child is None:
            if died_before:
                with open(log_path, "ab") as logf:
                    logf.write(died_before.encode(errors="replace"))
            return self._fail(job, f"the job process died {HANDOVER_TRIES} times before it took the job; "
                                   f"see {log_path}", kept=kept, out_dir=out_dir, handed=handed)
        if result is None:
            rc = child.proc.returncode
            how = f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
            return self._fail(job, f"the job process died ({how}) without a result; see {log_path}",
                              kept=kept, out_dir=out_dir, handed=handed)
        if not result.get("ok"):
            return self._fail(job, result.get("reason") or "failed without a reason", kind=result.get("kind"),
                              kept=kept, out_dir=out_dir, handed=handed)
        summary = dict(result.get("summary") or {})
        summary.setdefault("stage_seconds", {})["job_start"] = round(t_accepted - t_start, 3)
        summary["job_process"] = {"pid": child.pid, "up_before_job_s": round(warm_s, 3)}
        return self._succeed(job, out_dir, result, handed, summary, time.monotonic() - t_start)

    def _follow(self, job: dict, child: _Child, out_dir: Path, deadline: float,
                handed: list[tuple[str, list[Path]]]) -> tuple[bool, dict | None]:
        """Read the child's messages until its result or its end: each series is enqueued as it
        comes. Returns (timed out, result or None)."""
        with self._lock:
            self._running[job["id"]] = child
        try:
            while True:
                try:
                    message = child.next_message(deadline)
                except TimeoutError:
                    _kill_group(child.proc)
                    return True, None
                if message is None:
                    return False, None
                event = message.get("event")
                if event == "series":
                    try:
                        self._hand_series(job, out_dir, message, handed)
                    except Exception as err:  # noqa: BLE001 - the job cannot go on without its outputs sent
                        _kill_group(child.proc)
                        log.exception("job %s: cannot queue series %s", job["id"], message.get("kind"))
                        return False, {"ok": False, "kind": type(err).__name__,
                                       "reason": f"cannot queue the {message.get('kind')} series for "
                                                 f"delivery: {type(err).__name__}: {err}"}
                elif event == "result":
                    return False, message
        finally:
            with self._lock:
                self._running.pop(job["id"], None)

    def _hand_series(self, job: dict, out_dir: Path, message: dict, handed: list[tuple[str, list[Path]]]) -> None:
        kind = str(message.get("kind"))
        paths = [Path(p) for p in message.get("paths") or []]
        outside = [p for p in paths if out_dir not in p.parents]
        if outside:
            raise ValueError(f"the job process reported {outside[0]}, outside {out_dir}")
        destinations = job.get("destinations") or []
        if self.dispatcher is not None and paths:
            from qsmnode.node.dispatch import Destination

            for d in destinations:
                self.dispatcher.enqueue(job["id"], Destination(**d), paths)
        handed.append((kind, paths))
        log.info("job %s: %s written (%d file(s)), queued for %s", job["id"], kind, len(paths),
                 ", ".join(d["name"] for d in destinations) or "no destination")

    @staticmethod
    def _remove_unreported(out_dir: Path, handed: list[tuple[str, list[Path]]]) -> None:
        """After a failure: keep only the series that were handed over (complete), delete the rest."""
        if not handed:
            shutil.rmtree(out_dir, ignore_errors=True)
            return
        keep = {p for _, paths in handed for p in paths}
        keep_dirs = {p.parent for p in keep}
        for entry in out_dir.iterdir() if out_dir.exists() else ():
            if entry.is_dir() and entry in keep_dirs:
                for f in entry.iterdir():
                    if f not in keep:
                        f.unlink(missing_ok=True)
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _succeed(self, job: dict, out_dir: Path, result: dict, handed: list[tuple[str, list[Path]]],
                 summary: dict, seconds: float) -> str:
        job_id = job["id"]
        reported = {p for _, paths in handed for p in paths}
        missing = [Path(p) for p in result.get("output_paths") or [] if Path(p) not in reported]
        if missing:  # every series is reported before the result; hand over whatever was not
            self._hand_series(job, out_dir, {"kind": "rest", "paths": [str(p) for p in missing]}, handed)
        paths = [p for _, ps in handed for p in ps]
        destinations = job.get("destinations") or []
        reason = low_confidence_reason(summary)
        self.index.finish_job(job_id, "done", reason=reason, output_dir=str(out_dir),
                              outputs=[str(p) for p in paths], summary=summary)
        if reason:
            log.warning("job %s: %s", job_id, reason)
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
                              destinations=[d["name"] for d in destinations],
                              low_confidence=bool(summary.get("low_confidence")),
                              concerns=[c.get("check") for c in summary.get("concerns") or []])
        if self.dispatcher is not None:
            self.dispatcher.close_job(job_id)
        return "done"

    def _fail(self, job: dict, reason: str, kind: str | None = None, *, kept: list[str] = (),
              out_dir: Path | None = None, handed: list[tuple[str, list[Path]]] = ()) -> str:
        if kept:
            sent = "kept and sent" if job.get("destinations") else "kept"
            reason = f"{reason} ({sent}: {', '.join(kept)})"
            paths = [str(p) for _, ps in handed for p in ps]
            self.index.finish_job(job["id"], "failed", reason=reason, output_dir=str(out_dir), outputs=paths)
        else:
            self.index.finish_job(job["id"], "failed", reason=reason)
        log.warning("job %s failed: %s", job["id"], reason)
        if self.audit:
            self.audit.record("failed", job_id=job["id"], acquisition=job["acquisition_id"], kind=kind, reason=reason,
                              kept_series=list(kept))
        if self.dispatcher is not None:
            self.dispatcher.close_job(job["id"])
        return "failed"


def low_confidence_reason(summary: dict) -> str | None:
    """The job record's reason for a done job whose result is low-confidence (its outputs were
    sent, its findings withheld), from the run's summary; None for a plausible result."""
    if not summary.get("low_confidence"):
        return None
    concerns = "; ".join(c.get("headline", "") for c in summary.get("concerns") or [])
    return f"low confidence, findings withheld: {concerns}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


#: the modules a job imports, loaded by a spare before it waits for its job
WARM_MODULES = (
    "numpy", "scipy.ndimage", "scipy.fft", "pydicom", "highdicom", "qsmnode.process", "qsmnode.dicom.load",
    "qsmnode.recon.pipeline", "qsmnode.recon.mask", "qsmnode.recon.phase", "qsmnode.recon.r2star",
    "qsmnode.recon.swi", "qsmnode.dicom.outputs", "qsmnode.dicom.parametric_map", "qsmnode.dicom.write",
    "qsmnode.report.findings", "qsmnode.report.sr", "qsmnode.report.summary_image",
)


def warm_up(device: str = "auto") -> None:
    """What a job process does before it has a job: import everything a job uses and load
    highdicom's standard tables (read from JSON on first use, ~0.3 s), in a thread at nice 10
    (Linux: the nice value is per thread), so that on a small machine the warm-up of the next
    job's process takes little CPU from the job that runs meanwhile; then, with ``device`` gpu or
    auto where CuPy is installed, start the loader's reader processes
    (:func:`qsmnode.dicom.load.prestart_workers`: forked cheaply now, from this thread alone and
    before CUDA makes fork unsafe) and, on a CUDA host, create the CUDA context and load cuFFT.
    Each part that fails is only reported (the job then does it itself, or fails with its own
    clear error)."""
    import importlib.util

    thread = threading.Thread(target=_warm_imports, name="qsmnode-warm-up", daemon=True)
    thread.start()
    thread.join()
    if device in ("gpu", "auto") and importlib.util.find_spec("cupy") is not None:
        try:  # the loader's reader processes, forked now: after CUDA is initialised fork is unsafe
            from qsmnode.dicom.load import prestart_workers

            prestart_workers()
        except Exception as err:  # noqa: BLE001 - the load then starts them itself
            print(f"warm-up: reader processes: {type(err).__name__}: {err}", file=sys.stderr)
        try:
            from qsmnode.recon.backend import gpu_available

            if gpu_available():
                import cupy  # type: ignore

                a = cupy.ones((8, 8, 8), dtype=cupy.float32)
                cupy.fft.irfftn(cupy.fft.rfftn(a), a.shape)
                cupy.cuda.Stream.null.synchronize()
        except Exception as err:  # noqa: BLE001
            print(f"warm-up: GPU: {type(err).__name__}: {err}", file=sys.stderr)


def _warm_imports() -> None:
    import importlib

    try:  # this thread only; the job itself runs at the process's priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            print(f"warm-up: cannot import {name}: {type(err).__name__}: {err}", file=sys.stderr)
    try:
        from highdicom import _standard_utils as standard  # private, hence the guard

        for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
            getattr(standard, name)()
    except Exception:  # noqa: BLE001 - another highdicom version: nothing to warm
        pass


def _redirect_output(log_path: Path, spare_log: Path | None) -> None:
    """Send this process's stdout/stderr (fds 1 and 2) to the job's log, after what it printed
    while it was a spare; the spare log is removed."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if spare_log is not None:
            try:
                early = spare_log.read_bytes()
            except OSError:
                early = b""
            if early:
                os.write(fd, early)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    if spare_log is not None:
        spare_log.unlink(missing_ok=True)


def run_job_in_child(spec: dict, send: Callable[[dict], None]) -> int:
    """One job in this process: :func:`qsmnode.process.process_paths` into ``spec["output_dir"]``,
    one ``series`` message per series written, then the ``result`` message (ok, or the refusal)."""
    from qsmnode.errors import QsmNodeError

    def on_series(series) -> None:
        send({"event": "series", "kind": series.kind, "paths": [str(p) for p in series.paths],
              "build_seconds": round(series.build_seconds, 3), "write_seconds": round(series.write_seconds, 3)})

    try:
        from qsmnode.process import process_paths

        outcome = process_paths(spec["inputs"], Path(spec["output_dir"]), device=spec.get("device", "auto"),
                                preset=spec.get("preset"), overrides=spec.get("overrides"),
                                parametric_map=spec.get("parametric_map", True),
                                summary_image=spec.get("summary_image", True), on_series=on_series)
        summary = dict(outcome.summary or {})
        try:
            import cupy  # type: ignore

            summary.setdefault("gpu_memory_bytes", int(cupy.get_default_memory_pool().total_bytes()))
        except Exception:  # noqa: BLE001 - no GPU: nothing to report
            pass
        result = {"event": "result", "ok": True, "output_paths": [str(p) for p in outcome.output_paths],
                  "summary": summary}
    except QsmNodeError as err:
        result = {"event": "result", "ok": False, "kind": type(err).__name__, "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - reported to the parent as the job's failure reason
        import traceback

        traceback.print_exc()
        result = {"event": "result", "ok": False, "kind": type(err).__name__,
                  "reason": f"internal error: {type(err).__name__}: {err}"}
    send(result)
    return 0


def run_spare(messages_fd: int, parent_pid: int, device: str, spare_log: Path | None) -> int:
    """The child process: warm up, wait for one job spec on stdin, run it, report on ``messages_fd``.
    Library messages (pydicom's warnings quote header values) go through the node's filtered log."""
    from qsmnode.logs import setup_logging

    die_with_parent(parent_pid)
    setup_logging()
    channel = os.fdopen(messages_fd, "wb", buffering=0)
    lock = threading.Lock()

    def send(message: dict) -> None:
        data = (json.dumps(message, default=str) + "\n").encode()
        with lock:
            channel.write(data)

    warm_up(device)
    send({"event": "ready", "pid": os.getpid()})
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0  # the node let go of this spare without a job
    spec = json.loads(line)
    _redirect_output(Path(spec["log_path"]), spare_log)
    send({"event": "accepted", "pid": os.getpid(), "job_id": spec.get("job_id")})
    rc = run_job_in_child(spec, send)
    # everything is said and every output is durable: skip the interpreter's teardown (freeing
    # gigabytes of arrays, the CUDA context), which takes CPU from the dispatch of the outputs
    sys.stdout.flush()
    sys.stderr.flush()
    channel.close()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsmnode.node.worker",
                                 description="a job process of qsmnode serve (started by the node only)")
    ap.add_argument("--spare", action="store_true", required=True)
    ap.add_argument("--messages-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--spare-log", type=Path, default=None)
    args = ap.parse_args(argv)
    return run_spare(args.messages_fd, args.parent_pid, args.device, args.spare_log)


if __name__ == "__main__":
    sys.exit(main())
