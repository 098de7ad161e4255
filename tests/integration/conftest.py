"""Fixtures for integration tests against real DICOM software: Orthanc and DCMTK.

The helpers behind them (ports, Orthanc, storescu, test files, ``qsmnode serve`` processes) are in
``node_helpers.py``, shared with ``bench/node.py``; this file adds the fixtures and the skips.

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

import pytest

# the helpers live in node_helpers (no pytest there, so bench/node.py shares them); imported here
# too so that tests can keep importing them from conftest
from node_helpers import (  # noqa: F401
    ORTHANC_BIN, STORESCU_BIN, OrthancServer, dicomweb_plugin, free_port as _free_port, make_mr_instances,
    missing_tools, storescu as _storescu,
)


@pytest.fixture
def free_port():
    """A function returning a free loopback TCP port each call."""
    return _free_port


def require_tools(*paths: str) -> None:
    missing = missing_tools(*paths)
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


def storescu(paths, port: int, **kw):
    """:func:`node_helpers.storescu`, skipping the test when DCMTK is not installed."""
    require_tools(STORESCU_BIN)
    return _storescu(paths, port, **kw)


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


@pytest.fixture(name="make_mr_instances")
def make_mr_instances_fixture():
    return make_mr_instances
