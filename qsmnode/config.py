"""Node configuration: one TOML file, validated with errors that say what to change.

Example (every option, with its default)::

    [node]
    ae_title = "QSMNODE"
    bind = "0.0.0.0"                 # address the DICOM receiver listens on
    port = 11112
    storage = "/var/lib/qsmnode"     # spool, index (index.sqlite), outputs, audit log
    device = "auto"                  # auto | cpu | gpu  (reconstruction backend)
    workers = 1                      # jobs reconstructed at the same time
    job_timeout_seconds = 1800       # a job running longer is killed and marked failed
    min_free_disk_mb = 1024          # below this, C-STORE is refused with 0xA700 (Out of Resources)
    max_pdu_size = 0                 # receiver's maximum PDU (0 = unlimited)
    max_instance_mb = 1024           # largest instance taken: decoded pixel data, or a deflated data set
                                     # once inflated (refused with 0xA700 beyond); see deploy/qsmnode.toml
    allowed_calling_aets = []        # empty: any calling AE title is accepted
    allowed_hosts = []               # empty: any peer address; else IPs or CIDR networks
    quiet_seconds = 20               # acquisition complete this long after its last instance ...
    incomplete_cap_seconds = 600     # ... unless counts say it is incomplete: then failed after this
    audit_log = ""                   # default: <storage>/audit.log
    log_level = "info"
    fsync_directory = false          # also fsync the series folder per instance (POSIX-strict, ~2x slower;
                                     # ext4/xfs make a new file's name durable with its own fdatasync)

    [http]
    bind = "127.0.0.1"
    port = 8080                      # GET /healthz, GET /metrics; -1 disables

    [tls]                            # DICOM TLS for the receiver (optional)
    certificate = "server.pem"
    private_key = "server.key"
    ca_certificates = "ca.pem"       # needed when require_client_certificate = true
    require_client_certificate = false

    [retention]
    keep_hours = 24                  # delete received + output files this long after dispatch
    pressure_free_disk_mb = 4096     # below this, delete dispatched jobs' files at once, oldest first

    [dispatch]                       # delivery to destinations (see qsmnode.node.dispatch.DispatchSettings)
    base_delay_s = 2.0               # first retry after ~this long; doubles per failed try (with jitter) ...
    max_delay_s = 300.0              # ... up to this
    max_refusals = 5                 # an instance the destination refuses this often is given up
    batch_size = 500                 # files per association / STOW-RS run
    associations = 4                 # concurrent associations per destination for a large batch (1-32)

    [known_aes]                      # where "return-to-sender" sends, by calling AE title
    MR_SCANNER1 = "10.0.0.21:104"

    [[destination]]                  # see qsmnode.node.dispatch.Destination.from_config
    name = "pacs"
    kind = "dimse"
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104

    [[rule]]                         # see qsmnode.node.rules (none: the built-in default rule)
    name = "all-qsm"
    preset = "auto"
    destinations = ["pacs", "return-to-sender"]

Relative paths are relative to the configuration file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qsmnode.errors import ConfigError
from qsmnode.node.dispatch import DispatchSettings
from qsmnode.node.rules import Rule, default_rule, validate_destination_names

_SECTIONS = {"node", "http", "tls", "retention", "dispatch", "known_aes", "destination", "rule"}

# key -> (type, default); float accepts int
_NODE_KEYS: dict[str, tuple[type, Any]] = {
    "ae_title": (str, "QSMNODE"),
    "bind": (str, "0.0.0.0"),
    "port": (int, 11112),
    "storage": (str, "/var/lib/qsmnode"),
    "device": (str, "auto"),
    "workers": (int, 1),
    "job_timeout_seconds": (float, 1800.0),
    "min_free_disk_mb": (float, 1024.0),
    "max_pdu_size": (int, 0),
    "max_instance_mb": (float, 1024.0),
    "allowed_calling_aets": (list, []),
    "allowed_hosts": (list, []),
    "quiet_seconds": (float, 20.0),
    "incomplete_cap_seconds": (float, 600.0),
    "audit_log": (str, ""),
    "log_level": (str, "info"),
    "fsync_directory": (bool, False),
}
_HTTP_KEYS = {"bind": (str, "127.0.0.1"), "port": (int, 8080)}
_TLS_KEYS = {"certificate": (str, None), "private_key": (str, None), "ca_certificates": (str, ""),
             "require_client_certificate": (bool, False)}
_RETENTION_KEYS = {"keep_hours": (float, 24.0), "pressure_free_disk_mb": (float, 4096.0)}
_DISPATCH_KEYS = {f.name: (type(f.default), f.default) for f in fields(DispatchSettings)}
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class TlsConfig:
    """Receiver TLS: server certificate + key (PEM), optional CA to require client certificates."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    def server_context(self):
        """An ``ssl.SSLContext`` for the receiver (TLS >= 1.2)."""
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.certificate), str(self.private_key))
            if self.ca_certificates:
                ctx.load_verify_locations(cafile=str(self.ca_certificates))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"[tls]: cannot load certificate/key/CA: {err}",
                              "check the PEM paths in [tls] and that the key matches the certificate") from None
        if self.require_client_certificate:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class NodeConfig:
    """The validated configuration of one node (see the module docstring for the TOML keys)."""

    ae_title: str = "QSMNODE"
    bind: str = "0.0.0.0"
    port: int = 11112
    storage: Path = Path("/var/lib/qsmnode")
    device: str = "auto"
    workers: int = 1
    job_timeout_seconds: float = 1800.0
    min_free_disk_mb: float = 1024.0
    max_pdu_size: int = 0
    max_instance_mb: float = 1024.0
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    quiet_seconds: float = 20.0
    incomplete_cap_seconds: float = 600.0
    audit_log: Path | None = None
    log_level: str = "info"
    fsync_directory: bool = False
    http_bind: str = "127.0.0.1"
    http_port: int = 8080
    tls: TlsConfig | None = None
    retention_hours: float = 24.0
    pressure_free_disk_mb: float = 4096.0
    dispatch: DispatchSettings = DispatchSettings()
    known_aes: dict = field(default_factory=dict, hash=False)      # AE title -> Destination
    destinations: dict = field(default_factory=dict, hash=False)   # name -> Destination
    rules: tuple[Rule, ...] = ()
    source: Path | None = None

    @property
    def effective_rules(self) -> tuple[Rule, ...]:
        return self.rules or (default_rule(),)

    @property
    def db_path(self) -> Path:
        return self.storage / "index.sqlite"

    @property
    def audit_path(self) -> Path:
        return self.audit_log or (self.storage / "audit.log")

    def with_overrides(self, **changes) -> "NodeConfig":
        """A copy with some fields replaced (command-line flags); validated again."""
        cfg = replace(self, **{k: v for k, v in changes.items() if v is not None})
        _check_values(cfg)
        return cfg


def _section(raw: dict, name: str, spec: dict, where: str) -> dict:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, not {type(table).__name__}")
    out = {}
    for key, value in table.items():
        if key not in spec:
            raise ConfigError(f"{where}[{name}]: unknown key {key!r}",
                              f"allowed keys: {', '.join(sorted(spec))}")
        kind = spec[key][0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ConfigError(f"{where}[{name}] {key} must be {kind.__name__}, not {type(value).__name__} ({value!r})")
        out[key] = value
    for key, (_, default) in spec.items():
        out.setdefault(key, default)
    return out


def _resolve(base: Path | None, value: str | None) -> Path | None:
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


def _destination_from_table(table: dict, where: str):
    from qsmnode.node.dispatch import Destination

    try:
        return Destination.from_config(table)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: {err}", "see deploy/qsmnode.toml for the destination keys") from None


def parse_address(text: str, where: str = "--destination"):
    """``AET@HOST:PORT`` -> a DIMSE Destination (named by its AE title)."""
    from qsmnode.node.dispatch import Destination

    try:
        return Destination.parse_address(text)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: cannot parse {text!r}: {err}", "write it as AET@HOST:PORT, e.g. PACS@10.0.0.5:104") from None


def config_from_dict(raw: dict, base_dir: Path | None = None, source: Path | None = None) -> NodeConfig:
    """Validate a parsed TOML document and build the NodeConfig; raises ConfigError."""
    where = f"{source}: " if source else ""
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{where}unknown section or key {key!r}",
                              f"allowed top-level tables: {', '.join(sorted(_SECTIONS))}")
    node = _section(raw, "node", _NODE_KEYS, where)
    http = _section(raw, "http", _HTTP_KEYS, where)
    retention = _section(raw, "retention", _RETENTION_KEYS, where)
    try:
        dispatch = DispatchSettings(**_section(raw, "dispatch", _DISPATCH_KEYS, where))
    except ConfigError as err:
        raise ConfigError(f"{where}[dispatch] {err.reason}", err.hint) from None
    tls = None
    if "tls" in raw:
        t = _section(raw, "tls", _TLS_KEYS, where)
        if not t["certificate"] or not t["private_key"]:
            raise ConfigError(f"{where}[tls] needs certificate and private_key (PEM files)")
        if t["require_client_certificate"] and not t["ca_certificates"]:
            raise ConfigError(f"{where}[tls] require_client_certificate = true needs ca_certificates",
                              "name the PEM file of the CA that signs the senders' certificates")
        tls = TlsConfig(_resolve(base_dir, t["certificate"]), _resolve(base_dir, t["private_key"]),
                        _resolve(base_dir, t["ca_certificates"]), t["require_client_certificate"])
        for p in (tls.certificate, tls.private_key, tls.ca_certificates):
            if p is not None and not p.is_file():
                raise ConfigError(f"{where}[tls]: file not found: {p}")
    for key in ("allowed_calling_aets", "allowed_hosts"):
        if not all(isinstance(v, str) for v in node[key]):
            raise ConfigError(f"{where}[node] {key} must be a list of strings")

    destinations: dict = {}
    dest_tables = raw.get("destination", [])
    if not isinstance(dest_tables, list):
        raise ConfigError(f"{where}destinations are written as [[destination]] (an array of tables)")
    for n, table in enumerate(dest_tables):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}[[destination]] #{n + 1} must be a table")
        dest = _destination_from_table(table, f"{where}[[destination]] #{n + 1}")
        if dest.name in destinations:
            raise ConfigError(f"{where}[[destination]] name {dest.name!r} is used twice", "give each destination its own name")
        destinations[dest.name] = dest

    known = raw.get("known_aes", {})
    if not isinstance(known, dict):
        raise ConfigError(f"{where}[known_aes] must be a table of AE = \"host:port\"")
    known_aes = {}
    for aet, addr in known.items():
        if not isinstance(addr, str):
            raise ConfigError(f"{where}[known_aes] {aet} must be a string \"host:port\", not {addr!r}")
        known_aes[aet] = parse_address(f"{aet}@{addr}", f"{where}[known_aes] {aet}")

    rule_tables = raw.get("rule", [])
    if not isinstance(rule_tables, list):
        raise ConfigError(f"{where}rules are written as [[rule]] (an array of tables)")
    rules = tuple(Rule.from_config(t, n) for n, t in enumerate(rule_tables))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}two [[rule]] tables share a name", "give each rule its own name")
    validate_destination_names(rules, destinations)

    cfg = NodeConfig(
        ae_title=node["ae_title"],
        bind=node["bind"],
        port=node["port"],
        storage=_resolve(base_dir, node["storage"]),
        device=node["device"],
        workers=node["workers"],
        job_timeout_seconds=node["job_timeout_seconds"],
        min_free_disk_mb=node["min_free_disk_mb"],
        max_pdu_size=node["max_pdu_size"],
        max_instance_mb=node["max_instance_mb"],
        allowed_calling_aets=tuple(node["allowed_calling_aets"]),
        allowed_hosts=tuple(node["allowed_hosts"]),
        quiet_seconds=node["quiet_seconds"],
        incomplete_cap_seconds=node["incomplete_cap_seconds"],
        audit_log=_resolve(base_dir, node["audit_log"]),
        log_level=node["log_level"],
        fsync_directory=node["fsync_directory"],
        http_bind=http["bind"],
        http_port=http["port"],
        tls=tls,
        retention_hours=retention["keep_hours"],
        pressure_free_disk_mb=retention["pressure_free_disk_mb"],
        dispatch=dispatch,
        known_aes=known_aes,
        destinations=destinations,
        rules=rules,
        source=source,
    )
    _check_values(cfg, where)
    return cfg


def _check_values(cfg: NodeConfig, where: str = "") -> None:
    if not 1 <= len(cfg.ae_title) <= 16 or "\\" in cfg.ae_title or cfg.ae_title.strip() != cfg.ae_title:
        raise ConfigError(f"{where}ae_title {cfg.ae_title!r} is not a valid AE title", "1-16 characters, no backslash")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{where}port {cfg.port} is out of range", "use 1-65535 (0 picks a free port)")
    if not -1 <= cfg.http_port <= 65535:
        raise ConfigError(f"{where}[http] port {cfg.http_port} is out of range", "use 1-65535, 0 for any, -1 to disable")
    if cfg.device not in DEVICES:
        raise ConfigError(f"{where}device {cfg.device!r} is not one of {', '.join(DEVICES)}")
    if cfg.workers < 1:
        raise ConfigError(f"{where}workers must be >= 1, not {cfg.workers}")
    for key in ("job_timeout_seconds", "quiet_seconds", "incomplete_cap_seconds"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{where}{key} must be > 0, not {getattr(cfg, key)}")
    if cfg.incomplete_cap_seconds < cfg.quiet_seconds:
        raise ConfigError(f"{where}incomplete_cap_seconds ({cfg.incomplete_cap_seconds:g}) is below quiet_seconds "
                          f"({cfg.quiet_seconds:g})", "the cap is the longest wait; make it >= quiet_seconds")
    if cfg.min_free_disk_mb < 0 or cfg.pressure_free_disk_mb < 0 or cfg.retention_hours < 0:
        raise ConfigError(f"{where}disk watermarks and keep_hours must be >= 0")
    if cfg.max_instance_mb <= 0:
        raise ConfigError(f"{where}max_instance_mb must be > 0 (MiB; 1024 takes any real MR instance)")
    if cfg.max_pdu_size < 0:
        raise ConfigError(f"{where}max_pdu_size must be >= 0 (0 = unlimited)")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}log_level {cfg.log_level!r} is not debug, info, warning or error")
    for host in cfg.allowed_hosts:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ConfigError(f"{where}allowed_hosts: {host!r} is not an IP address or network",
                              "e.g. \"10.0.0.21\" or \"10.0.0.0/24\"") from None


def load_config(path: str | os.PathLike) -> NodeConfig:
    """Read and validate a TOML configuration file; raises ConfigError (or FileNotFoundError)."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}", "check quoting and brackets on that line") from None
    return config_from_dict(raw, base_dir=path.parent.resolve(), source=path)
