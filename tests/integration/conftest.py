"""Fixtures for integration tests against real DICOM software: Orthanc and DCMTK.

- ``free_port()``: a free loopback TCP port.
- ``orthanc``: a real ``/usr/sbin/Orthanc`` (AE ``ORTHANC``, any calling AE, no auth, DICOMweb
  plugin when installed) in a tmp dir; ``orthanc_factory(**config)`` for extra configuration
  (e.g. a Lua filter that refuses instances).
- ``simulated_scan(...)``: a simulated multi-echo GRE scan written as vendor-flavoured DICOM
  by :func:`qsmnode.simulate.scan.simulate_scan`.
- ``storescu(paths, port, ...)``: DCMTK ``/usr/bin/storescu`` (always the full path:
  pynetdicom installs a same-named script on PATH).
- ``make_mr_instances(outdir, n, ...)``: small valid MR Image Storage files, for tests that
  need DICOM to move around but no reconstruction.

Tests that use these are marked ``@pytest.mark.integration``; they skip with a clear message
when the Debian tools are absent (``apt-get install orthanc orthanc-dicomweb dcmtk``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ORTHANC_BIN = "/usr/sbin/Orthanc"
STORESCU_BIN = "/usr/bin/storescu"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a free loopback TCP port each call."""
    return _free_port


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``), or None."""
    return next((p for p in DICOMWEB_PLUGIN_CANDIDATES if os.path.exists(p)), None)


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

    def start(self, timeout_s: float = 30.0) -> None:
        """Start (or restart, on the same storage and ports) and wait until REST answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self._config(), indent=1))
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode} at start; "
                                   f"see {self.workdir / 'orthanc.log'}:\n{self.log_tail()}")
            try:
                self.rest("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout_s} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 15 s); storage is kept."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "orthanc.log").read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

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
        deadline = time.monotonic() + timeout_s
        count = self.instance_count()
        while count < n and time.monotonic() < deadline:
            time.sleep(0.1)
            count = self.instance_count()
        return count


def require_tools(*paths: str) -> None:
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"integration tools missing: {', '.join(missing)} "
                    "(install the Debian packages orthanc, orthanc-dicomweb and dcmtk)")


@pytest.fixture
def orthanc_factory(tmp_path_factory):
    """``orthanc_factory(**extra_config) -> OrthancServer`` (started); all stopped at teardown."""
    require_tools(ORTHANC_BIN)
    servers: list[OrthancServer] = []

    def make(**extra_config) -> OrthancServer:
        srv = OrthancServer(workdir=tmp_path_factory.mktemp("orthanc"), dicom_port=_free_port(),
                            http_port=_free_port(), extra_config=extra_config)
        servers.append(srv)
        srv.start()
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def orthanc(orthanc_factory) -> OrthancServer:
    """A started Orthanc: ``.aet``, ``.host``, ``.dicom_port``, ``.http_port``, ``.rest(path)``, ..."""
    return orthanc_factory()


def storescu(paths, port: int, aet: str = "QSMNODE", calling: str = "SCANNER", extra_args=(),
             host: str = "127.0.0.1", env: dict | None = None, timeout_s: float = 600.0):
    """Run DCMTK ``/usr/bin/storescu`` on files/folders; returns the ``CompletedProcess``.

    Folders are scanned recursively (``+sd +r``). ``env`` is merged into the environment
    (e.g. ``{"TCP_NODELAY": "1"}``).
    """
    require_tools(STORESCU_BIN)
    paths = [str(p) for p in paths]
    args = [STORESCU_BIN, "-aet", calling, "-aec", aet]
    if any(os.path.isdir(p) for p in paths):
        args += ["+sd", "+r"]
    args += list(extra_args) + [host, str(port)] + paths
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=full_env)


@pytest.fixture(name="storescu")
def storescu_fixture():
    """The :func:`storescu` helper, as a fixture."""
    require_tools(STORESCU_BIN)
    return storescu


@pytest.fixture
def simulated_scan(tmp_path_factory):
    """``simulated_scan(vendor="siemens", field_tesla=3.0, matrix=(64, 64, 40), **kw) -> SimulatedScan``."""
    try:
        from qsmnode.simulate.scan import simulate_scan
    except ImportError as err:
        pytest.skip(f"qsmnode.simulate.scan is not available yet ({err})")

    def make(vendor: str = "siemens", field_tesla: float = 3.0, matrix=(64, 64, 40), **kw):
        outdir = tmp_path_factory.mktemp(f"scan-{vendor}-{field_tesla:g}T")
        return simulate_scan(outdir, vendor=vendor, field_tesla=field_tesla, matrix=matrix, **kw)

    return make


def make_mr_instances(outdir: Path, n: int, *, series_description: str = "QSM test", rows: int = 16,
                      study_uid: str | None = None, series_uid: str | None = None,
                      transfer_syntax: str = "1.2.840.10008.1.2.1") -> list[Path]:
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
        ds.SeriesNumber, ds.InstanceNumber = 901, k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "QSM"]
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.arange(rows * rows, dtype=np.int16) + k).tobytes()
        path = outdir / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(name="make_mr_instances")
def make_mr_instances_fixture():
    return make_mr_instances
