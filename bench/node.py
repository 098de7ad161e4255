"""Benchmark the node with real DICOM software: DCMTK storescu in, Orthanc out.

(a) Receive throughput, instances/s, of ``qsmnode serve`` (every instance durable before its
    C-STORE response) from DCMTK ``/usr/bin/storescu``: one association and four concurrent
    associations, each with the client as shipped (Nagle on) and with ``TCP_NODELAY=1`` (DCMTK
    reads it from the environment). The same runs against DCMTK ``storescp`` (no fsync) give a
    reference for the network path alone.
(b) End-to-end latency of a simulated 3 T multi-echo GRE scan: from the last instance sent to
    the last output stored in Orthanc (CPU reconstruction on this machine), with the node's
    stage timings.

Usage::

    python bench/node.py                     # everything, ~2,000 instances per run
    python bench/node.py --instances 500 --skip-e2e
    python bench/node.py --profile           # also py-spy the receiver during one run

Prints one table; writes nothing outside a temporary folder (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
SERVE = [sys.executable, "-c", "import sys; from qsmnode.cli import main; sys.exit(main())", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_instances(outdir: Path, n: int, n_series: int = 10, rows: int = 64) -> list[Path]:
    """``n`` small MR Image Storage files (``rows`` x ``rows`` int16, ~8 KiB) in ``n_series`` series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, generate_uid

    study = generate_uid()
    series = [generate_uid() for _ in range(n_series)]
    pixels = (np.arange(rows * rows, dtype=np.int16) % 1000).tobytes()
    paths = []
    for k in range(n):
        s = k % n_series
        d = outdir / f"s{s:02d}"
        d.mkdir(parents=True, exist_ok=True)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[s]
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^NODE", "BENCH", "MR"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = f"bench {s}", s + 1, k // n_series + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels
        p = d / f"{k:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def storescu_parallel(dirs: list[list[Path]], port: int, aet: str, nodelay: bool) -> tuple[float, list[str]]:
    """Run one ``storescu`` per entry of ``dirs`` at once (each one association); wall seconds, errors."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", "BENCHSCU", "-aec", aet, "+sd", "+r", "127.0.0.1", str(port)]
                              + [str(x) for x in group], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for group in dirs]
    errors = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            errors.append((err or out).strip().splitlines()[-1:] and (err or out).strip().splitlines()[-1])
    return time.perf_counter() - t0, errors


def http_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.eE+-]+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


class Child:
    """A child process with its log in ``workdir``; stopped with SIGTERM."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict | None = None):
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
                                     env=env, start_new_session=True)

    def tail(self, n: int = 20) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s} s")


def start_orthanc(workdir: Path) -> tuple[Child, int, int]:
    dicom_port, http_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {"Name": "bench", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
           "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
           "UnknownSopClassAccepted": True, "StableAge": 1, "SaveJobs": False}
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    child = Child([ORTHANC, str(workdir / "orthanc.json")], workdir, "orthanc")
    wait_port(http_port, child.proc, what="Orthanc")
    return child, dicom_port, http_port


def orthanc_rest(http_port: int, path: str, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def start_node(workdir: Path, orthanc_port: int, extra: list[str] = (), profile: Path | None = None):
    port, http_port = free_port(), free_port()
    args = SERVE + ["--aet", "QSMNODE", "--port", str(port), "--storage", str(workdir / "storage"),
                    "--destination", f"ORTHANC@127.0.0.1:{orthanc_port}", "--http-port", str(http_port)]
    args += list(extra)
    if profile is not None:
        args = ["py-spy", "record", "--subprocesses", "--threads", "--format", "raw", "--rate", "200",
                "-o", str(profile), "--"] + args
    child = Child(args, workdir, "node" if profile is None else "node-profiled")
    wait_port(http_port, child.proc, what="qsmnode serve")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    return child, port, http_port


def serve_available() -> bool:
    return subprocess.run(SERVE + ["--help"], capture_output=True, timeout=60).returncode == 0


def receive_runs(root: Path, n: int, receiver: str, orthanc_port: int) -> list[dict]:
    """The four storescu modes against ``receiver`` ('node' or 'storescp'); one row each."""
    rows = []
    workdir = root / f"recv-{receiver}"
    workdir.mkdir()
    if receiver == "node":
        child, port, http_port = start_node(workdir, orthanc_port)
        aet = "QSMNODE"
    else:
        port, http_port = free_port(), None
        (workdir / "in").mkdir()
        child = Child([STORESCP, "--fork", "-aet", "STORESCP", "-od", str(workdir / "in"), str(port)], workdir, "storescp")
        wait_port(port, child.proc, what="storescp")
        aet = "STORESCP"
    try:
        for assocs in (1, 4):
            for nodelay in (False, True):
                src = root / f"data-{receiver}-{assocs}-{int(nodelay)}"
                make_instances(src, n)
                series_dirs = sorted(src.iterdir())
                groups = [series_dirs[k::assocs] for k in range(assocs)]
                before = metric(http_text(http_port, "/metrics"), "qsmnode_instances_received_total",
                                outcome="stored") if http_port else 0.0
                secs, errors = storescu_parallel(groups, port, aet, nodelay)
                stored = (metric(http_text(http_port, "/metrics"), "qsmnode_instances_received_total",
                                 outcome="stored") - before) if http_port else float(
                    sum(1 for _ in (workdir / "in").iterdir()))
                if receiver == "storescp":
                    for f in (workdir / "in").iterdir():
                        f.unlink()
                rows.append({"receiver": receiver, "associations": assocs,
                             "client": "TCP_NODELAY=1" if nodelay else "as shipped", "instances": n,
                             "stored": int(stored), "seconds": secs, "per_s": n / secs,
                             "errors": "; ".join(errors)[:80]})
                print(f"  {receiver:8s} {assocs} assoc {rows[-1]['client']:14s} {n / secs:8.1f}/s "
                      f"({int(stored)}/{n} stored) {rows[-1]['errors']}", flush=True)
                shutil.rmtree(src)
    finally:
        child.stop()
    return rows


def profile_receiver(root: Path, n: int, orthanc_port: int) -> str:
    """py-spy (attached by pid) the node while it receives ``n`` instances over one association
    with TCP_NODELAY=1; returns the functions with the largest inclusive and self shares of the
    node's active (non-idle) samples."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (pip install py-spy) - no profile"
    workdir = root / "profile"
    workdir.mkdir()
    out = workdir / "receiver.txt"
    src = root / "data-profile"
    make_instances(src, n)
    child, port, _ = start_node(workdir, orthanc_port)
    try:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(child.proc.pid), "--threads", "--format", "raw",
                                "--rate", "250", "--duration", "8", "--nonblocking", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        secs, _ = storescu_parallel([[src]], port, "QSMNODE", True)
        spy_out = spy.communicate(timeout=60)[0]
    finally:
        child.stop()
    if not out.exists():
        return f"py-spy wrote no profile: {spy_out.strip()[-300:]}"
    incl: dict[str, int] = {}
    self_t: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread ") and not f.startswith("process ")]
        if not frames:
            continue
        total += c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + c
    if not total:
        return f"no samples in {out}"
    lines = [f"py-spy of the node receiving {n} instances ({n / secs:.0f}/s while sampled, 1 association, "
             f"TCP_NODELAY=1): {total} active samples at 250 Hz over 8 s", "inclusive share:"]
    for f, c in sorted(incl.items(), key=lambda x: -x[1])[:22]:
        lines.append(f"  {100 * c / total:5.1f}%  {f[:140]}")
    lines.append("self share:")
    for f, c in sorted(self_t.items(), key=lambda x: -x[1])[:14]:
        lines.append(f"  {100 * c / total:5.1f}%  {f[:140]}")
    return "\n".join(lines)


def e2e(root: Path, matrix: tuple[int, int, int], orthanc_port: int, orthanc_http: int,
        quiet_seconds: float | None) -> dict:
    from qsmnode.simulate.scan import simulate_scan
    import pydicom

    scan = simulate_scan(root / "scan", vendor="siemens", field_tesla=3.0, matrix=matrix)
    study = pydicom.dcmread(scan.paths[0], stop_before_pixels=True).StudyInstanceUID
    workdir = root / "e2e"
    workdir.mkdir()
    extra = []
    if quiet_seconds is not None:
        cfg = workdir / "node.toml"
        cfg.write_text(f"[node]\nquiet_seconds = {quiet_seconds}\n")
        extra = ["--config", str(cfg)]
    child, port, http_port = start_node(workdir, orthanc_port, extra)
    try:
        secs, errors = storescu_parallel([[scan.dicom_dir]], port, "QSMNODE", True)
        t_sent = time.perf_counter()
        if errors:
            raise RuntimeError(f"storescu failed: {errors}")
        last_count, t_last, deadline = 0, None, time.monotonic() + 1800
        while time.monotonic() < deadline:
            count = sum(len(s.get("Instances", [])) for s in orthanc_rest(
                orthanc_http, "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study},
                                              "Expand": True}))
            if count > last_count:
                last_count, t_last = count, time.perf_counter()
            text = http_text(http_port, "/metrics")
            if (last_count and metric(text, "qsmnode_outbox_pending") == 0
                    and metric(text, "qsmnode_dispatched_instances_total", outcome="sent") >= last_count
                    and metric(text, "qsmnode_jobs", state="done") >= 1):
                break
            if metric(text, "qsmnode_jobs", state="failed") >= 1:
                raise RuntimeError(f"the job failed:\n{child.tail()}")
            time.sleep(0.2)
        stages = {}
        for line in text.splitlines():
            m = re.match(r'^qsmnode_stage_seconds_sum\{stage="([^"]+)"\} ([0-9.eE+-]+)$', line)
            if m:
                stages[m.group(1)] = float(m.group(2))
        return {"instances_in": len(scan.paths), "send_seconds": secs, "outputs": last_count,
                "latency_s": (t_last - t_sent) if t_last else float("nan"), "stage_seconds": stages}
    finally:
        child.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--matrix", default="96,96,72", help="simulated scan matrix for the e2e run")
    ap.add_argument("--quiet-seconds", type=float, default=None,
                    help="node quiet period for the e2e run (written to a --config file)")
    ap.add_argument("--skip-receive", action="store_true")
    ap.add_argument("--reference-instances", type=int, default=300,
                    help="instances per run against the DCMTK storescp reference")
    ap.add_argument("--skip-reference", action="store_true", help="skip the DCMTK storescp reference runs")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--profile", action="store_true", help="py-spy the receiver during one run")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    for tool in (STORESCU, STORESCP, ORTHANC):
        if not os.access(tool, os.X_OK):
            print(f"missing {tool}: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="qsmnode-bench-"))
    orthanc, o_port, o_http = start_orthanc(root / "orthanc")
    rows, e2e_row, prof = [], None, None
    try:
        if not args.skip_receive:
            print(f"receive: {args.instances} instances of 64x64 int16 per run", flush=True)
            if not args.skip_reference:
                rows += receive_runs(root, args.reference_instances, "storescp", o_port)
            if serve_available():
                rows += receive_runs(root, args.instances, "node", o_port)
            else:
                print("  `qsmnode serve` is not available: node runs skipped", flush=True)
        if args.profile:
            prof = profile_receiver(root, min(args.instances, 1000), o_port)
        if not args.skip_e2e:
            matrix = tuple(int(x) for x in args.matrix.split(","))
            print(f"end to end: simulated 3 T scan, matrix {matrix}", flush=True)
            e2e_row = e2e(root, matrix, o_port, o_http, args.quiet_seconds)
    finally:
        orthanc.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    print()
    print(f"{'receiver':10s} {'assocs':>6s} {'client':14s} {'inst/s':>8s} {'stored':>9s}")
    for r in rows:
        print(f"{r['receiver']:10s} {r['associations']:6d} {r['client']:14s} {r['per_s']:8.1f} "
              f"{r['stored']:5d}/{r['instances']:<4d}{'  ' + r['errors'] if r['errors'] else ''}")
    if e2e_row:
        print(f"\nend to end (3 T, CPU): {e2e_row['instances_in']} instances in, sent in "
              f"{e2e_row['send_seconds']:.1f} s; {e2e_row['outputs']} outputs in Orthanc "
              f"{e2e_row['latency_s']:.1f} s after the last instance was sent")
        print("node stage seconds (sums): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                       sorted(e2e_row["stage_seconds"].items())))
    if prof:
        print("\n" + prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
