"""Benchmark: load a full-size classic Siemens multi-echo GRE (magnitude + phase) from disk.

Writes 256 x 256 x 176 slices x 6 echoes, magnitude and phase (2,112 classic instances) with the
simulator's DICOM writer into a temporary folder, then times ``load_acquisitions`` with each
``--workers`` count (1 = the serial path, in this process only; N = N reader processes), the
process pinned to N cores. Prints wall time and CPU time (this process, and its reader processes)
per run and the best of ``--repeat``; asserts nothing (target: under 5 s).

    python bench/load.py [--slices 176] [--echoes 6] [--matrix 256] [--repeat 3]
                         [--workers 1 2] [--keep DIR | --input DIR]
"""

from __future__ import annotations

import argparse
import os
import resource

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def make_series(folder: Path, matrix: int, slices: int, echoes: int) -> list[Path]:
    from qsmnode.simulate.dicom_writer import SlabGeometry, write_gre_dicom

    te = [4.0 + 5.0 * e for e in range(echoes)]
    x = np.linspace(-1, 1, matrix, dtype=np.float32)
    z = np.linspace(-1, 1, slices, dtype=np.float32)
    mag = np.exp(-(x[:, None, None] ** 2 + x[None, :, None] ** 2 + z[None, None, :] ** 2))
    field_hz = 20.0 * x[:, None, None] + 10.0 * z[None, None, :]
    signal = np.empty((matrix, matrix, slices, echoes), dtype=np.complex64)
    for e, t in enumerate(te):
        signal[..., e] = mag * np.exp(1j * 2 * np.pi * field_hz * t / 1000.0)
    geom = SlabGeometry(
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin_mm=(-128.0, -128.0, -88.0),
        voxel_size_mm=(1.0, 1.0, 1.0),
        shape=(matrix, matrix, slices),
    )
    return write_gre_dicom(
        folder,
        signal,
        geom,
        vendor="siemens",
        echo_times_ms=te,
        frequency_mhz=123.2,
        field_label=3.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--echoes", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="reader process counts to time, e.g. 1 2 (1 = serial; default 1)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the series here and keep it")
    parser.add_argument(
        "--input", type=Path, default=None, help="time an existing folder (written with --keep)"
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    from qsmnode.dicom.load import load_acquisitions

    folder = args.input or args.keep or Path(tempfile.mkdtemp(prefix="qsmnode-bench-load-"))
    try:
        if args.input is None:
            start = time.perf_counter()
            paths = make_series(folder, args.matrix, args.slices, args.echoes)
            write_s = time.perf_counter() - start
            print(f"wrote {len(paths)} instances in {write_s:.1f} s")
        else:
            paths = [p for p in folder.rglob("*") if p.is_file()]
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} instances, {size_mb:.0f} MB")
        for workers in args.workers:
            n_cores = max(1, min(workers, len(cores))) if cores else 0
            if cores:
                os.sched_setaffinity(0, set(cores[:n_cores]))  # the readers inherit it
            times, cpu, child_cpu = [], [], []
            load_before = os.getloadavg()[0]
            for _ in range(args.repeat):
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                start, start_cpu = time.perf_counter(), time.process_time()
                acqs = load_acquisitions([folder], workers=workers)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                child_cpu.append(
                    after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
                )
                del acqs[:]
            best = min(range(len(times)), key=times.__getitem__)
            print(
                f"workers={workers} on {n_cores or '?'} core(s): best {times[best]:.2f} s wall "
                f"({len(paths) / times[best]:.0f} instances/s; target < 5 s), CPU {cpu[best]:.2f} s "
                f"this process + {child_cpu[best]:.2f} s readers; runs "
                + ", ".join(f"{t:.2f}" for t in times)
                + f"; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
            )
        print("(wall > CPU means waiting for disk or for other processes on the machine)")
    finally:
        if args.keep is None and args.input is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
