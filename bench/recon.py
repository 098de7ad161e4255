"""Benchmark of the reconstruction pipeline: per-stage and total time, peak memory, CPU and GPU.

Usage::

    python bench/recon.py                       # 256x256x176 (1 mm) and 128x128x88 (2 mm), 5 echoes, CPU (+GPU)
    python bench/recon.py --sizes small --device cpu
    python bench/recon.py --sizes large --device gpu --repeat 2

The scan is the numerical head phantom (qsmnode.simulate) at 3 T, 15 deg oblique, SNR 100,
TE 4-24 ms. Memory: CPU peak from tracemalloc (numpy allocations, on its own run so the tracing
does not slow the timed run) and the process's max RSS (resource); GPU peak from the CuPy memory
pool (bytes held after the run, the pool keeps freed blocks). Timing numbers only; accuracy is
asserted by the tests.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from qsmnode.recon.backend import gpu_available
from qsmnode.recon.pipeline import reconstruct
from qsmnode.simulate.forward import simulate_gre
from qsmnode.simulate.phantom import head_phantom

SIZES = {
    "large": ((256, 256, 176), (1.0, 1.0, 1.0)),
    "small": ((128, 128, 88), (2.0, 2.0, 2.0)),
}
ECHO_TIMES_S = [0.004, 0.009, 0.014, 0.019, 0.024]
B0_TESLA = 3.0


def make_scan(matrix, voxel_size_mm):
    t0 = time.perf_counter()
    ph = head_phantom(matrix=matrix, voxel_size_mm=voxel_size_mm, seed=0)
    a = np.radians(15.0)
    b0dir = np.array([0.0, np.sin(a), np.cos(a)])
    signal = simulate_gre(ph, B0_TESLA, ECHO_TIMES_S, b0dir, snr=100.0, seed=1)
    return signal, b0dir, time.perf_counter() - t0


def run_once(signal, voxel_size_mm, b0dir, device):
    if device == "gpu":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
    t0 = time.perf_counter()
    result = reconstruct(signal, ECHO_TIMES_S, B0_TESLA, voxel_size_mm, b0dir, device=device)
    wall = time.perf_counter() - t0
    peak_gpu = None
    if device == "gpu":
        peak_gpu = cupy.get_default_memory_pool().total_bytes()
    return result, wall, peak_gpu


def cpu_peak_traced(signal, voxel_size_mm, b0dir):
    tracemalloc.start()
    reconstruct(signal, ECHO_TIMES_S, B0_TESLA, voxel_size_mm, b0dir, device="cpu")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--device", default="all", choices=("all", "cpu", "gpu"))
    p.add_argument("--repeat", type=int, default=1, help="timed runs per case (the best is shown)")
    p.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run (CPU peak memory)")
    args = p.parse_args(argv)
    devices = ["cpu", "gpu"] if args.device == "all" else [args.device]
    if "gpu" in devices and not gpu_available():
        print("GPU: CuPy or a CUDA device is not available; GPU rows skipped")
        devices = [d for d in devices if d != "gpu"]
    rows = []
    for size in args.sizes.split(","):
        matrix, vox = SIZES[size]
        signal, b0dir, t_sim = make_scan(matrix, vox)
        print(f"{size}: {matrix} x {len(ECHO_TIMES_S)} echoes at {vox} mm, simulated in {t_sim:.1f} s", flush=True)
        for device in devices:
            if device == "gpu":  # warm-up: CUDA context, FFT plans, kernels
                run_once(signal, vox, b0dir, device)
            best = None
            for _ in range(max(1, args.repeat)):
                result, wall, peak_gpu = run_once(signal, vox, b0dir, device)
                if best is None or wall < best[1]:
                    best = (result, wall, peak_gpu)
            result, wall, peak_gpu = best
            peak = peak_gpu if device == "gpu" else (None if args.no_trace else cpu_peak_traced(signal, vox, b0dir))
            stages = {}
            for step in result.steps:
                stages[step.name] = stages.get(step.name, 0.0) + step.seconds
            rows.append((size, device, wall, peak, stages, result.quality))
            print(f"  {device}: {wall:.1f} s", flush=True)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    names = []
    for row in rows:
        for n in row[4]:
            if n not in names:
                names.append(n)
    header = f"{'size':6} {'dev':4} {'total s':>8} {'peak MiB':>9} " + " ".join(f"{n[:12]:>12}" for n in names)
    print()
    print(header)
    print("-" * len(header))
    for size, device, wall, peak, stages, quality in rows:
        peak_s = f"{peak / 2**20:9.0f}" if peak is not None else f"{'n/a':>9}"
        print(f"{size:6} {device:4} {wall:8.1f} {peak_s} " + " ".join(f"{stages.get(n, 0.0):12.2f}" for n in names))
    print(f"\nprocess max RSS: {maxrss_mb:.0f} MiB (includes the simulated scans); CPU peak = tracemalloc of numpy "
          "allocations; GPU peak = CuPy pool bytes after the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
