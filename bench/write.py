"""Benchmark: build and write every output for a 256 x 256 x 176 scan (8 echoes).

Prints the time of each stage: the derived classic series, the findings, the Parametric Map,
the SR, the summary image, and the durable write (temp file, fsync, rename) of all objects.
Usage: ``python bench/write.py [--shape 256 256 176] [--out DIR] [--workers 4]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from test_outputs import case_from_maps, oblique_affine  # noqa: E402

from qsmnode.dicom import outputs  # noqa: E402
from qsmnode.dicom.parametric_map import build_parametric_map  # noqa: E402
from qsmnode.dicom.write import write_datasets  # noqa: E402
from qsmnode.report.findings import find_foci  # noqa: E402
from qsmnode.report.sr import build_measurement_report  # noqa: E402
from qsmnode.report.summary_image import build_summary_images  # noqa: E402


def make_case(shape, seed=0):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij",
                             sparse=True)
    c = [n / 2 for n in shape]
    mask = ((ii - c[0]) / (0.42 * shape[0])) ** 2 + ((jj - c[1]) / (0.45 * shape[1])) ** 2 + (
        (kk - c[2]) / (0.45 * shape[2])) ** 2 < 1
    chi = rng.normal(0, 0.02, shape).astype(np.float32)
    for n in range(6):  # a few foci
        p = [rng.uniform(0.35, 0.65) * s for s in shape]
        ball = (ii - p[0]) ** 2 + (jj - p[1]) ** 2 + (kk - p[2]) ** 2 <= 4
        chi[ball] = 0.8 if n % 2 == 0 else -0.6
    chi *= mask
    return case_from_maps(chi, mask, oblique_affine((1.0, 1.0, 1.0)), n_echoes=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 176))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3,
                        help="write this many times (replacing) and report each and the best")
    args = parser.parse_args()
    acquisition, result = make_case(tuple(args.shape))
    version = "bench"
    when = datetime.datetime.now()
    times = {}

    t0 = time.perf_counter()
    stored = outputs.classic_stored_arrays(result)
    sequences = outputs._source_sequences(acquisition)
    by_kind = {kind: outputs.build_classic_series(acquisition, result, kind, stored[kind],
                                                  software_version=version, when=when,
                                                  source_sequences=sequences)
               for kind in outputs.CLASSIC_KINDS}
    times["classic series (4 x slices)"] = time.perf_counter() - t0
    t = time.perf_counter()
    foci = find_foci(result.chi_ppm, result.mask, acquisition.voxel_size_mm)
    times["findings"] = time.perf_counter() - t
    t = time.perf_counter()
    pm = build_parametric_map(acquisition, result, by_kind["QSM"], software_version=version)
    times["parametric map"] = time.perf_counter() - t
    t = time.perf_counter()
    sr = build_measurement_report(acquisition, result, foci, by_kind["QSM"],
                                  software_version=version)
    times["structured report"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = build_summary_images(acquisition, result, foci, software_version=version,
                                   when=when)
    times["summary image"] = time.perf_counter() - t
    build_total = time.perf_counter() - t0
    datasets = [d for kind in outputs.CLASSIC_KINDS for d in by_kind[kind]] + [pm, sr, *summary]

    out = args.out or Path(tempfile.mkdtemp(prefix="qsmnode-bench-write-"))
    write_times = []
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        paths = write_datasets(datasets, out, workers=args.workers)
        write_times.append(time.perf_counter() - t)
    write_s = min(write_times)
    size = sum(os.path.getsize(p) for p in paths)

    print(f"shape {tuple(args.shape)}, {len(datasets)} objects, {size / 1e6:.0f} MB, "
          f"{len(foci)} foci, {os.cpu_count()} CPUs")
    for name, seconds in times.items():
        print(f"  build {name:30s} {seconds:6.2f} s")
    print(f"  build total                          {build_total:6.2f} s")
    print(f"  write (durable, {args.workers} threads, best)    {write_s:6.2f} s   "
          f"(runs: {', '.join(f'{w:.2f}' for w in write_times)})")
    print(f"  build + write                        {build_total + write_s:6.2f} s")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
