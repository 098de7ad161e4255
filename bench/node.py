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
The processes (Orthanc, ``qsmnode serve``, storescu) are started with the integration tests'
helpers, ``tests/integration/node_helpers.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.integration

from tests.integration.node_helpers import (  # noqa: E402  (the helpers the integration tests use)
    ECHOSCU_BIN, ORTHANC_BIN, STORESCP_BIN, STORESCU_BIN, LoggedProcess, NodeProcess, OrthancServer, free_port,
    make_mr_instances, metric, missing_tools, port_open, samples, serve_unavailable, storescu_command, wait_until,
)


def make_instances(outdir: Path, n: int, n_series: int = 10, rows: int = 64) -> list[Path]:
    """``n`` small MR Image Storage files (``rows`` x ``rows`` int16, ~8 KiB) in ``n_series`` series,
    one folder each."""
    from pydicom.uid import generate_uid

    study = generate_uid()
    paths = []
    for s in range(n_series):
        paths += make_mr_instances(outdir / f"s{s:02d}", len(range(s, n, n_series)), rows=rows, study_uid=study,
                                   series_description=f"bench {s}", series_number=s + 1,
                                   image_type=("ORIGINAL", "PRIMARY", "M"))
    return paths


def storescu_parallel(dirs: list[list[Path]], port: int, aet: str, nodelay: bool) -> tuple[float, list[str]]:
    """Run one ``storescu`` per entry of ``dirs`` at once (each one association); wall seconds, errors."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    t0 = time.perf_counter()
    procs = [subprocess.Popen(storescu_command(group, port, aet, calling="BENCHSCU"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for group in dirs]
    errors = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            errors.append((err or out).strip().splitlines()[-1:] and (err or out).strip().splitlines()[-1])
    return time.perf_counter() - t0, errors


def start_node(workdir: Path, orthanc: OrthancServer, extra: list[str] = ()) -> NodeProcess:
    """``qsmnode serve`` with the quick-start flags, sending to ``orthanc``; started."""
    node = NodeProcess.from_flags(workdir, free_port(), http_port=free_port(),
                                  destinations=[f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"], extra_args=extra)
    return node.start(new_session=True)


def receive_runs(root: Path, n: int, receiver: str, orthanc: OrthancServer, image_rows: int = 64,
                 repeat: int = 1, associations=(1, 4), clients=("shipped", "nodelay")) -> list[dict]:
    """The storescu modes (``associations`` x ``clients``) against ``receiver`` ('node' or
    'storescp'), each ``repeat`` times; one row per run. The storescp reference runs with
    ``TCP_NODELAY=1`` itself, so only the client's setting varies.

    Before each run the node has caught up with the last one (files written, instances
    classified), as between the series of a scanner. Every run's instances are written before
    the first run and deleted after the last: on this development VM's root file system (ext4
    without a journal) creating a file costs from 14 µs to about 1 ms of kernel time, more just
    after many files were deleted, so deleting between runs made each run pay for the previous
    one's clean-up instead of measuring the receiver."""
    rows = []
    workdir = root / f"recv-{receiver}"
    workdir.mkdir()
    modes = [(assocs, client == "nodelay", k) for assocs in associations for client in clients for k in range(repeat)]
    sources = {}
    for assocs, nodelay, k in modes:
        src = sources[assocs, nodelay, k] = root / f"data-{receiver}-{assocs}-{int(nodelay)}-{k}"
        make_instances(src, n, rows=image_rows)
    if receiver == "node":
        child = node = start_node(workdir, orthanc)
        port, aet = node.port, node.aet
    else:
        node, port, aet = None, free_port(), "STORESCP"
        (workdir / "in").mkdir()
        child = LoggedProcess(workdir / "storescp.log")
        child.launch([STORESCP_BIN, "--fork", "-aet", aet, "-od", str(workdir / "in"), str(port)], cwd=workdir,
                     new_session=True, env=dict(os.environ, TCP_NODELAY="1"))
        wait_until(lambda: port_open(port), 60, f"storescp to listen on {port}", proc=child.proc, poll_s=0.1)
    try:
        for assocs, nodelay, k in modes:
            series_dirs = sorted(sources[assocs, nodelay, k].iterdir())
            groups = [series_dirs[g::assocs] for g in range(assocs)]
            if node:  # a pause between bursts, as between a scanner's series: the node catches up first
                before = node.metric("qsmnode_instances_received_total", outcome="stored")
                settle(node, int(before))
            secs, errors = storescu_parallel(groups, port, aet, nodelay)
            if node:
                stored = node.metric("qsmnode_instances_received_total", outcome="stored") - before
            else:
                stored = float(sum(1 for _ in (workdir / "in").iterdir()))
                (workdir / "in").rename(workdir / f"in-{len(rows)}")  # kept until the end (see above)
                (workdir / "in").mkdir()
            rows.append({"receiver": receiver, "associations": assocs,
                         "client": "TCP_NODELAY=1" if nodelay else "as shipped", "instances": n,
                         "stored": int(stored), "seconds": secs, "per_s": n / secs,
                         "errors": "; ".join(errors)[:80]})
            print(f"  {receiver:8s} {assocs} assoc {rows[-1]['client']:14s} {n / secs:8.1f}/s "
                  f"({int(stored)}/{n} stored) {rows[-1]['errors']}", flush=True)
    finally:
        child.stop()
    return rows


def settle(node: NodeProcess, stored: int, timeout_s: float = 120.0) -> None:
    """Wait until the node has written the files of and classified all ``stored`` instances."""
    node.spool_files(stored, timeout_s)
    wait_until(lambda: node.metric("qsmnode_stage_seconds_count", stage="classify") >= stored, timeout_s,
               f"{stored} instances classified")


def profile_receiver(root: Path, n: int, orthanc: OrthancServer) -> str:
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
    node = start_node(workdir, orthanc)
    try:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(node.proc.pid), "--threads", "--format", "raw",
                                "--rate", "250", "--duration", "8", "--nonblocking", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        secs, _ = storescu_parallel([[src]], node.port, node.aet, True)
        spy_out = spy.communicate(timeout=60)[0]
    finally:
        node.stop()
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


def e2e(root: Path, matrix: tuple[int, int, int], voxel_mm: float, orthanc: OrthancServer,
        quiet_seconds: float | None) -> dict:
    from qsmnode.simulate.scan import simulate_scan
    import pydicom

    scan = simulate_scan(root / "scan", vendor="siemens", field_tesla=3.0, matrix=matrix,
                         voxel_size_mm=(voxel_mm,) * 3)
    study = pydicom.dcmread(scan.paths[0], stop_before_pixels=True).StudyInstanceUID
    workdir = root / "e2e"
    workdir.mkdir()
    extra = []
    if quiet_seconds is not None:
        cfg = workdir / "node.toml"
        cfg.write_text(f"[node]\nquiet_seconds = {quiet_seconds}\n")
        extra = ["--config", str(cfg)]
    node = start_node(workdir, orthanc, extra)
    try:
        secs, errors = storescu_parallel([[scan.dicom_dir]], node.port, node.aet, True)
        t_sent = time.perf_counter()
        if errors:
            raise RuntimeError(f"storescu failed: {errors}")
        last_count, t_last, t_first, deadline = 0, None, None, time.monotonic() + 1800
        while time.monotonic() < deadline:
            count = sum(s["NumberOfInstances"] for s in orthanc.series_of_study(study))
            if count > last_count:
                last_count, t_last = count, time.perf_counter()
                t_first = t_first or t_last
            text = node.metrics_text()
            if (last_count and metric(text, "qsmnode_outbox_pending") == 0
                    and metric(text, "qsmnode_dispatched_instances_total", outcome="sent") >= last_count
                    and metric(text, "qsmnode_jobs", state="done") >= 1):
                break
            if metric(text, "qsmnode_jobs", state="failed") >= 1:
                raise RuntimeError(f"the job failed:\n{node.log_tail(20)}")
            time.sleep(0.2)
        stages = {labels["stage"]: v for labels, v in samples(text, "qsmnode_stage_seconds_sum") if "stage" in labels}
        return {"instances_in": len(scan.paths), "send_seconds": secs, "outputs": last_count,
                "latency_s": (t_last - t_sent) if t_last else float("nan"),
                "first_output_s": (t_first - t_sent) if t_first else float("nan"), "stage_seconds": stages}
    finally:
        node.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=64, help="rows = columns of the received instances (256: 128 KiB)")
    ap.add_argument("--matrix", default="96,96,72", help="simulated scan matrix for the e2e run")
    ap.add_argument("--voxel-mm", type=float, default=2.0,
                    help="isotropic voxel size of the e2e scan (1 for the 256,256,176 clinical case)")
    ap.add_argument("--quiet-seconds", type=float, default=None,
                    help="node quiet period for the e2e run (written to a --config file)")
    ap.add_argument("--skip-receive", action="store_true")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--clients", nargs="+", choices=["shipped", "nodelay"], default=["shipped", "nodelay"],
                    help="storescu as shipped (Nagle on) and/or with TCP_NODELAY=1")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each receive mode (median reported)")
    ap.add_argument("--reference-instances", type=int, default=300,
                    help="instances per run against the DCMTK storescp reference")
    ap.add_argument("--skip-reference", action="store_true", help="skip the DCMTK storescp reference runs")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--profile", action="store_true", help="py-spy the receiver during one run")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    missing = missing_tools(STORESCU_BIN, STORESCP_BIN, ECHOSCU_BIN, ORTHANC_BIN)
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install dcmtk orthanc", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="qsmnode-bench-"))
    orthanc = OrthancServer(root / "orthanc").start()  # free ports chosen at start
    rows, e2e_row, prof = [], None, None
    try:
        if not args.skip_receive:
            print(f"receive: {args.instances} instances of {args.rows}x{args.rows} int16 per run", flush=True)
            if not args.skip_reference:
                rows += receive_runs(root, args.reference_instances, "storescp", orthanc, args.rows, args.repeat,
                                     args.associations, args.clients)
            if serve_unavailable() is None:
                rows += receive_runs(root, args.instances, "node", orthanc, args.rows, args.repeat,
                                     args.associations, args.clients)
            else:
                print("  `qsmnode serve` is not available: node runs skipped", flush=True)
        if args.profile:
            prof = profile_receiver(root, min(args.instances, 1000), orthanc)
        if not args.skip_e2e:
            matrix = tuple(int(x) for x in args.matrix.split(","))
            print(f"end to end: simulated 3 T scan, matrix {matrix} at {args.voxel_mm:g} mm", flush=True)
            e2e_row = e2e(root, matrix, args.voxel_mm, orthanc, args.quiet_seconds)
    finally:
        orthanc.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    print()
    print(f"{'receiver':10s} {'assocs':>6s} {'client':14s} {'median/s':>9s} {'runs (inst/s)':28s} {'stored':>11s}")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["receiver"], r["associations"], r["client"]), []).append(r)
    for (receiver, assocs, client), runs in groups.items():
        rates = [r["per_s"] for r in runs]
        errors = "; ".join(r["errors"] for r in runs if r["errors"])
        print(f"{receiver:10s} {assocs:6d} {client:14s} {statistics.median(rates):9.1f} "
              f"{', '.join(f'{x:.0f}' for x in rates):28s} {sum(r['stored'] for r in runs):5d}/"
              f"{sum(r['instances'] for r in runs):<5d}{'  ' + errors if errors else ''}")
    if e2e_row:
        print(f"\nend to end (3 T, CPU): {e2e_row['instances_in']} instances in, sent in "
              f"{e2e_row['send_seconds']:.1f} s; {e2e_row['outputs']} outputs in Orthanc "
              f"{e2e_row['latency_s']:.1f} s after the last instance was sent (the first output "
              f"{e2e_row['first_output_s']:.1f} s after)")
        print("node stage seconds (sums): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                       sorted(e2e_row["stage_seconds"].items())))
    if prof:
        print("\n" + prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
