"""File commands for the CLI: ``process`` and ``simulate`` (no network)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qsmnode.errors import InputRefused, QsmNodeError

PROCESS_EXAMPLE = """example:
  qsmnode process sample_dicom/siemens_3T -o out/ --device auto
  qsmnode process /data/study1 /data/study2 -o out/ --preset accurate

Every acquisition found in the inputs (files or folders, searched recursively) is reconstructed
into its own folder under OUTDIR, one sub-folder per output kind (QSM, SWI, MINIP, R2STAR,
parametric map, SR, summary image). The summary names every input series: processed (into
which acquisition), or refused / failed with the reason.

exit status:
  0  every input series was processed
  3  some series were processed, others were refused or failed (listed in the summary)
  2  nothing was processed (every series refused, no DICOM found, or a usage error)
  1  internal error (a bug; QSMNODE_DEBUG=1 shows the traceback)"""

#: ``qsmnode process`` exit status (PROCESS_EXAMPLE, README "Commands")
EXIT_ALL_PROCESSED = 0
EXIT_NOTHING_PROCESSED = 2
EXIT_SOME_REFUSED = 3

SIMULATE_EXAMPLE = """example:
  qsmnode simulate /tmp/phantom --vendor ge --field 7 --oblique 20
  qsmnode simulate /tmp/phantom --vendor siemens --field 3 --matrix 96x96x72 --echoes 4,10,16,22,28

Writes realistic multi-echo GRE DICOM in the vendor's conventions under OUTDIR/dicom and the
ground truth (susceptibility in ppm, labels, brain mask, truth.json) under OUTDIR/truth."""


def _matrix(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"matrix must look like 96x96x72, not {text!r}")
    return values  # type: ignore[return-value]


def _echo_times_ms(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"echoes must be positive times in ms like 4,10,16, not {text!r}")
    return values


def _overrides(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--set must be a JSON object, e.g. '{{\"swi_mask_power\": 3}}': {err}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--set must be a JSON object")
    return value


def register_file_commands(subparsers, formatter_class) -> None:
    """Add ``process`` and ``simulate``; each sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "process",
        help="reconstruct DICOM files or folders into QSM, SWI, minIP, R2*, SR (no network)",
        description="Load multi-echo GRE DICOM, reconstruct QSM and the derived maps, and write the "
        "DICOM outputs to a folder. The same chain the node runs.",
        epilog=PROCESS_EXAMPLE,
        formatter_class=formatter_class,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="where to reconstruct")
    p.add_argument("--preset", default=None, help="named preset on top of the field-strength table (default, fast, accurate, "
                   "csf_reference); field-dependent values always follow B0 from ImagingFrequency")
    p.add_argument("--set", dest="overrides", type=_overrides, default=None, metavar="JSON",
                   help="override preset parameters, as a JSON object")
    p.add_argument("--no-parametric-map", action="store_true", help="do not write the float Parametric Map")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_process)

    s = subparsers.add_parser(
        "simulate",
        help="write a numerical head phantom as vendor-flavoured multi-echo GRE DICOM, with its truth",
        description="Simulate a multi-echo GRE scan of a numerical head phantom (GM, WM, CSF, deep grey "
        "nuclei, veins, microbleeds, calcifications, air sinuses) in a vendor's DICOM conventions.",
        epilog=SIMULATE_EXAMPLE,
        formatter_class=formatter_class,
    )
    s.add_argument("outdir", metavar="OUTDIR")
    s.add_argument("--vendor", default="siemens",
                   choices=("siemens", "siemens-enhanced", "ge", "philips", "philips-enhanced"))
    s.add_argument("--field", type=float, default=3.0, help="nominal field strength in tesla (1.5, 3, 7)")
    s.add_argument("--oblique", type=float, default=0.0, metavar="DEG", help="slab tilt about the row axis")
    s.add_argument("--orientation", choices=("axial", "sagittal", "coronal"), default="axial")
    s.add_argument("--matrix", type=_matrix, default=(96, 96, 72), help="matrix as IxJxK")
    s.add_argument("--voxel", type=float, default=2.0, help="isotropic voxel size in mm")
    s.add_argument("--echoes", type=_echo_times_ms, default=None, metavar="MS,MS,...",
                   help="echo times in ms (default: suited to the field)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_simulate)

    d = subparsers.add_parser(
        "demo",
        help="run the whole node on the bundled sample_dicom/ over real DICOM, with a local PACS",
        description="Start a local PACS and a node, send sample_dicom/ to the node like a scanner, wait "
        "for the QSM, SWI, minIP, R2*, Parametric Map and SR to come back, and print where they are.",
        epilog="example:\n  qsmnode demo\n  qsmnode demo --workdir /tmp/qsm-demo --device cpu",
        formatter_class=formatter_class,
    )
    d.add_argument("--workdir", default="qsmnode-demo", help="where the node and the local PACS keep files")
    d.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    d.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the outputs")
    d.set_defaults(func=run_demo)


def _progress_printer(enabled: bool):
    start = time.perf_counter()

    def report(text: str) -> None:
        if enabled:
            print(f"  [{time.perf_counter() - start:6.1f} s] {text} ...", file=sys.stderr, flush=True)

    return report


def print_summary(summary: dict, stream=None) -> None:
    """A few lines a person can read: where the outputs are and the key numbers (to ``stream``,
    default the current sys.stdout)."""
    stream = stream or sys.stdout
    stages = summary.get("stage_seconds", {})
    top = {k: v for k, v in stages.items() if "." not in k}
    print(f"  outputs      : {summary.get('outputs')} DICOM files in {summary.get('output_dir')}", file=stream)
    print(f"  acquisition  : {summary.get('vendor')} {summary.get('b0_tesla')} T, matrix "
          f"{'x'.join(str(v) for v in summary.get('matrix', []))}, {summary.get('echoes')} echoes, "
          f"voxel {'x'.join(str(v) for v in summary.get('voxel_size_mm', []))} mm", file=stream)
    print(f"  reconstruction: preset {summary.get('preset')}, device {summary.get('device')}, mask "
          f"{summary.get('mask_volume_ml')} ml, reference {summary.get('reference_region')}, "
          f"chi 1st-99th percentile {summary.get('chi_ppb_p1_p99')} ppb", file=stream)
    if summary.get("low_confidence"):
        print("  confidence   : LOW - findings withheld (see the warnings)", file=stream)
    if "findings" in summary:
        print(f"  findings     : {summary['findings']}", file=stream)
    print("  seconds      : " + ", ".join(f"{k} {v:.1f}" for k, v in top.items()), file=stream)
    for warning in summary.get("warnings", []):
        print(f"  warning      : {warning}", file=stream)


def _series_outcomes(labels: dict[str, str], uids, outcome: str, **extra) -> list[dict]:
    """One summary entry per series: its label, UID, ``outcome`` (processed, refused, failed)
    and ``extra`` (acquisition number, reason)."""
    return [{"series": labels.get(uid, uid), "series_instance_uid": uid, "outcome": outcome, **extra}
            for uid in uids]


def process_exit_status(series: list[dict]) -> int:
    """The exit status of ``qsmnode process`` for its per-series outcomes (PROCESS_EXAMPLE)."""
    processed = sum(1 for s in series if s["outcome"] == "processed")
    if processed == 0:
        return EXIT_NOTHING_PROCESSED
    return EXIT_ALL_PROCESSED if processed == len(series) else EXIT_SOME_REFUSED


def print_series_outcomes(series: list[dict], stream=None) -> None:
    """One line per series that was not processed, then the tally (to ``stream``, default the
    current sys.stdout)."""
    stream = stream or sys.stdout
    for s in series:
        if s["outcome"] != "processed":
            print(f"qsmnode process: {s['series']} {s['outcome']}: {s['reason']}", file=stream)
    processed = sum(1 for s in series if s["outcome"] == "processed")
    print(f"qsmnode process: {processed} of {len(series)} input series processed"
          + (f", {len(series) - processed} refused or failed" if processed < len(series) else ""), file=stream)


def run_process(args) -> int:
    for item in args.inputs:
        if not Path(item).exists():
            raise FileNotFoundError(2, "no such file or folder", item)
    from qsmnode.dicom.load import load_inputs
    from qsmnode.process import process_acquisition

    show = sys.stderr.isatty() or not args.json
    report = _progress_printer(show)
    report("loading DICOM")
    start = time.perf_counter()
    loaded = load_inputs([Path(p) for p in args.inputs])
    load_seconds = time.perf_counter() - start
    if not loaded.series:
        raise InputRefused(f"no DICOM images found in {' '.join(args.inputs)}",
                           "give the folders that hold the magnitude and phase series")
    acquisitions = loaded.acquisitions
    output_root = Path(args.output)
    summaries, series = [], []
    for number, acquisition in enumerate(acquisitions, start=1):
        folder = output_root if len(acquisitions) == 1 else output_root / f"acquisition_{number:02d}"
        report(f"acquisition {number}/{len(acquisitions)}")
        try:
            outcome = process_acquisition(
                acquisition, folder, device=args.device, preset=args.preset, overrides=args.overrides,
                parametric_map=not args.no_parametric_map, progress=report,
                stage_seconds={"load": load_seconds / len(acquisitions)},
                on_series=lambda written: report(f"wrote {written.kind}: {len(written.paths)} file(s)"),
            )
        except QsmNodeError as err:
            series += _series_outcomes(loaded.series, acquisition.source_series_uids, "failed",
                                       acquisition=number, reason=str(err))
            print(f"qsmnode process: acquisition {number} refused: {err}", file=sys.stderr)
            continue
        summaries.append(outcome.summary)
        series += _series_outcomes(loaded.series, acquisition.source_series_uids, "processed",
                                   acquisition=number, output_dir=str(folder))
    for refused in loaded.refused:
        series += _series_outcomes(loaded.series, refused.series_instance_uids, "refused", reason=refused.reason)
    failures = [f"{s['series']}: {s['reason']}" for s in series if s["outcome"] != "processed"]
    if args.json:
        print(json.dumps({"acquisitions": summaries, "series": series, "failures": failures}, indent=2))
    else:
        for number, summary in enumerate(summaries, start=1):
            print(f"qsmnode process: acquisition {number} done")
            print_summary(summary)
        print_series_outcomes(series)
    return process_exit_status(series)


def run_simulate(args) -> int:
    from qsmnode.simulate.scan import simulate_scan

    scan = simulate_scan(
        Path(args.outdir),
        vendor=args.vendor,
        field_tesla=args.field,
        oblique_deg=args.oblique,
        orientation=args.orientation,
        matrix=args.matrix,
        voxel_size_mm=(args.voxel,) * 3,
        echo_times_ms=args.echoes,
        seed=args.seed,
    )
    print(f"qsmnode simulate: {len(scan.paths)} DICOM files in {scan.dicom_dir}; truth in {scan.truth_dir}")
    return 0


def run_demo(args) -> int:
    from qsmnode.demo import run_demo as demo

    return demo(Path(args.workdir), timeout_s=args.timeout, device=args.device)
