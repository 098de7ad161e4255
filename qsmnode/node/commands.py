"""Node commands for the CLI: serve, jobs, retry, check-config, test-rule, echo, send (see qsmnode.cli)."""

from __future__ import annotations

import json
from pathlib import Path

from qsmnode.errors import ConfigError, QsmNodeError


class NetworkError(QsmNodeError):
    """A DICOM peer could not be reached or refused the request."""


def _load(args):
    from qsmnode.config import NodeConfig, load_config

    return load_config(args.config) if getattr(args, "config", None) else NodeConfig()


# ----------------------------------------------------------------------------- serve
def _serve_config(args):
    from qsmnode.config import parse_address

    cfg = _load(args)
    changes = {"ae_title": args.aet, "port": args.port, "bind": args.bind, "device": args.device,
               "http_port": args.http_port, "min_free_disk_mb": args.min_free_disk_mb,
               "storage": Path(args.storage).resolve() if args.storage else None}
    if args.destination:
        dests = dict(cfg.destinations)
        for text in args.destination:
            d = parse_address(text)
            dests[d.name] = d
        changes["destinations"] = dests
    return cfg.with_overrides(**changes)


def cmd_serve(args) -> int:
    from qsmnode.node.serve import serve

    return serve(_serve_config(args))


# ------------------------------------------------------------------------- jobs/retry
def _storage(args) -> Path:
    if getattr(args, "storage", None):
        return Path(args.storage)
    if getattr(args, "config", None):
        return _load(args).storage
    raise ConfigError("which node?", "give --storage DIR or --config FILE")


def cmd_jobs(args) -> int:
    from qsmnode.node.jobs import format_jobs, list_jobs, open_index

    index = open_index(_storage(args))
    try:
        rows = list_jobs(index, args.state, args.limit, delivery=args.delivery)
    finally:
        index.close()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_jobs(rows))
    return 0


def cmd_retry(args) -> int:
    from qsmnode.node.jobs import open_index, retry

    index = open_index(_storage(args))
    try:
        for job_id in args.job:
            job = retry(index, job_id, reprocess=args.reprocess)
            if job["retried"] == "delivery":
                print(f"{job_id}: {job['requeued_files']} undelivered file(s) queued for delivery again "
                      "(a running node sends them within seconds)")
            else:
                why = f" ({job['note']})" if job.get("note") else ""
                print(f"{job_id}: {job['state']} for reconstruction again{why} "
                      "(a running node picks it up within a second)")
    finally:
        index.close()
    return 0


# --------------------------------------------------------------------- config/rules
def cmd_check_config(args) -> int:
    from qsmnode.config import load_config

    cfg = load_config(args.file)
    print(f"{args.file}: OK")
    print(f"  node {cfg.ae_title} on {cfg.bind}:{cfg.port}, storage {cfg.storage}, device {cfg.device}, "
          f"{cfg.workers} worker(s)")
    print(f"  TLS: {'on' if cfg.tls else 'off'}; calling AEs: {', '.join(cfg.allowed_calling_aets) or 'any'}; "
          f"hosts: {', '.join(cfg.allowed_hosts) or 'any'}")
    print(f"  HTTP: {'off' if cfg.http_port < 0 else f'{cfg.http_bind}:{cfg.http_port}'}")
    d = cfg.dispatch
    print(f"  dispatch: back-off {d.base_delay_s:g} s .. {d.max_delay_s:g} s, refused instances given up after "
          f"{d.max_refusals} tries, {d.batch_size} files per batch, up to {d.associations} association(s)")
    for d in cfg.destinations.values():
        print(f"  destination {d.name}: {d.describe() if hasattr(d, 'describe') else d}")
    for r in cfg.effective_rules:
        print(f"  rule {r.name}: preset {r.preset}, destinations {', '.join(r.destinations)}"
              + (" (built-in default)" if not cfg.rules else ""))
    return 0


def cmd_test_rule(args) -> int:
    import pydicom

    from qsmnode.dicom.classify import classify_instance
    from qsmnode.node.rules import AcquisitionFacts, explain, resolve_destinations

    cfg = _load(args)
    headers, components, echoes = [], set(), set()
    for f in args.dicom:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{f} is not a readable DICOM file ({err})") from None
        info = classify_instance(ds)
        print(f"{f}: {info.vendor} {info.modality} {info.component or 'unknown component'}, "
              f"echo {','.join(map(str, info.echo_numbers)) or '?'}, series {info.series_instance_uid}"
              + (f"\n  never a QSM input: {info.refusal}" if info.refusal else ""))
        headers.append(ds)
        if info.component:
            components.add(info.component)
        echoes.update(info.echo_numbers)
    facts = AcquisitionFacts(headers=headers, components=components, echo_numbers=echoes,
                             calling_aes={args.calling_ae} if args.calling_ae else set())
    chosen = None
    for rule in cfg.effective_rules:
        ok, lines = explain(rule, facts)
        print(f"rule {rule.name!r}: {'MATCHES' if ok else 'no match'}")
        for line in lines:
            print(f"  - {line}")
        if ok and chosen is None:
            chosen = rule
    if chosen is None:
        print("=> no rule takes these files (a magnitude-only file lacks the phase: give both)")
        return 1
    dests, warnings = resolve_destinations(chosen, cfg.destinations, cfg.known_aes, facts.calling_aes)
    print(f"=> rule {chosen.name!r}, preset {chosen.preset}, destinations "
          f"{', '.join(d.name for d in dests) or 'none'}")
    for w in warnings:
        print(f"   warning: {w}")
    return 0


# ------------------------------------------------------------------------ echo/send
def _destination(args):
    from qsmnode.config import parse_address

    text = args.destination
    if "@" in text or text.startswith(("http://", "https://")):
        return parse_address(text, "destination")
    cfg = _load(args)
    if text in cfg.destinations:
        return cfg.destinations[text]
    if text in cfg.known_aes:
        return cfg.known_aes[text]
    raise ConfigError(f"unknown destination {text!r}",
                      "give AET@HOST:PORT, or a [[destination]] name together with --config FILE")


def _associate(ae, dest):
    from qsmnode.node.dispatch import prepare_scu_association

    kwargs = {"ae_title": dest.ae_title}
    ctx = dest.ssl_context() if hasattr(dest, "ssl_context") else None
    if ctx is not None:
        kwargs["tls_args"] = (ctx, dest.tls_server_hostname or dest.host)
    assoc = ae.associate(dest.host, int(dest.port), **kwargs)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached (or aborted)"
        raise NetworkError(f"{dest.ae_title}@{dest.host}:{dest.port} {why}",
                           "check the AE titles on both sides, the host/port and TLS settings")
    prepare_scu_association(assoc)  # the dispatcher's: no C-STORE response lost (pynetdicom #875)
    return assoc


def cmd_echo(args) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    dest = _destination(args)
    if dest.kind != "dimse":
        raise ConfigError(f"destination {dest.name!r} is DICOMweb; C-ECHO needs a DIMSE destination")
    ae = AE(ae_title=args.aet)
    ae.acse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    assoc = _associate(ae, dest)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise NetworkError(f"C-ECHO to {dest.ae_title}@{dest.host}:{dest.port} answered "
                           f"{'nothing' if code is None else f'0x{code:04X}'}")
    print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: success")
    return 0


def _files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(2, "not found", str(p))
    return out


def cmd_send(args) -> int:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    dest = _destination(args)
    if dest.kind != "dimse":
        raise ConfigError(f"destination {dest.name!r} is DICOMweb; `qsmnode send` speaks DIMSE",
                          "give an AET@HOST:PORT destination")
    files = _files(args.files)
    datasets, contexts = [], {}
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as err:  # noqa: BLE001
            print(f"skipped {f}: not a DICOM file ({err})")
            continue
        datasets.append((f, ds))
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    if not datasets:
        raise ConfigError("no DICOM files to send")
    if len(contexts) > 128:
        raise ConfigError(f"{len(contexts)} SOP classes in one send; at most 128", "send fewer kinds at once")
    ae = AE(ae_title=args.aet)
    ae.acse_timeout = ae.network_timeout = args.timeout
    for sop, syntaxes in contexts.items():
        ae.add_requested_context(sop, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = _associate(ae, dest)
    failed = 0
    try:
        for f, ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                failed += 1
                comment = getattr(status, "ErrorComment", "") if status is not None else ""
                print(f"refused {f}: status {'none' if code is None else f'0x{code:04X}'} {comment}".rstrip())
    finally:
        assoc.release()
    print(f"sent {len(datasets) - failed} of {len(datasets)} file(s) to {dest.ae_title}@{dest.host}:{dest.port}")
    if failed:
        raise NetworkError(f"{failed} file(s) were refused by {dest.ae_title}")
    return 0


# -------------------------------------------------------------------------- register
def register(subparsers, formatter_class) -> None:
    """Add the node's subcommands to ``subparsers``; each sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "serve", formatter_class=formatter_class, help="run the DICOM node",
        description="Run the node: C-STORE receiver, series tracker, jobs, worker, dispatcher, /healthz and "
                    "/metrics. Flags override the configuration file.",
        epilog="examples:\n  qsmnode serve --aet QSMNODE --port 11112 --storage /tmp/q "
               "--destination PACS@127.0.0.1:4242\n  qsmnode serve --config /etc/qsmnode/qsmnode.toml")
    p.add_argument("--config", help="TOML configuration file (see deploy/qsmnode.toml)")
    p.add_argument("--aet", help="the node's AE title (default QSMNODE)")
    p.add_argument("--port", type=int, help="DICOM port (default 11112)")
    p.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--storage", help="folder for spool, index, outputs and audit log")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="where results go (repeatable); adds to the configuration's destinations")
    p.add_argument("--http-port", type=int, help="port of /healthz and /metrics on 127.0.0.1 (-1: off)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], help="reconstruction device (default auto)")
    p.add_argument("--min-free-disk-mb", type=float, help="refuse C-STORE (0xA700) below this free space")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "jobs", formatter_class=formatter_class, help="list the node's jobs",
        description="List jobs of a node (running or not), newest first, with the reason of failed ones and "
                    "each job's delivery: per destination, its files sent, pending and failed; for a delivery "
                    "that failed, why.",
        epilog="examples:\n  qsmnode jobs --storage /var/lib/qsmnode --state failed\n"
               "  qsmnode jobs --storage /var/lib/qsmnode --delivery failed\n"
               "  qsmnode jobs --config /etc/qsmnode/qsmnode.toml --json")
    p.add_argument("--config", help="the node's configuration file (for its storage folder)")
    p.add_argument("--storage", help="the node's storage folder")
    p.add_argument("--state", choices=["queued", "running", "done", "failed"], help="only jobs in this state")
    p.add_argument("--delivery", choices=["delivered", "delivering", "failed"],
                   help="only jobs whose delivery is in this state")
    p.add_argument("--limit", type=int, default=100, help="at most this many jobs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser(
        "retry", formatter_class=formatter_class, help="queue failed jobs or failed deliveries again",
        description="A failed job goes back in the queue and is reconstructed again. A done job whose delivery "
                    "failed (or waits for its next try) has its undelivered files queued for delivery now, "
                    "without reconstructing (unless --reprocess, or the files are gone). A running node takes "
                    "either up within seconds.",
        epilog="examples:\n  qsmnode retry --storage /var/lib/qsmnode job-12-1\n"
               "  qsmnode retry --storage /var/lib/qsmnode --reprocess job-12-1")
    p.add_argument("job", nargs="+", help="job id(s) as shown by `qsmnode jobs`")
    p.add_argument("--reprocess", action="store_true",
                   help="reconstruct a done job again even when only its delivery failed")
    p.add_argument("--config", help="the node's configuration file")
    p.add_argument("--storage", help="the node's storage folder")
    p.set_defaults(func=cmd_retry)

    p = subparsers.add_parser(
        "check-config", formatter_class=formatter_class, help="validate a configuration file",
        description="Validate a TOML configuration: unknown keys, wrong types, unknown destination names, "
                    "bad regexes, missing TLS files. Prints a summary when it is valid.",
        epilog="example:\n  qsmnode check-config /etc/qsmnode/qsmnode.toml")
    p.add_argument("file", help="TOML configuration file")
    p.set_defaults(func=cmd_check_config)

    p = subparsers.add_parser(
        "test-rule", formatter_class=formatter_class, help="show which rule takes some DICOM files",
        description="Test the configuration's rules against DICOM files (give a magnitude and a phase file of "
                    "one acquisition) and show, condition by condition, which rule matches and why.",
        epilog="example:\n  qsmnode test-rule --config qsmnode.toml mag_echo1.dcm phase_echo1.dcm --calling-ae MR1")
    p.add_argument("dicom", nargs="+", help="DICOM file(s) of one acquisition")
    p.add_argument("--config", help="TOML configuration (default: the built-in default rule)")
    p.add_argument("--calling-ae", help="pretend the files came from this AE title")
    p.set_defaults(func=cmd_test_rule)

    for name, func, helptext, example in (
        ("echo", cmd_echo, "C-ECHO a destination",
         "examples:\n  qsmnode echo PACS@10.0.0.5:104\n  qsmnode echo --config qsmnode.toml pacs"),
        ("send", cmd_send, "C-STORE files to a destination",
         "examples:\n  qsmnode send PACS@10.0.0.5:104 outputs/job-3-1/\n"
         "  qsmnode send --config qsmnode.toml pacs a.dcm b.dcm"),
    ):
        p = subparsers.add_parser(name, formatter_class=formatter_class, help=helptext,
                                  description=helptext + " (DIMSE; TLS as configured for the destination).",
                                  epilog=example)
        p.add_argument("destination", help="AET@HOST:PORT, or a [[destination]] name with --config")
        if name == "send":
            p.add_argument("files", nargs="+", help="DICOM files or folders")
        p.add_argument("--config", help="configuration file that names the destination")
        p.add_argument("--aet", default="QSMNODE", help="our calling AE title")
        p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
        p.set_defaults(func=func)
