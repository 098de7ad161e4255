"""The one load -> reconstruct -> write chain, used by ``qsmnode process`` and by the node's worker.

Each step is its own module; this one only strings them together and measures them:
``qsmnode.dicom.load`` (vendor-aware decoding) -> ``qsmnode.recon.pipeline`` (maps) ->
``qsmnode.dicom.outputs`` (DICOM objects) -> ``qsmnode.dicom.write`` (durable files).

Outputs are streamed: each series (QSM first, in :data:`qsmnode.dicom.outputs.SERIES_ORDER`)
is built, written durably and reported to ``on_series`` as soon as it is complete, while the
next one is built (one writer thread beside the building thread). The node's worker uses this
to send the QSM to PACS while the other series are still being made.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qsmnode.acquisition import Acquisition
from qsmnode.recon.result import ReconResult

log = logging.getLogger("qsmnode.process")

@dataclass
class ProcessOutcome:
    """What one acquisition produced: the output files and a short summary for people and logs."""

    output_paths: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeriesWritten:
    """One output series, complete and durable on disk (files fsynced, their directory too).

    ``kind``: its folder under the output directory (``QSM``, ``SWI``, ``MINIP``, ``R2STAR``,
    ``SR``, ``QSM_PM``, ``SUMMARY``); ``paths``: its files; ``build_seconds``/``write_seconds``:
    wall time of building its objects and of writing them.
    """

    kind: str
    paths: list[Path]
    build_seconds: float = 0.0
    write_seconds: float = 0.0


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


def summarise(acquisition: Acquisition, result: ReconResult, stage_seconds: dict[str, float],
              review=None) -> dict[str, Any]:
    """Key numbers of one run, for the CLI's printed summary, the job record and the audit log.

    ``review`` (a :class:`qsmnode.report.review.Review`, when the outputs were built) adds
    ``low_confidence``, its ``concerns`` and ``findings`` counts, and its warnings to ``warnings``.
    """
    mask = result.mask
    chi_ppb = result.chi_ppm[mask] * 1000.0 if mask.any() else np.zeros(1)
    summary = {
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
    if review is not None:
        summary.update(review.summary())
        summary["warnings"] = list(dict.fromkeys([*review.warnings, *result.warnings]))
    return summary


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
    on_series: Callable[[SeriesWritten], None] | None = None,
) -> ProcessOutcome:
    """Reconstruct a loaded acquisition and write every output into ``output_dir``.

    ``progress`` (optional) is called with a short text before each stage. ``on_series``
    (optional) is called with each :class:`SeriesWritten` as soon as that series is durable on
    disk, in :data:`~qsmnode.dicom.outputs.SERIES_ORDER`, from a writer thread (one call at a
    time) while the next series is built; an exception it raises stops the run and is raised
    here. Nothing is written when reconstruction fails or the source is refused; when building
    or writing a later series fails, the series reported before stay on disk (each complete) and
    the error is raised.
    """
    from qsmnode.dicom.outputs import iter_output_series

    report = progress or (lambda text: None)
    stage_seconds = dict(stage_seconds or {})

    report("reconstructing")
    start = time.perf_counter()
    result = reconstruct_acquisition(acquisition, device=device, preset=preset, overrides=overrides)
    stage_seconds["reconstruct"] = time.perf_counter() - start
    for step in result.steps:
        stage_seconds[f"reconstruct.{step.name}"] = step.seconds

    report("building and writing DICOM outputs")
    start = time.perf_counter()
    reviews: list = []
    series = iter_output_series(acquisition, result, parametric_map=parametric_map,
                                summary_image=summary_image, on_review=reviews.append)
    written = write_series(series, Path(output_dir), on_series=on_series)
    stage_seconds["outputs"] = time.perf_counter() - start  # wall: building and writing overlap
    stage_seconds["build_outputs"] = sum(w.build_seconds for w in written)
    stage_seconds["write"] = sum(w.write_seconds for w in written)
    paths = [p for w in written for p in w.paths]

    review = reviews[0] if reviews else None
    if review is not None and review.low_confidence:
        log.warning("low-confidence result, findings withheld: %s",
                    "; ".join(c.headline for c in review.concerns))
    summary = summarise(acquisition, result, stage_seconds, review)
    summary["outputs"] = len(paths)
    summary["series"] = {w.kind: len(w.paths) for w in written}
    summary["output_dir"] = str(output_dir)
    summary["study_instance_uid"] = str(acquisition.header.get("StudyInstanceUID", ""))
    return ProcessOutcome(output_paths=paths, summary=summary)


def write_series(
    series: Iterable[tuple[str, list]],
    output_dir: Path,
    *,
    on_series: Callable[[SeriesWritten], None] | None = None,
) -> list[SeriesWritten]:
    """Write each ``(kind, datasets)`` of ``series`` durably under ``output_dir``, in order.

    The calling thread takes (builds) the next series while one writer thread writes the
    previous one (:func:`qsmnode.dicom.write.write_datasets`: temp file, fsync, rename, directory
    fsync) and then calls ``on_series`` with it. At most one built series waits for the writer.
    If building fails, the series already built are still written and reported before the error
    is raised; if writing or ``on_series`` fails, nothing more is written and that error is
    raised. Returns the series written, in order.
    """
    from qsmnode.dicom.write import write_datasets

    pending: queue.Queue = queue.Queue(maxsize=1)
    written: list[SeriesWritten] = []
    failed: list[BaseException] = []

    def writer() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if failed:
                continue  # drain: the builder learns of the failure at its next put
            kind, datasets, build_seconds = item
            try:
                t0 = time.perf_counter()
                paths = write_datasets(datasets, output_dir)
                done = SeriesWritten(kind, paths, build_seconds, time.perf_counter() - t0)
                written.append(done)
                if on_series is not None:
                    on_series(done)
            except BaseException as err:  # noqa: BLE001 - raised in the calling thread
                failed.append(err)

    thread = threading.Thread(target=writer, name="qsmnode-output-writer", daemon=True)
    thread.start()
    try:
        items = iter(series)
        while not failed:
            t0 = time.perf_counter()
            try:
                kind, datasets = next(items)
            except StopIteration:
                break
            pending.put((kind, list(datasets), time.perf_counter() - t0))
    finally:
        pending.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return written


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
    on_series: Callable[[SeriesWritten], None] | None = None,
) -> ProcessOutcome:
    """Load exactly one acquisition from DICOM files or folders and process it into ``output_dir``
    (``on_series``: see :func:`process_acquisition`).

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
        on_series=on_series,
    )
