"""Start, stop and kill ``qsmnode serve`` as a real subprocess for integration tests.

``NodeProcess(workdir, port, **config)`` writes a TOML configuration (``[node]`` keys as keyword
arguments; ``destinations``: list of ``[[destination]]`` tables; ``tls``: a ``[tls]`` table;
``extra_toml``: appended text), starts ``python -m qsmnode.cli serve --config ...`` with its
stderr in ``workdir/node.log``, and waits until the receiver answers a C-ECHO. ``stop()`` sends
SIGTERM (clean shutdown), ``kill()`` SIGKILL (crash). ``jobs()`` reads the node's index.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ECHOSCU_BIN = "/usr/bin/echoscu"


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


class NodeProcess:
    def __init__(self, workdir: Path, port: int, *, http_port: int = -1, destinations=(), tls: dict | None = None,
                 extra_toml: str = "", **node_keys):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.http_port = http_port
        self.storage = self.workdir / "storage"
        self.log_path = self.workdir / "node.log"
        self.config_path = self.workdir / "node.toml"
        node = {"ae_title": "QSMNODE", "bind": "127.0.0.1", "port": port, "storage": str(self.storage),
                "device": "cpu", "quiet_seconds": 3.0, "incomplete_cap_seconds": 6.0, "min_free_disk_mb": 1.0,
                "job_timeout_seconds": 600.0}
        node.update(node_keys)
        lines = ["[node]"] + [f"{k} = {_toml_value(v)}" for k, v in node.items()]
        lines += ["", "[http]", f"port = {http_port}"]
        if tls:
            lines += ["", "[tls]"] + [f"{k} = {_toml_value(v)}" for k, v in tls.items()]
        for d in destinations:
            lines += ["", "[[destination]]"] + [f"{k} = {_toml_value(v)}" for k, v in d.items()]
        lines += ["", extra_toml]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 60.0, echo: bool = True) -> "NodeProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "qsmnode.cli", "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsmnode serve exited with {self.proc.returncode}:\n{self.log()}")
            if "ready: DICOM" in self.log() and (not echo or self.echo().returncode == 0):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"qsmnode serve did not become ready in {timeout_s} s:\n{self.log()}")

    def echo(self, calling: str = "SCANNER", extra_args=()) -> subprocess.CompletedProcess:
        return subprocess.run([ECHOSCU_BIN, "-aet", calling, "-aec", "QSMNODE", *extra_args, "127.0.0.1",
                               str(self.port)], capture_output=True, text=True, timeout=60)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait (clean shutdown); returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ looking in
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit(self) -> list[dict]:
        path = self.storage / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}) while waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(poll_s)
        raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; jobs: "
                           f"{[(j['id'], j['state'], j['reason']) for j in self.jobs()]}\n{self.log()[-4000:]}")

    def wait_for_jobs(self, n: int, states=("done", "failed"), timeout_s: float = 300.0) -> list[dict]:
        def finished():
            jobs = [j for j in self.jobs() if j["state"] in states]
            return jobs if len(jobs) >= n else None

        return self.wait_for(finished, timeout_s, f"{n} job(s) in {states}")
