"""Benchmark: load a full-size classic Siemens multi-echo GRE (magnitude + phase) from disk.

Writes 256 x 256 x 176 slices x 6 echoes, magnitude and phase (2,112 classic instances) with the
simulator's DICOM writer into a temporary folder, then times ``load_acquisitions`` on one core.
Prints the numbers; asserts nothing (target: under 5 s).

    python bench/load.py [--slices 176] [--echoes 6] [--matrix 256] [--repeat 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os

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
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="write the series here and keep it")
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    except (AttributeError, OSError):
        pass

    from qsmnode.dicom.load import load_acquisitions

    folder = args.keep or Path(tempfile.mkdtemp(prefix="qsmnode-bench-load-"))
    try:
        start = time.perf_counter()
        paths = make_series(folder, args.matrix, args.slices, args.echoes)
        write_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"wrote {len(paths)} instances ({size_mb:.0f} MB) in {write_s:.1f} s")
        times, cpu = [], []
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            acqs = load_acquisitions([folder])
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        acq = acqs[0]
        print(f"loaded {acq.shape} x {acq.n_echoes} echoes, B0 {acq.b0_tesla:.4f} T")
        print(
            f"load_acquisitions on one core: best {min(times):.2f} s, runs "
            + ", ".join(f"{t:.2f}" for t in times)
            + f" ({len(paths) / min(times):.0f} instances/s; target < 5 s)"
        )
        print(
            f"CPU time of the process: best {min(cpu):.2f} s (wall > CPU means waiting for disk or other "
            f"processes; load average {os.getloadavg()[0]:.1f})"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
