"""Regenerate the bundled sample scans (deterministic): ``python sample_dicom/make_samples.py``.

- ``siemens_3T/``: Siemens-style classic MR, "3 T" label at 2.89 T (ImagingFrequency 123.2 MHz),
  separate magnitude and phase series, 12-bit phase with RescaleSlope 2 / Intercept -4096.
- ``ge_3T/``: GE-style single interleaved series of real and imaginary images (private
  (0043,102F) image type), GE phase handedness and the alternate-slice pi offset.

Each holds ``dicom/`` (what a scanner sends) and ``truth/`` (chi_ppm.npy, labels.npy,
brain_mask.npy, truth.json: the numerical head phantom the signal was simulated from).
72 x 72 x 52 voxels of 2.7 mm (the whole head), 4 echoes (4, 10, 16, 22 ms).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qsmnode.simulate.dicom_writer import WriterOptions
from qsmnode.simulate.scan import simulate_scan

HERE = Path(__file__).resolve().parent
COMMON = dict(
    field_tesla=3.0,
    matrix=(72, 72, 52),
    voxel_size_mm=(2.7, 2.7, 2.7),
    echo_times_ms=[4.0, 10.0, 16.0, 22.0],
    snr=100.0,
)


def main() -> None:
    samples = {
        "siemens_3T": dict(
            vendor="siemens",
            seed=11,
            writer_options=WriterOptions(patient_name="Demo^Siemens", patient_id="QSMDEMO-SIEMENS"),
        ),
        "ge_3T": dict(
            vendor="ge",
            seed=12,
            oblique_deg=12.0,
            writer_options=WriterOptions(
                patient_name="Demo^GE", patient_id="QSMDEMO-GE", ge_components=("real", "imaginary")
            ),
        ),
    }
    for name, kwargs in samples.items():
        target = HERE / name
        shutil.rmtree(target, ignore_errors=True)
        scan = simulate_scan(target, **COMMON, **kwargs)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6
        print(f"{name}: {len(scan.paths)} instances, B0 {scan.b0_tesla:.4f} T, {size:.1f} MB")


if __name__ == "__main__":
    main()
