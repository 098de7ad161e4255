"""The one load -> reconstruct -> write chain, used by ``qsmnode process`` and by the node's worker.

Each step is its own module; this one only strings them together and measures them:
``qsmnode.dicom.load`` (vendor-aware decoding) -> ``qsmnode.recon.pipeline`` (maps) ->
``qsmnode.dicom.outputs`` (DICOM objects) -> ``qsmnode.dicom.write`` (durable files).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qsmnode.acquisition import Acquisition
from qsmnode.recon.result import ReconResult


@dataclass
class ProcessOutcome:
    """What one acquisition produced: the output files and a short summary for people and logs."""

    output_paths: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


def reconstruct_acquisition(
    acquisition: Acquisition,
    *,
    device: str = "auto",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ReconResult:
    """Run the reconstruction pipeline on a loaded acquisition (its provenance warnings carried over)."""
    from qsmnode.recon.pipeline import reconstruct

    result = reconstruct(
        acquisition.signal,
        acquisition.echo_times_s,
        acquisition.b0_tesla,
        acquisition.voxel_size_mm,
        acquisition.b0_direction,
        preset=preset,
        overrides=overrides,
        device=device,
    )
    result.warnings = list(acquisition.warnings) + [w for w in result.warnings if w not in acquisition.warnings]
    return result


def summarise(acquisition: Acquisition, result: ReconResult, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Key numbers of one run, for the CLI's printed summary, the job record and the audit log."""
    mask = result.mask
    chi_ppb = result.chi_ppm[mask] * 1000.0 if mask.any() else np.zeros(1)
    return {
        "vendor": acquisition.vendor,
        "b0_tesla": round(float(acquisition.b0_tesla), 4),
        "matrix": list(acquisition.shape),
        "echoes": acquisition.n_echoes,
        "voxel_size_mm": [round(float(v), 3) for v in acquisition.voxel_size_mm],
        "device": result.device,
        "preset": result.preset.get("name", ""),
        "reference_region": result.reference_region,
        "mask_volume_ml": round(float(result.quality.get("mask_volume_ml", 0.0)), 1),
        "chi_ppb_p1_p99": [round(float(v), 1) for v in np.percentile(chi_ppb, [1, 99])],
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "warnings": list(result.warnings),
    }


def process_acquisition(
    acquisition: Acquisition,
    output_dir: str | os.PathLike,
    *,
    device: str = "auto",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    parametric_map: bool = True,
    summary_image: bool = True,
    progress: Callable[[str], None] | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> ProcessOutcome:
    """Reconstruct a loaded acquisition and write every output into ``output_dir``.

    ``progress`` (optional) is called with a short text before each stage. Nothing is written
    when reconstruction or output building fails.
    """
    from qsmnode.dicom.outputs import build_output_datasets
    from qsmnode.dicom.write import write_datasets

    report = progress or (lambda text: None)
    stage_seconds = dict(stage_seconds or {})

    report("reconstructing")
    start = time.perf_counter()
    result = reconstruct_acquisition(acquisition, device=device, preset=preset, overrides=overrides)
    stage_seconds["reconstruct"] = time.perf_counter() - start
    for step in result.steps:
        stage_seconds[f"reconstruct.{step.name}"] = step.seconds

    report("building DICOM outputs")
    start = time.perf_counter()
    datasets = build_output_datasets(
        acquisition, result, parametric_map=parametric_map, summary_image=summary_image
    )
    stage_seconds["build_outputs"] = time.perf_counter() - start

    report("writing")
    start = time.perf_counter()
    paths = write_datasets(datasets, Path(output_dir))
    stage_seconds["write"] = time.perf_counter() - start

    summary = summarise(acquisition, result, stage_seconds)
    summary["outputs"] = len(paths)
    summary["output_dir"] = str(output_dir)
    summary["study_instance_uid"] = str(acquisition.header.get("StudyInstanceUID", ""))
    return ProcessOutcome(output_paths=paths, summary=summary)


def process_paths(
    input_paths: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    device: str = "auto",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    parametric_map: bool = True,
    summary_image: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ProcessOutcome:
    """Load exactly one acquisition from DICOM files or folders and process it into ``output_dir``.

    Raises :class:`qsmnode.errors.InputRefused` / :class:`qsmnode.errors.ReconstructionError`
    with a reason when the input cannot be processed; nothing is written in that case.
    """
    from qsmnode.dicom.load import load_acquisition

    if progress:
        progress("loading DICOM")
    start = time.perf_counter()
    acquisition = load_acquisition([Path(p) for p in input_paths])
    return process_acquisition(
        acquisition,
        output_dir,
        device=device,
        preset=preset,
        overrides=overrides,
        parametric_map=parametric_map,
        summary_image=summary_image,
        progress=progress,
        stage_seconds={"load": time.perf_counter() - start},
    )
