"""``qsmnode demo``: the whole node on the bundled sample, over real DICOM, on this machine.

Starts a small local PACS (a pynetdicom Storage SCP that files what it receives under
``WORKDIR/pacs``), starts ``qsmnode serve`` with the embedded defaults pointed at it, sends
``sample_dicom/`` to the node like a scanner would (DCMTK ``storescu`` when installed, pynetdicom
otherwise), waits until the outputs have come back, and prints where they are with key numbers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

from qsmnode.errors import QsmNodeError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_dicom"
EXPECTED_KINDS = ("QSM", "SWI", "MINIP", "R2STAR")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FolderPacs:
    """A minimal C-STORE SCP standing in for PACS: files every instance by series."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS"):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.received: dict[str, list[Path]] = defaultdict(list)
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        series = f"{int(ds.get('SeriesNumber', 0) or 0):04d}_{str(ds.get('Modality', 'OT'))}"
        folder = self.folder / series
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received[str(ds.SeriesInstanceUID)].append(path)
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()

    def series(self) -> dict[str, list[Path]]:
        with self._lock:
            return {uid: list(paths) for uid, paths in self.received.items()}


def send_files(paths: list[Path], port: int, called_ae: str, storescu: Path = Path("/usr/bin/storescu")) -> None:
    """Send like a scanner: DCMTK ``storescu`` when installed, else pynetdicom (with the
    dispatcher's workaround for its lost-response race)."""
    from qsmnode.node.dispatch import prepare_scu_association

    if storescu.exists():
        subprocess.run([str(storescu), "-aec", called_ae, "-aet", "SCANNER", "127.0.0.1", str(port),
                        *map(str, paths)], check=True, capture_output=True)
        return
    ae = AE(ae_title="SCANNER")
    datasets = [pydicom.dcmread(p) for p in paths]
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise QsmNodeError("the node did not accept the association", "see the node log above")
    prepare_scu_association(assoc)
    try:
        for ds in datasets:
            assoc.send_c_store(ds)
    finally:
        assoc.release()


def describe_outputs(series: dict[str, list[Path]]) -> list[str]:
    """One line per output series: kind, count, and for QSM the susceptibility range in ppb."""
    lines = []
    for paths in series.values():
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        description = str(first.get("SeriesDescription", first.get("Modality", "")))
        line = f"{description[:48]:48s} {len(paths):4d} instance(s)  {paths[0].parent}"
        if tuple(first.get("ImageType", ()))[2:3] == ("QSM",):
            values = np.concatenate([pydicom.dcmread(p).pixel_array.ravel() for p in paths])
            inside = values[values != 0]
            if inside.size:
                low, high = np.percentile(inside, [1, 99])
                line += f"  chi 1st..99th percentile {low:.0f}..{high:.0f} ppb"
        lines.append(line)
    return sorted(lines)


def run_demo(workdir: Path, timeout_s: float = 900.0, device: str = "auto") -> int:
    samples = sorted(p for p in SAMPLE_DIR.rglob("*.dcm"))
    if not samples:
        raise QsmNodeError(f"no sample DICOM found under {SAMPLE_DIR}", "run from a full checkout")
    workdir = workdir.resolve()
    pacs = FolderPacs(workdir / "pacs")
    pacs.start()
    node_port, http_port = free_port(), free_port()
    log_path = workdir / "node.log"
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "qsmnode.cli", "serve", "--aet", "QSMNODE", "--port", str(node_port),
               "--storage", str(workdir / "node"), "--destination", f"{pacs.ae_title}@127.0.0.1:{pacs.port}",
               "--http-port", str(http_port), "--device", device]
    print(f"qsmnode demo: local PACS {pacs.ae_title} on port {pacs.port}, node QSMNODE on port {node_port}")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(node_port, node, log_path)
        n_studies = len({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in samples})
        print(f"qsmnode demo: sending {len(samples)} sample instances ({n_studies} studies) to the node ...")
        send_files(samples, node_port, "QSMNODE")
        sent = time.perf_counter()
        expected_series = n_studies * (len(EXPECTED_KINDS) + 3)  # + Parametric Map, SR, summary image
        while time.perf_counter() - sent < timeout_s:
            if node.poll() is not None:
                raise QsmNodeError(f"the node stopped (exit {node.returncode})", f"see {log_path}")
            if len(pacs.series()) >= expected_series and _settled(pacs):
                break
            time.sleep(1.0)
        else:
            raise QsmNodeError(f"outputs did not arrive within {timeout_s:.0f} s", f"see {log_path}")
        elapsed = time.perf_counter() - sent
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        pacs.stop()
    series = pacs.series()
    print(f"qsmnode demo: done in {time.perf_counter() - started:.0f} s "
          f"({elapsed:.0f} s from the last sample instance to the last output in PACS)")
    print(f"  {len(series)} output series in {pacs.folder} (node log: {log_path}):")
    for line in describe_outputs(series):
        print(f"  {line}")
    print("  open them with any DICOM viewer; QSM pixels are susceptibility in ppb (window 0/300).")
    return 0


def _settled(pacs: FolderPacs, quiet_s: float = 3.0) -> bool:
    """True when no instance arrived in the last ``quiet_s`` seconds."""
    newest = max((p.stat().st_mtime for paths in pacs.series().values() for p in paths), default=0)
    return time.time() - newest > quiet_s


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise QsmNodeError(f"the node did not start (exit {process.returncode})", f"see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise QsmNodeError(f"the node did not open port {port} within {timeout_s:.0f} s", f"see {log_path}")
