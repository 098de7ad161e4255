"""Accuracy on the realistic head (qsmnode.simulate.realistic_head) through every vendor writer.

For each vendor x field x slab (axial, 20 deg oblique) the scan is simulated below the voxel,
written as that vendor's DICOM, loaded by the node's loader, reconstructed on the CPU, and
reviewed as the node would report it. Printed per case: NRMSE over the whole mask and by depth
(outer 2 voxels, 2-6 mm, interior), RMS error (ppm) per shell, the mask's share outside the
brain, deep-grey slope, vein ratio, and each lesion's sign and whether the report lists it.

Usage::

    python bench/edge_accuracy.py                       # the full matrix (18 cases, ~10 min on 2 cores)
    python bench/edge_accuracy.py --vendors siemens --fields 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qsmnode.dicom.load import load_acquisition
from qsmnode.process import reconstruct_acquisition
from qsmnode.report.review import review_result
from qsmnode.simulate.evaluate import FOCUS_KIND, edge_accuracy, foci_near_lesions, region_accuracy
from qsmnode.simulate.scan import simulate_scan

MATRIX = (96, 112, 88)
VOXEL_MM = (2.0, 2.0, 2.0)


def listed_lesions(acquisition, result, lesions, voxel_size_mm) -> list[bool]:
    """Whether the node's report lists each lesion (a listed focus within its radius + 2 mm)."""
    review = review_result(acquisition, result)
    nearby = foci_near_lesions(review.findings.listed, lesions, voxel_size_mm)
    return [any(f.kind == FOCUS_KIND[les["kind"]] for f in near) for les, near in zip(lesions, nearby)]


def run_case(workdir: Path, vendor: str, field: float, oblique_deg: float) -> dict:
    t0 = time.perf_counter()
    scan = simulate_scan(workdir, vendor=vendor, field_tesla=field, oblique_deg=oblique_deg, matrix=MATRIX,
                         voxel_size_mm=VOXEL_MM, head="realistic")
    t_sim = time.perf_counter() - t0
    truth = json.loads((scan.truth_dir / "truth.json").read_text())
    chi_true = np.load(scan.truth_dir / "chi_ppm.npy")
    labels = np.load(scan.truth_dir / "labels.npy")
    brain = np.load(scan.truth_dir / "brain_mask.npy")
    acq = load_acquisition([scan.dicom_dir])
    t1 = time.perf_counter()
    result = reconstruct_acquisition(acq, device="cpu")
    t_recon = time.perf_counter() - t1
    row = {"vendor": vendor, "field_t": field, "oblique_deg": oblique_deg,
           "seconds_simulate": round(t_sim, 1), "seconds_reconstruct": round(t_recon, 1)}
    row.update(edge_accuracy(result.chi_ppm, chi_true, result.mask, brain, VOXEL_MM))
    regions = region_accuracy(result.chi_ppm, result.mask, chi_true, labels, truth["lesions"], VOXEL_MM,
                              truth["labels"])
    for les, shown in zip(regions["lesions"], listed_lesions(acq, result, truth["lesions"], VOXEL_MM)):
        les["listed"] = shown
    row.update(regions)
    return row


def _fmt(row: dict) -> str:
    lesions = " ".join(("+" if l["right_sign"] else "-") + ("L" if l["listed"] else ".") for l in row["lesions"])
    return (f"{row['vendor']:8s} {row['field_t']:>4g} T {row['oblique_deg']:>4g} deg | NRMSE {row['nrmse_pct']:5.1f} % "
            f"(outer {row['nrmse_pct_outer_2_voxels']:5.1f}, 2-6 mm {row['nrmse_pct_2_to_6_mm']:5.1f}, "
            f"interior {row['nrmse_pct_interior']:5.1f}) | RMS ppm outer {row['rms_error_ppm_outer_2_voxels']:.3f} "
            f"2-6 {row['rms_error_ppm_2_to_6_mm']:.3f} int {row['rms_error_ppm_interior']:.3f} | outside brain "
            f"{row['mask_outside_brain_pct']:.2f} % | DGM slope {row['deep_grey_slope']:.2f} | veins "
            f"{row['vein_ratio']:.2f} | lesions {lesions} | {row['seconds_reconstruct']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vendors", nargs="+", default=["siemens", "ge", "philips"])
    ap.add_argument("--fields", nargs="+", type=float, default=[1.5, 3.0, 7.0])
    ap.add_argument("--oblique", nargs="+", type=float, default=[0.0, 20.0])
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    rows = []
    print("lesions: +/- sign right/wrong, L listed in the report, . not listed", flush=True)
    for vendor in args.vendors:
        for field in args.fields:
            for oblique in args.oblique:
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_case(Path(tmp), vendor, field, oblique)
                rows.append(row)
                print(_fmt(row), flush=True)
    keys = ["nrmse_pct", "rms_error_ppm_outer_2_voxels", "mask_outside_brain_pct", "deep_grey_slope", "vein_ratio"]
    print("worst: " + ", ".join(f"{k} {max(r[k] for r in rows) if k != 'deep_grey_slope' else min(r[k] for r in rows):.3g}"
                                for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
