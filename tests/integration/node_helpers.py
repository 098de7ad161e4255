"""Real DICOM software around ``qsmnode serve``, for the integration tests and ``bench/node.py``.

One home for every helper that starts, talks to or stops a process: pytest fixtures live in
``conftest.py`` and are thin wrappers over this module, which imports no pytest, so the benchmark
imports it too (``from tests.integration.node_helpers import ...`` with the repository root on
``sys.path``; pytest imports it as ``node_helpers``).

- ``free_port()``, ``port_open(port)``, ``missing_tools(*paths)``, ``wait_until(...)``, ``terminate(proc)``.
- ``http_get(port, path)``, ``metric(text, name, **labels)`` / ``samples(text, name)``: the
  node's ``/healthz`` and Prometheus ``/metrics``.
- ``storescu_command(...)`` / ``storescu(...)``: DCMTK ``/usr/bin/storescu`` (always the full path:
  pynetdicom installs a same-named script on PATH).
- ``make_mr_instances(outdir, n, ...)``: small valid MR Image Storage files.
- ``OrthancServer``: a real ``/usr/sbin/Orthanc`` with its own storage, restartable.
- ``LoggedProcess``: a child process with its output in a log file.
- ``NodeProcess(workdir, port, **config)`` writes a TOML configuration (``[node]`` keys as keyword
  arguments; ``destinations``: list of ``[[destination]]`` tables; ``tls``: a ``[tls]`` table;
  ``extra_toml``: appended text) for ``qsmnode serve --config``; ``NodeProcess.from_flags(...)``
  uses the quick-start flags (``--aet --port --storage --destination``) instead. ``start()``
  waits until the node logs that it is ready, answers a C-ECHO and (with an HTTP port) ``/healthz``;
  ``stop()`` sends SIGTERM (clean shutdown), ``kill()`` SIGKILL (crash). ``jobs()`` reads the
  node's index, ``metric()`` its ``/metrics`` (``bound_http_port()`` also when ``http_port=0``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ORTHANC_BIN = "/usr/sbin/Orthanc"
STORESCU_BIN = "/usr/bin/storescu"
STORESCP_BIN = "/usr/bin/storescp"
ECHOSCU_BIN = "/usr/bin/echoscu"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)
# the program through the interpreter running the tests: a bare "qsmnode" need not be on the PATH
QSMNODE = [sys.executable, "-m", "qsmnode.cli"]
SERVE = [*QSMNODE, "serve"]


# ------------------------------------------------------------------------------------ basics
def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def missing_tools(*paths: str) -> list[str]:
    """The ``paths`` that are not executable files."""
    return [p for p in paths if not os.access(p, os.X_OK)]


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``), or None."""
    return next((p for p in DICOMWEB_PLUGIN_CANDIDATES if os.path.exists(p)), None)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, *,
               proc: subprocess.Popen | None = None, poll_s: float = 0.2,
               detail: Callable[[], str] = lambda: "", quiet: tuple[type[BaseException], ...] = ()):
    """Poll ``predicate`` until it returns something true, and return that.

    ``RuntimeError`` when ``proc`` exits first, ``TimeoutError`` after ``timeout_s``; both with
    ``detail()`` appended. Exceptions of the types in ``quiet`` count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except quiet:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {what}:\n{detail()}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}:\n{detail()}")
        time.sleep(poll_s)


def terminate(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM and wait; SIGKILL after ``timeout_s``. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def read_tail(path: Path, n: int | None = None) -> str:
    """The file's text (its last ``n`` lines), "" when it does not exist."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if n is None else "\n".join(text.splitlines()[-n:])


# -------------------------------------------------------------------------------- HTTP, metrics
def http_get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """GET ``http://127.0.0.1:PORT/PATH``: status and body (an HTTP error status too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in a Prometheus text exposition: (labels, value)."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.eE+-]+)$", line)
        if m:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")), float(m.group(2))))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (all label sets by default)."""
    return sum(v for got, v in samples(text, name) if all(got.get(k) == x for k, x in labels.items()))


# ------------------------------------------------------------------------------ DCMTK storescu
def storescu_command(paths, port: int, aet: str = "QSMNODE", calling: str = "SCANNER", extra_args=(),
                     host: str = "127.0.0.1") -> list[str]:
    """The DCMTK ``storescu`` command line; folders are scanned recursively (``+sd +r``)."""
    paths = [str(p) for p in paths]
    args = [STORESCU_BIN, "-aet", calling, "-aec", aet]
    if any(os.path.isdir(p) for p in paths):
        args += ["+sd", "+r"]
    return args + list(extra_args) + [host, str(port)] + paths


def storescu(paths, port: int, aet: str = "QSMNODE", calling: str = "SCANNER", extra_args=(),
             host: str = "127.0.0.1", env: dict | None = None, timeout_s: float = 600.0):
    """Run DCMTK ``storescu`` on files/folders; returns the ``CompletedProcess``.

    ``env`` is merged into the environment (e.g. ``{"TCP_NODELAY": "1"}``).
    """
    return subprocess.run(storescu_command(paths, port, aet, calling, extra_args, host), capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------- DICOM files
def make_mr_instances(outdir: Path, n: int, *, series_description: str = "QSM test", rows: int = 16,
                      study_uid: str | None = None, series_uid: str | None = None,
                      transfer_syntax: str = "1.2.840.10008.1.2.1", series_number: int = 901,
                      image_type=("DERIVED", "SECONDARY", "QSM")) -> list[Path]:
    """Write ``n`` small MR Image Storage instances (one series) into ``outdir``; returns the paths."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, generate_uid

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientName, ds.PatientID = "TEST^DISPATCH", "QSMNODE-TEST"
        ds.Modality, ds.SeriesDescription = "MR", series_description
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImageType = list(image_type)
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.arange(rows * rows, dtype=np.int16) + k).tobytes()
        path = outdir / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- Orthanc
@dataclass
class OrthancServer:
    """A real Orthanc process with its own storage, restartable on the same storage and ports."""

    workdir: Path
    aet: str = "ORTHANC"
    host: str = "127.0.0.1"
    dicom_port: int = 0
    http_port: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str | None:
        """STOW/QIDO/WADO root when the DICOMweb plugin is loaded, else None."""
        return f"{self.url}/dicom-web" if dicomweb_plugin() else None

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "qsmnode-test-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpTimeout": 30,
            "Plugins": [],
            "LogExportedResources": False,
        }
        plugin = dicomweb_plugin()
        if plugin:
            cfg["Plugins"] = [plugin]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout_s: float = 30.0) -> "OrthancServer":
        """Start (or restart, on the same storage and ports) and wait until REST answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self._config(), indent=1))
        with open(self.workdir / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, start_new_session=True)
        try:
            wait_until(lambda: self.rest("/system"), timeout_s, f"Orthanc's REST API on port {self.http_port}",
                       proc=self.proc, poll_s=0.1, detail=self.log_tail,
                       quiet=(urllib.error.URLError, ConnectionError, OSError))
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"Orthanc did not start; see {self.workdir / 'orthanc.log'}: {err}") from None
        return self

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 15 s); storage is kept."""
        if self.proc is not None:
            terminate(self.proc, 15)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        return read_tail(self.workdir / "orthanc.log", n)

    # ----------------------------------------------------------- REST helpers
    def rest(self, path: str, method: str = "GET", body: Any = None, raw: bool = False):
        """Call Orthanc's REST API; JSON in and out (``raw=True``: the bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
        return payload if raw else (json.loads(payload) if payload else None)

    def _find(self, level: str, query: dict[str, str]) -> list[dict]:
        return self.rest("/tools/find", "POST", {"Level": level, "Query": query, "Expand": True})

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Series of the study: main DICOM tags plus ``ID`` (Orthanc id) and ``NumberOfInstances``."""
        out = []
        for s in self._find("Series", {"StudyInstanceUID": study_uid}):
            tags = dict(s.get("MainDicomTags", {}))
            tags["ID"] = s["ID"]
            tags["NumberOfInstances"] = len(s.get("Instances", []))
            out.append(tags)
        return out

    def instances_of_series(self, series_uid: str) -> list[dict]:
        """Instances of the series: main DICOM tags plus ``ID`` (Orthanc id)."""
        out = []
        for i in self._find("Instance", {"SeriesInstanceUID": series_uid}):
            tags = dict(i.get("MainDicomTags", {}))
            tags["ID"] = i["ID"]
            out.append(tags)
        return out

    def download_instance(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes)."""
        return self.rest(f"/instances/{orthanc_id}/file", raw=True)

    def instance_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self._find("Instance", {})}

    def wait_for_instances(self, n: int, timeout_s: float = 60.0) -> int:
        """Wait until at least ``n`` instances are stored; returns the count (may be < n on timeout)."""
        try:
            wait_until(lambda: self.instance_count() >= n, timeout_s, f"{n} instances", poll_s=0.1)
        except TimeoutError:
            pass
        return self.instance_count()


# ------------------------------------------------------------------------------ child processes
class LoggedProcess:
    """A child process with stdout and stderr appended to ``log_path``."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def launch(self, args: list[str], cwd: Path | None = None, new_session: bool = False,
               env: dict | None = None) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                         start_new_session=new_session)
        return self.proc

    def log(self) -> str:
        return read_tail(self.log_path)

    def log_tail(self, n: int = 40) -> str:
        return read_tail(self.log_path, n)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait (clean shutdown; SIGKILL after ``timeout_s``); returns the exit status."""
        return terminate(self.proc, timeout_s) if self.proc is not None else 0

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


def serve_unavailable() -> str | None:
    """Why ``qsmnode serve`` cannot run here (its ``--help`` fails), or None."""
    r = subprocess.run(SERVE + ["--help"], capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return None
    out = (r.stderr or r.stdout).strip()
    return out.splitlines()[-1] if out else "no output"


class NodeProcess(LoggedProcess):
    """``qsmnode serve`` as a child process, with its output in ``workdir/node.log``."""

    def __init__(self, workdir: Path, port: int, *, http_port: int = -1, destinations=(), tls: dict | None = None,
                 extra_toml: str = "", **node_keys):
        node = {"ae_title": "QSMNODE", "bind": "127.0.0.1", "port": port, "storage": str(Path(workdir) / "storage"),
                "device": "cpu", "quiet_seconds": 3.0, "incomplete_cap_seconds": 6.0, "min_free_disk_mb": 1.0,
                "job_timeout_seconds": 600.0}
        node.update(node_keys)
        self._setup(workdir, port, http_port, node["ae_title"])
        lines = ["[node]"] + [f"{k} = {_toml_value(v)}" for k, v in node.items()]
        lines += ["", "[http]", f"port = {http_port}"]
        if tls:
            lines += ["", "[tls]"] + [f"{k} = {_toml_value(v)}" for k, v in tls.items()]
        for d in destinations:
            lines += ["", "[[destination]]"] + [f"{k} = {_toml_value(v)}" for k, v in d.items()]
        lines += ["", extra_toml]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.serve_args = ["--config", str(self.config_path)]

    @classmethod
    def from_flags(cls, workdir: Path, port: int, *, aet: str = "QSMNODE", http_port: int = -1,
                   destinations=(), extra_args=()) -> "NodeProcess":
        """The quick-start flags, no configuration file: ``--aet --port --storage --destination
        AET@HOST:PORT`` (one per entry of ``destinations``) ``--http-port``, then ``extra_args``."""
        node = cls.__new__(cls)
        node._setup(workdir, port, http_port, aet)
        node.serve_args = ["--aet", aet, "--port", str(port), "--storage", str(node.storage)]
        for d in destinations:
            node.serve_args += ["--destination", d]
        node.serve_args += ["--http-port", str(http_port), *extra_args]
        return node

    def _setup(self, workdir: Path, port: int, http_port: int, aet: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "node.log")
        self.port, self.http_port, self.aet = port, http_port, aet
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "node.toml"

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 60.0, echo: bool = True, new_session: bool = False) -> "NodeProcess":
        """Start and wait until the node logs ``ready: DICOM``, answers a C-ECHO (``echo``) and,
        with a fixed HTTP port, ``/healthz``."""
        self.launch(SERVE + self.serve_args, cwd=self.workdir, new_session=new_session,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def ready() -> bool:
            return ("ready: DICOM" in self.log() and (not echo or self.echo().returncode == 0)
                    and (self.http_port <= 0 or http_get(self.http_port, "/healthz", 5)[0] == 200))

        try:
            wait_until(ready, timeout_s, "qsmnode serve to be ready", proc=self.proc, detail=self.log,
                       quiet=(OSError,))
        except RuntimeError:
            raise RuntimeError(f"qsmnode serve exited with {self.proc.returncode}:\n{self.log()}") from None
        return self

    def spool_files(self, count: int = 0, timeout_s: float = 10.0) -> dict[str, Path]:
        """SOP Instance UID -> spool file, once at least ``count`` are there. An acknowledged
        instance is durable in the receive journal at once; its spool file is written a moment
        later (qsmnode.node.spool), so tests wait for it."""
        def files() -> dict[str, Path]:
            return {f.stem: f for f in (self.storage / "spool").rglob("*.dcm")}

        wait_until(lambda: len(files()) >= count, timeout_s, f"{count} instance file(s) in the spool",
                   detail=lambda: f"; {len(files())} there")
        return files()

    def echo(self, calling: str = "SCANNER", extra_args=()) -> subprocess.CompletedProcess:
        return subprocess.run([ECHOSCU_BIN, "-aet", calling, "-aec", self.aet, *extra_args, "127.0.0.1",
                               str(self.port)], capture_output=True, text=True, timeout=60)

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ looking in
    def bound_http_port(self) -> int:
        """The HTTP port: the configured one, or the one the node logged when it was 0 (any free port)."""
        if self.http_port > 0:
            return self.http_port
        m = re.search(r", HTTP [^\s:]+:(\d+)", self.log())
        if self.http_port < 0 or m is None:
            raise RuntimeError(f"the node has no HTTP port (configured {self.http_port}):\n{self.log_tail()}")
        return int(m.group(1))

    def metrics_text(self) -> str:
        """``GET /metrics``."""
        return http_get(self.bound_http_port(), "/metrics")[1].decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_text(), name, **labels)

    def audit(self) -> list[dict]:
        path = self.storage / "audit.log"
        if not path.exists():
            return []
        # the node may be appending a line as this reads: only newline-terminated lines are events
        complete = path.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def index(self):
        from qsmnode.node.index import Index

        return Index(self.storage / "index.sqlite")

    def jobs(self) -> list[dict]:
        if not (self.storage / "index.sqlite").exists():
            return []
        index = self.index()
        try:
            return index.jobs()
        finally:
            index.close()

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
        return wait_until(predicate, timeout_s, what, proc=self.proc, poll_s=poll_s,
                          detail=lambda: f"jobs: {[(j['id'], j['state'], j['reason']) for j in self.jobs()]}\n"
                                         f"{self.log()[-4000:]}")

    def wait_for_jobs(self, n: int, states=("done", "failed"), timeout_s: float = 300.0) -> list[dict]:
        def finished():
            jobs = [j for j in self.jobs() if j["state"] in states]
            return jobs if len(jobs) >= n else None

        return self.wait_for(finished, timeout_s, f"{n} job(s) in {states}")
